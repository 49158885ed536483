"""The model side of dicom-node: volumes and tensors in, masks and class scores out.

This package never imports `dicom_node`; the node calls it through one narrow entry.
"""

from inference.volume import Volume

__all__ = ["Volume"]
