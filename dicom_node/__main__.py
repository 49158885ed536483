"""`python -m dicom_node` is the `dicom-node` command."""

import sys

from dicom_node.ops.cli import main

sys.exit(main())
