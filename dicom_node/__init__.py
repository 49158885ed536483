"""dicom-node: a DICOM node that brings AI results into the imaging workflow."""

__version__ = "0.1.0"
