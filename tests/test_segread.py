"""The project's SEG reader on SEGs written by others (dcmqi, highdicom)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.results.segread import SegGeometryError, read_seg
from tests.peers import SHARED_DATA

DCMQI = SHARED_DATA / "seg" / "dcmqi"
HIGHDICOM = SHARED_DATA / "seg" / "highdicom"


def ct_3slice() -> list[pydicom.Dataset]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((DCMQI / "ct-3slice").glob("*.dcm"))]
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(headers, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))


def test_dcmqi_liver_on_its_source_slices_equals_dcmqi_nrrd() -> None:
    sources = ct_3slice()
    seg = read_seg(DCMQI / "liver.dcm", sources)
    assert seg.segmentation_type == "BINARY"
    assert seg.source_sop_instance_uids == tuple(s.SOPInstanceUID for s in sources)
    assert seg.segments[1].label == "Liver"
    assert seg.segments[1].type.meaning == "Liver"
    liver = seg.masks[1]
    assert liver.shape == (3, 512, 512) and liver.array.dtype == np.uint8
    # dcmqi's own NRRD export of the same segment, resampled onto our grid.
    nrrd = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    reference = sitk.GetArrayFromImage(sitk.Resample(nrrd, liver.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor))
    assert liver.array.sum() == sitk.GetArrayFromImage(nrrd).sum() > 100_000
    np.testing.assert_array_equal(liver.array, reference > 0)
    # Read on its own frame geometry, the same grid and voxels.
    own = read_seg(DCMQI / "liver.dcm").masks[1]
    assert own.same_grid(liver)
    np.testing.assert_array_equal(own.array, liver.array)


def test_frames_off_their_source_positions_are_refused() -> None:
    sources = ct_3slice()
    sources[0].ImagePositionPatient = [0.0, 0.0, 0.0]
    with pytest.raises(SegGeometryError, match=str(sources[0].SOPInstanceUID)):
        read_seg(DCMQI / "liver.dcm", sources)


def test_dcmqi_overlapping_segments_stay_separate() -> None:
    seg = read_seg(DCMQI / "partial_overlaps.dcm", ct_3slice())
    assert sorted(seg.masks) == [1, 2, 3, 4, 5]
    stacked = np.stack([seg.masks[n].array for n in seg.masks])
    assert (stacked.sum(axis=0) > 1).any(), "the sample's segments overlap somewhere"


@pytest.mark.parametrize(
    ("name", "kind", "dtype"),
    [
        ("seg_image_ct_binary.dcm", "BINARY", np.uint8),
        ("seg_image_ct_binary_fractional.dcm", "FRACTIONAL", np.float32),
        ("seg_image_ct_true_fractional.dcm", "FRACTIONAL", np.float32),
        ("seg_image_ct_binary_overlap.dcm", "BINARY", np.uint8),
    ],
)
def test_highdicom_examples(name: str, kind: str, dtype: type) -> None:
    seg = read_seg(HIGHDICOM / name)
    assert seg.segmentation_type == kind
    for mask in seg.masks.values():
        assert mask.array.dtype == dtype
        assert mask.array.shape[1:] == (16, 16)
        assert 0 <= mask.array.min() and mask.array.max() <= 1 and mask.array.any()
        np.testing.assert_allclose(np.linalg.det(mask.direction), 1.0, atol=1e-6)


def test_true_fractional_values_are_scaled_to_0_1() -> None:
    mask = read_seg(HIGHDICOM / "seg_image_ct_true_fractional.dcm").masks[1].array
    fractions = np.unique(mask)
    assert len(fractions) > 2, "a true fractional SEG holds more than 0 and 1"
    assert fractions.max() == pytest.approx(128 / 255, abs=1e-6)


def test_dcmqi_labelmap_seg() -> None:
    seg = read_seg(DCMQI / "sparse-labelmap-noppv.dcm")
    assert seg.segmentation_type == "LABELMAP"
    assert list(seg.masks) == [1]
    assert seg.masks[1].array.sum() == 630
