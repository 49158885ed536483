"""DICOM series -> geometry-checked `inference.Volume` (issue: from a completed series to a trustworthy volume).

`SeriesSummary` is the routing data: what `route` matches pipeline rules on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesSummary:
    """The attributes of a series that routing rules match on (all from the DICOM headers).

    `orientation` is derived from Image Orientation (Patient): "axial",
    "coronal", "sagittal", "oblique", or "mixed" when instances disagree.
    """

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    number_of_slices: int
    manufacturer: str
    contrast_agent: str | None
    orientation: str
