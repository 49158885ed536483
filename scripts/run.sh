#!/usr/bin/env bash
# The README's first command: install the node into .venv and start it on the
# default config.yaml (embedded ONNX Runtime backend).
#
# The spleen demo weights are not part of the repository: models/spleen_ct holds
# its Triton config and pipeline.yaml, and when the workspace's shared model
# folder is present (../shared/models/spleen_ct_demo) its model.onnx is copied
# in as version 1 once, as one drops weights into a Triton repository. A site
# installs its own models with `dicom-node models import` (docs/models.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
demo=../shared/models/spleen_ct_demo/1/model.onnx
if [ ! -f models/spleen_ct/1/model.onnx ] && [ -f "$demo" ]; then
  mkdir -p models/spleen_ct/1
  cp "$demo" models/spleen_ct/1/model.onnx
fi
.venv/bin/dicom-node models list
.venv/bin/dicom-node check-config config.yaml
exec .venv/bin/dicom-node serve --config config.yaml "$@"
