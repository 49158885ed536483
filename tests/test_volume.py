"""Volume loading: the real JPEG 2000 series against SimpleITK, and every variant a real archive produces."""

from __future__ import annotations

import copy
import math
import re
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless)

from dicom_node.pipeline.checks import VolumeOptions
from dicom_node.pipeline.volume import (SeriesGeometryError, SeriesSummary, check_series, load_series,
                                        summarize_series)
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



@dcmtk.required()
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
    z = float(series[3].ImagePositionPatient[2])
    assert loaded.warnings == (f"duplicate slice position z={z:.6g} mm: dropped identical instance {dropped} "
                               f"(kept instance {kept})",)


def test_conflicting_duplicate_is_an_error(series, tmp_path):
    datasets = variants.with_duplicate(series, 3, conflicting=True)
    z = float(series[3].ImagePositionPatient[2])
    with pytest.raises(SeriesGeometryError, match=f"duplicate slice position z={z:.6g} mm: instance .* and "
                                                  "instance .* hold different pixel values") as error:
        load_series(variants.write(datasets, tmp_path))
    assert set(error.value.sop_instance_uids) == {str(series[3].SOPInstanceUID), str(datasets[-1].SOPInstanceUID)}
    assert error.value.series_instance_uid == str(series[0].SeriesInstanceUID)
    assert str(series[0].SeriesInstanceUID) in str(error.value)


def test_missing_slice_is_an_error(series, tmp_path):
    datasets = variants.without(series, 4)
    below, above = (float(series[i].ImagePositionPatient[2]) for i in (3, 5))
    message = (f"missing slice between z={below:.6g} mm and z={above:.6g} mm: 4 mm apart where the series "
               "spacing is 2 mm (about 1 slice(s) missing)")
    with pytest.raises(SeriesGeometryError, match=re.escape(message)) as error:
        load_series(variants.write(datasets, tmp_path))
    assert error.value.sop_instance_uids == (str(series[3].SOPInstanceUID), str(series[5].SOPInstanceUID))


def test_slices_missing_here_and_there_are_named_missing_not_duplicates(series, tmp_path):
    """Part of a series, sent before the rest: most gaps are two spacings, so the median gap is not the
    spacing; the one pair of adjacent slices shows it, and the longer gaps are the missing slices."""
    datasets = [series[i] for i in (0, 1, 3, 5, 7)]
    below, above = (float(series[i].ImagePositionPatient[2]) for i in (1, 3))
    error = _refused(variants.write(datasets, tmp_path),
                     re.escape(f"missing slice between z={below:.6g} mm and z={above:.6g} mm: 4 mm apart where the "
                               "series spacing is 2 mm (about 1 slice(s) missing, 3 in the whole series)"))
    assert error.sop_instance_uids == (str(series[1].SOPInstanceUID), str(series[3].SOPInstanceUID))


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


# --- what routing refuses from the headers alone (check_series), each with the reason an admin needs ----------

def _refused(paths, message: str) -> SeriesGeometryError:
    """Both the routing check and the loader refuse, with the same reason."""
    with pytest.raises(SeriesGeometryError, match=message) as at_routing:
        check_series(paths)
    with pytest.raises(SeriesGeometryError, match=message) as at_load:
        load_series(paths)
    assert str(at_routing.value) == str(at_load.value)
    return at_routing.value


@pytest.mark.parametrize("photometric_interpretation", ["RGB", "YBR_FULL"])
def test_colour_series_refused_naming_the_value(series, tmp_path, photometric_interpretation):
    datasets = variants.in_colour(series, photometric_interpretation)
    error = _refused(variants.write(datasets, tmp_path),
                     f"Photometric Interpretation {photometric_interpretation} with 3 sample\\(s\\) per pixel in 8 of "
                     "8 frames: the volume for a model needs MONOCHROME1 or MONOCHROME2 with 1 sample per pixel")
    assert set(error.sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in series}


def test_monochrome1_loads(series, tmp_path):
    """MONOCHROME1 only inverts the display; Rescale Slope/Intercept give the same HU (PS3.3 C.7.6.3.1.2)."""
    datasets = [copy.deepcopy(ds) for ds in series]
    for ds in datasets:
        ds.PhotometricInterpretation = "MONOCHROME1"
    _assert_loads(variants.write(datasets, tmp_path), datasets)


def test_mixed_frame_of_reference_refused(series, tmp_path):
    datasets = variants.with_frame_of_reference(series, 3)
    main, other = str(series[0].FrameOfReferenceUID), str(datasets[-1].FrameOfReferenceUID)
    error = _refused(variants.write(datasets, tmp_path),
                     re.escape(f"mixed Frame of Reference UIDs: {main} in 5 frame(s), {other} in 3 (the instances "
                               "named); positions in different frames of reference cannot be stacked"))
    assert set(error.sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in datasets[-3:]}


def test_missing_image_position_named(series, tmp_path):
    datasets = variants.without_position(series, 4)
    uid = str(series[4].SOPInstanceUID)
    error = _refused(variants.write(datasets, tmp_path),
                     re.escape(f"instance {uid} has no Image Position (Patient): its place in the volume is unknown"))
    assert error.sop_instance_uids == (uid,)


