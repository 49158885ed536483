"""Read a DICOM Segmentation back into masks on a known grid: ours, dcmqi's, highdicom's.

Used by the tests to check what the node writes, and by admins to compare a
SEG with the CT it annotates. Two ways to place the frames:

- on the referenced source grid (`sources` given): slice k of every mask is
  the segmentation of `sources[k]`, matched by the frames' derivation
  references (PS3.3 C.8.20.3), whatever order the SEG stores its frames in;
  sources without a frame read as empty (SEGs written with empty frames
  omitted);
- on the SEG's own grid (no sources): the frames' Plane Position / Plane
  Orientation (PS3.3 C.7.6.16.2.3-4) must make a regularly spaced volume.

BINARY and LABELMAP masks are uint8 0/1; FRACTIONAL masks are float32 in 0..1
(the stored value divided by MaximumFractionalValue, PS3.3 C.8.20.2.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from inference.results import Code
from inference.volume import Volume


@dataclass(frozen=True)
class SegmentInfo:
    """What one segment is (Segment Sequence item, PS3.3 C.8.20.2)."""

    number: int
    label: str
    category: Code
    type: Code
    algorithm_name: str | None


@dataclass(frozen=True, eq=False)
class SegmentationMasks:
    """The segments of one SEG, each a mask `Volume` on the same grid."""

    segmentation_type: str
    masks: dict[int, Volume]
    segments: dict[int, SegmentInfo]
    source_sop_instance_uids: tuple[str, ...] | None
    """Instance each slice k was matched to, when read on a source grid."""


def read_seg(path: Path, sources: Sequence[pydicom.Dataset] | None = None) -> SegmentationMasks:
    """Read the SEG at `path`, on the grid of `sources` (in slice order) or on its own grid."""
    seg = hd.seg.segread(path)
    numbers = [n for n in seg.segment_numbers if n != 0]  # LABELMAP lists background as 0
    if sources is not None:
        uids = tuple(str(s.SOPInstanceUID) for s in sources)
        stacked = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(uids),
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
            rescale_fractional=True,
            # Writers such as dcmqi omit Spatial Locations Preserved; positions are checked instead.
            ignore_spatial_locations=True,
        )
        _check_frame_positions(seg, sources)
        grid = source_grid(sources)
    else:
        uids = None
        volume = seg.get_volume(segment_numbers=numbers, rescale_fractional=True)
        stacked, grid = _along_slice_normal(volume.array, volume.affine)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    dtype = np.float32 if fractional else np.uint8
    masks = {
        number: grid.with_array(np.ascontiguousarray(stacked[..., index], dtype=dtype))
        for index, number in enumerate(numbers)
    }
    return SegmentationMasks(
        segmentation_type=seg.segmentation_type.value,
        masks=masks,
        segments={number: _segment_info(seg.get_segment_description(number)) for number in numbers},
        source_sop_instance_uids=uids,
    )


def source_grid(sources: Sequence[pydicom.Dataset]) -> Volume:
    """The voxel grid of single-frame source instances given in slice order (array left empty).

    Direction columns are the row and column cosines of Image Orientation
    (Patient) and the unit vector from the first to the last Image Position
    (PS3.3 C.7.6.2.1.1); spacing is Pixel Spacing (row spacing first in DICOM)
    and the mean distance between positions.
    """
    first = sources[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    if len(sources) > 1:
        step = (positions[-1] - positions[0]) / (len(sources) - 1)
        slice_spacing = float(np.linalg.norm(step))
        normal = step / slice_spacing
    else:
        normal = np.cross(orientation[:3], orientation[3:])
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)
    direction = np.column_stack([orientation[:3], orientation[3:], normal])
    return Volume(
        array=np.zeros((len(sources), int(first.Rows), int(first.Columns)), dtype=np.uint8),
        spacing=(column_spacing, row_spacing, slice_spacing),
        origin=tuple(positions[0]),
        direction=direction,
    )


class SegGeometryError(ValueError):
    """A SEG frame does not lie on the source instance it says it derives from."""


def _check_frame_positions(seg: hd.seg.Segmentation, sources: Sequence[pydicom.Dataset], tolerance_mm: float = 0.01) -> None:
    """Each frame's Image Position (Patient) must be its referenced source's (PS3.3 C.7.6.16.2.3)."""
    positions = {str(s.SOPInstanceUID): np.array([float(v) for v in s.ImagePositionPatient]) for s in sources}
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if "PlanePositionSequence" not in frame or "DerivationImageSequence" not in frame:
            continue
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                expected = positions.get(str(source.ReferencedSOPInstanceUID))
                actual = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
                if expected is not None and np.abs(actual - expected).max() > tolerance_mm:
                    raise SegGeometryError(
                        f"frame {number} is at {actual.round(3).tolist()} mm but its source "
                        f"{source.ReferencedSOPInstanceUID} is at {expected.round(3).tolist()} mm"
                    )


def _along_slice_normal(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Volume]:
    """Convert highdicom's volume to our grid, slices ordered along the slice normal.

    highdicom's affine maps (slice, row, column) indices, ours (i=column,
    j=row, k=slice); it may stack slices against the normal (row x column
    cosines), SimpleITK and `source_grid` stack them along it, so flip then.
    """
    i_vector, j_vector, k_vector = affine[:3, 2], affine[:3, 1], affine[:3, 0]
    origin = affine[:3, 3]
    if np.dot(np.cross(i_vector, j_vector), k_vector) < 0:
        origin = origin + (array.shape[0] - 1) * k_vector
        k_vector = -k_vector
        array = array[::-1]
    spacing = tuple(float(np.linalg.norm(v)) for v in (i_vector, j_vector, k_vector))
    direction = np.column_stack([v / s for v, s in zip((i_vector, j_vector, k_vector), spacing)])
    grid = Volume(np.zeros(array.shape[:3], dtype=np.uint8), spacing, tuple(origin), direction)
    return array, grid


def _segment_info(description: hd.seg.SegmentDescription) -> SegmentInfo:
    def code(concept: hd.sr.CodedConcept) -> Code:
        return Code(concept.value, concept.scheme_designator, concept.meaning)

    algorithm = description.algorithm_identification
    return SegmentInfo(
        number=int(description.segment_number),
        label=str(description.segment_label),
        category=code(description.segmented_property_category),
        type=code(description.segmented_property_type),
        algorithm_name=str(algorithm[0].AlgorithmName) if algorithm else None,
    )
