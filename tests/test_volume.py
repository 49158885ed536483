"""Volume loading: the real JPEG 2000 series against SimpleITK, and every variant a real archive produces."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless)

from dicom_node.volume import SeriesGeometryError, SeriesSummary, VolumeOptions, load_series, summarize_series
from inference.volume import Volume
from tests import volume_variants as variants
from tests.peers import CT_J2K_SERIES, dcmtk


def _uids(datasets) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))]


@pytest.fixture(scope="module")
def series():
    return variants.small_series()


def _assert_loads(paths, datasets, **options):
    loaded = load_series(paths, VolumeOptions(**options))
    np.testing.assert_array_equal(loaded.volume.array, variants.expected_hu(datasets))
    assert [s.sop_instance_uid for s in loaded.slices] == _uids(datasets)
    return loaded


def test_real_j2k_series_equals_simpleitk():
    paths = sorted(CT_J2K_SERIES.iterdir())
    loaded = load_series(paths)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(CT_J2K_SERIES)))
    reference = reader.Execute()
    np.testing.assert_array_equal(loaded.volume.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(loaded.volume.spacing, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(loaded.volume.origin, reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(loaded.volume.direction.ravel(), reference.GetDirection(), atol=1e-6)
    assert loaded.volume.array.dtype == np.int16  # slope 1, intercept -1024, 12 bits: fits int16
    assert loaded.warnings == ()
    # The source mapping: slice 0 is the lowest position (the files store Instance Numbers head to foot).
    positions = [float(pydicom.dcmread(s.path, stop_before_pixels=True).ImagePositionPatient[2])
                 for s in loaded.slices]
    assert positions == sorted(positions) and len(set(positions)) == 20
    assert loaded.volume.same_grid(Volume.from_sitk(reference))


def test_summarize_real_series():
    summary = summarize_series(sorted(CT_J2K_SERIES.iterdir()))
    assert summary == SeriesSummary(
        study_instance_uid="", series_instance_uid="", modality="CT", body_part_examined="PARTIALBODY",
        series_description="CT Body 3.0", image_type=("ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"),
        slice_thickness=3.0, number_of_slices=20, manufacturer="SIEMENS", contrast_agent="APPLIED",
        orientation="axial", image_instances=20, non_image_sop_classes=())


def test_shuffled_instance_numbers_sort_by_position(series, tmp_path):
    shuffled = variants.shuffled(series)
    loaded = _assert_loads(variants.write(shuffled, tmp_path), shuffled)
    first = min(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert loaded.volume.origin == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert loaded.volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    np.testing.assert_allclose(loaded.volume.direction, np.eye(3))
    assert loaded.summary.number_of_slices == len(series)


@pytest.mark.parametrize("transfer_syntax", [RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["rle", "deflate", "big-endian"])
def test_re_encodings_give_the_same_volume(series, tmp_path, transfer_syntax):
    paths = variants.write(series, tmp_path, transfer_syntax)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    loaded = _assert_loads(paths, series)
    # GDCM reads the same files to the same voxels: the re-encodings are real ones, not pydicom round trips.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path)))
    np.testing.assert_array_equal(loaded.volume.array, sitk.GetArrayFromImage(reader.Execute()))



@pytest.mark.skipif(not dcmtk.available(), reason="dcmtk not installed (apt-get install dcmtk)")
@pytest.mark.parametrize(("command", "transfer_syntax"), [
    (["dcmcjpeg", "+e1"], JPEGLosslessSV1), (["dcmcjpeg", "+el"], JPEGLossless), (["dcmcjpls", "+el"], JPEGLSLossless),
], ids=["jpeg-lossless-sv1", "jpeg-lossless", "jpeg-ls-lossless"])
def test_modality_compressions_by_dcmtk_give_the_same_volume(series, tmp_path, command, transfer_syntax):
    """The lossless syntaxes modalities send most, encoded by dcmtk's own codecs (not pydicom's), load to
    the voxels of the uncompressed series."""
    paths = variants.write(series, tmp_path / "native")
    compressed = []
    for path in paths:
        target = tmp_path / "compressed" / path.name
        target.parent.mkdir(exist_ok=True)
        subprocess.run([*command, str(path), str(target)], check=True, capture_output=True)
        compressed.append(target)
    assert pydicom.dcmread(compressed[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    _assert_loads(compressed, series)

def test_identical_duplicate_dropped_with_warning(series, tmp_path):
    datasets = variants.with_duplicate(series, 3, conflicting=False)
    loaded = load_series(variants.write(datasets, tmp_path))
    np.testing.assert_array_equal(loaded.volume.array, variants.expected_hu(series))
    pair = {str(series[3].SOPInstanceUID), str(datasets[-1].SOPInstanceUID)}
    kept = loaded.slices[3].sop_instance_uid
    assert kept in pair
    assert [s.sop_instance_uid for i, s in enumerate(loaded.slices) if i != 3] == _uids(series[:3] + series[4:])
    (dropped,) = pair - {kept}
    assert loaded.warnings == (f"dropped 1 identical duplicate(s) at slice 3: {dropped} (kept {kept})",)


def test_conflicting_duplicate_is_an_error(series, tmp_path):
    datasets = variants.with_duplicate(series, 3, conflicting=True)
    with pytest.raises(SeriesGeometryError, match="conflicting duplicates") as error:
        load_series(variants.write(datasets, tmp_path))
    assert set(error.value.sop_instance_uids) == {str(series[3].SOPInstanceUID), str(datasets[-1].SOPInstanceUID)}
    assert error.value.series_instance_uid == str(series[0].SeriesInstanceUID)
    assert str(series[0].SeriesInstanceUID) in str(error.value)


def test_missing_slice_is_an_error(series, tmp_path):
    datasets = variants.without(series, 4)
    with pytest.raises(SeriesGeometryError, match="non-uniform slice spacing: 4 mm") as error:
        load_series(variants.write(datasets, tmp_path))
    assert error.value.sop_instance_uids == (str(series[3].SOPInstanceUID), str(series[5].SOPInstanceUID))


def test_spacing_within_tolerance_loads(series, tmp_path):
    """A 1.5 % jitter in one position (rounding in real scanners) is not a missing slice."""
    datasets = variants.shuffled(series)
    moved = next(ds for ds in datasets if ds.SOPInstanceUID == series[4].SOPInstanceUID)
    moved.ImagePositionPatient = [*moved.ImagePositionPatient[:2], float(moved.ImagePositionPatient[2]) + 0.03]
    loaded = load_series(variants.write(datasets, tmp_path))
    assert loaded.volume.shape[0] == len(series)
    with pytest.raises(SeriesGeometryError, match="non-uniform"):
        load_series(variants.write(datasets, tmp_path / "strict"), VolumeOptions(spacing_tolerance=0.01))


def test_localizer_excluded_with_warning(series, tmp_path):
    datasets = variants.with_localizer(series)
    loaded = _assert_loads(variants.write(datasets, tmp_path), series)
    assert loaded.warnings == (f"excluded 1 frame(s) (Image Type LOCALIZER): {datasets[0].SOPInstanceUID}",)
    assert summarize_series(variants.write(datasets, tmp_path / "again")).number_of_slices == len(series)


def test_stray_orientation_excluded_but_second_stack_is_an_error(series, tmp_path):
    one = variants.with_other_orientation(series, 1)
    loaded = _assert_loads(variants.write(one, tmp_path / "one"), series)
    (warning,) = loaded.warnings
    assert "Image Orientation (Patient) differs" in warning and str(one[-1].SOPInstanceUID) in warning
    three = variants.with_other_orientation(series, 3)
    with pytest.raises(SeriesGeometryError, match="mixed orientations") as error:
        load_series(variants.write(three, tmp_path / "three"))
    assert set(error.value.sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in three[-3:]}
    assert summarize_series(variants.write(three, tmp_path / "summary")).orientation == "mixed"


def test_tilted_stack_refused_by_default(series, tmp_path):
    datasets, angle = variants.tilted(series)
    with pytest.raises(SeriesGeometryError, match=f"gantry tilt about {math.degrees(angle):.2f} degrees") as error:
        load_series(variants.write(datasets, tmp_path))
    assert error.value.sop_instance_uids == (_uids(series)[0], _uids(series)[-1])


def test_tilted_stack_resampled_onto_orthogonal_grid(series, tmp_path):
    datasets, angle = variants.tilted(series, rows_per_slice=1)
    loaded = load_series(variants.write(datasets, tmp_path), VolumeOptions(tilt="resample"))
    volume = loaded.volume
    source = variants.expected_hu(datasets)
    # Slice k lies k rows further along the column direction: on the orthogonal grid it moves down k rows.
    for k in range(source.shape[0]):
        np.testing.assert_allclose(volume.array[k, k:, :], source[k, : source.shape[1] - k, :], atol=1e-3)
        assert np.all(volume.array[k, :k, :] == volume.array.min())
    normal = np.array([0, -math.sin(angle), math.cos(angle)])
    np.testing.assert_allclose(volume.direction[:, 2], normal, atol=1e-6)
    assert volume.spacing[2] == pytest.approx(2.0 * math.cos(angle))
    # Resampled voxel centres are where the source slices' pixels really are (first row of slice k's source).
    k = 5
    moved_pixel = volume.index_to_lps(np.array([0, k, k]))
    np.testing.assert_allclose(moved_pixel, [float(v) for v in datasets[k].ImagePositionPatient], atol=1e-4)
    assert "gantry tilt" in loaded.warnings[0]


def test_mixed_size_is_an_error(series, tmp_path):
    datasets = variants.with_other_size(series, 2)
    with pytest.raises(SeriesGeometryError, match="mixed Rows/Columns") as error:
        load_series(variants.write(datasets, tmp_path))
    assert error.value.sop_instance_uids == (str(series[2].SOPInstanceUID),)


def test_fewer_slices_than_minimum_is_an_error(series, tmp_path):
    paths = variants.write(series[:4], tmp_path)
    assert load_series(paths, VolumeOptions(min_slices=4)).volume.shape[0] == 4
    with pytest.raises(SeriesGeometryError, match="4 distinct slice positions, fewer than the minimum 5"):
        load_series(paths, VolumeOptions(min_slices=5))


@pytest.mark.parametrize("per_frame_rescale", [False, True], ids=["shared-rescale", "per-frame-rescale"])
def test_enhanced_ct_multiframe(series, tmp_path, per_frame_rescale):
    enhanced = variants.enhanced_ct(series, per_frame_rescale=per_frame_rescale)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    loaded = load_series([path])
    np.testing.assert_array_equal(loaded.volume.array, variants.expected_hu(series))
    assert {s.sop_instance_uid for s in loaded.slices} == {str(enhanced.SOPInstanceUID)}
    assert all(s.sop_class_uid == variants.ENHANCED_CT_IMAGE_STORAGE for s in loaded.slices)
    # slices[k].frame_number is the frame holding slice k: frames were stored shuffled.
    frame_positions = [float(item.PlanePositionSequence[0].ImagePositionPatient[2])
                       for item in enhanced.PerFrameFunctionalGroupsSequence]
    positions = [frame_positions[s.frame_number - 1] for s in loaded.slices]
    assert positions == sorted(frame_positions)
    assert loaded.volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert loaded.summary.number_of_slices == len(series) and loaded.summary.orientation == "axial"


def test_non_image_instance_excluded_with_warning(series, tmp_path):
    """A Key Object or SR stored in the image series has no plane: excluded, the stack still loads."""
    note = variants.renamed(series[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "PixelData"):
        delattr(note, keyword)
    note.SOPClassUID = note.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    loaded = _assert_loads(variants.write([*series, note], tmp_path), series)
    assert len(loaded.warnings) == 1 and str(note.SOPInstanceUID) in loaded.warnings[0]


def test_a_series_mixing_images_and_a_report_is_summarized_and_loaded_from_its_images(series, tmp_path):
    """A dose SR filed in the CT series (Modality SR, no pixel data) is not an image of the volume: it must not
    make the series 'two modalities', and a series of such instances alone is no image series at all."""
    report = variants.renamed(series[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "PixelData"):
        delattr(report, keyword)
    report.Modality = "SR"
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    files = variants.write([*series, report], tmp_path / "mixed")
    summary = summarize_series(files)
    assert (summary.modality, summary.number_of_slices, summary.image_instances) == ("CT", len(series), len(series))
    assert summary.non_image_sop_classes == ("1.2.840.10008.5.1.4.1.1.88.67",)
    loaded = _assert_loads(files, series)
    assert any(str(report.SOPInstanceUID) in warning and "without pixel data" in warning
               for warning in loaded.warnings)
    alone = summarize_series(variants.write([report], tmp_path / "alone"))
    assert (alone.modality, alone.image_instances, alone.number_of_slices) == ("SR", 0, 0)


def test_instances_of_another_series_are_an_error(series, tmp_path):
    stranger = variants.renamed(series[2])
    stranger.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(SeriesGeometryError, match="from 2 series") as error:
        load_series(variants.write([*series, stranger], tmp_path))
    assert error.value.sop_instance_uids == (str(stranger.SOPInstanceUID),)


def test_fractional_rescale_gives_float32(series, tmp_path):
    """int16 only when Rescale Slope/Intercept are integral; otherwise float32 keeps the fraction."""
    datasets = variants.shuffled(series)
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1000.25
    loaded = _assert_loads(variants.write(datasets, tmp_path), datasets)
    assert loaded.volume.array.dtype == np.float32
    assert np.any(loaded.volume.array % 1 != 0)