def test_near_duplicate_position_named(series, tmp_path):
    datasets = variants.with_near_duplicate(series, 3, 0.4)
    z = float(series[3].ImagePositionPatient[2])
    error = _refused(variants.write(datasets, tmp_path),
                     re.escape(f"duplicate slice position z={z:.6g} mm: instances {series[3].SOPInstanceUID} and "
                               f"{datasets[-1].SOPInstanceUID} are 0.4 mm apart where the series spacing is 2 mm"))
    assert error.sop_instance_uids == (str(series[3].SOPInstanceUID), str(datasets[-1].SOPInstanceUID))


def test_uneven_gap_is_non_uniform_spacing(series, tmp_path):
    """Neither a missing slice nor a duplicate: a gap of 1.3 spacings says what it is."""
    datasets = [copy.deepcopy(ds) for ds in series]
    for ds in datasets[5:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.6]
    below, above = float(series[4].ImagePositionPatient[2]), float(datasets[5].ImagePositionPatient[2])
    _refused(variants.write(datasets, tmp_path),
             re.escape(f"non-uniform slice spacing between z={below:.6g} mm and z={above:.6g} mm: 2.6 mm apart"))


def test_missing_slice_refused_at_routing(series, tmp_path):
    _refused(variants.write(variants.without(series, 4), tmp_path), "missing slice between")


def test_routing_check_passes_a_good_series_and_leaves_pixels_to_the_loader(series, tmp_path):
    """check_series reads headers only: a conflicting duplicate (only pixels show it) passes it."""
    assert check_series(variants.write(series, tmp_path / "good")) == ()
    conflicting = variants.write(variants.with_duplicate(series, 3, conflicting=True), tmp_path / "conflicting")
    assert check_series(conflicting) == ()
    with pytest.raises(SeriesGeometryError, match="hold different pixel values"):
        load_series(conflicting)


def test_enhanced_ct_with_per_frame_orientation_only_refused(series, tmp_path):
    """A SEG (highdicom) needs Plane Orientation and Pixel Measures shared: refused before inference."""
    enhanced = variants.enhanced_ct(series, per_frame_rescale=False)
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    for item in enhanced.PerFrameFunctionalGroupsSequence:
        item.PlaneOrientationSequence = copy.deepcopy(shared.PlaneOrientationSequence)
    del shared.PlaneOrientationSequence
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    _refused([path], re.escape(f"multi-frame instance {enhanced.SOPInstanceUID} has PlaneOrientationSequence only "
                               "per frame, not in the Shared Functional Groups: a SEG cannot reference its frames"))


def test_enhanced_ct_with_frames_of_mixed_orientations_refused(series, tmp_path):
    enhanced = variants.enhanced_ct(series, per_frame_rescale=False)
    for index, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence):
        orientation = [1, 0, 0, 0, 1, 0] if index % 2 else [1, 0, 0, 0, 0, -1]
        item.PlaneOrientationSequence = variants._item(ImageOrientationPatient=orientation)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    _refused([path], "mixed orientations: 2 stacks with different Image Orientation")


def test_two_multiframe_instances_refused(series, tmp_path):
    halves = [variants.enhanced_ct(series[:4], per_frame_rescale=False),
              variants.enhanced_ct(series[4:], per_frame_rescale=False)]
    paths = []
    for index, enhanced in enumerate(halves):
        paths.append(tmp_path / f"{index}.dcm")
        enhanced.save_as(paths[-1], enforce_file_format=True)
    _refused(paths, re.escape("the stack spans 2 multi-frame and 0 single-frame instance(s): a SEG references one "
                              "multi-frame instance or single-frame instances only"))


def test_several_slices_without_position_all_named(series, tmp_path):
    datasets = variants.without_position(variants.without_position(series, 2), 6)
    uids = (str(series[2].SOPInstanceUID), str(series[6].SOPInstanceUID))
    error = _refused(variants.write(datasets, tmp_path),
                     "and 1 other frame\\(s\\) of the instances named have no Image Position \\(Patient\\): their "
                     "place in the volume is unknown")
    assert set(error.sop_instance_uids) == set(uids)


def test_slice_without_pixel_data_is_refused_not_left_out(series, tmp_path):
    """A CT slice with its plane but no Pixel Data is a broken slice, not a non-image to exclude."""
    datasets = [copy.deepcopy(ds) for ds in series]
    del datasets[0].PixelData  # the lowest slice: leaving it out would leave no gap to notice
    error = _refused(variants.write(datasets, tmp_path), "no Pixel Data")
    assert error.sop_instance_uids == (str(series[0].SOPInstanceUID),)


def test_orientation_with_wrong_value_count_named(series, tmp_path):
    datasets = [copy.deepcopy(ds) for ds in series]
    datasets[3].ImageOrientationPatient = [1, 0, 0]
    _refused(variants.write(datasets, tmp_path), re.escape("Image Orientation (Patient) has 3 values, not 6"))
