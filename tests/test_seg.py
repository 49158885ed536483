"""SEG writer: conformance (dciodvfy), round trip through highdicom, geometry against SimpleITK."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.results import COPIED_TYPE_2, OutputSeries, source_headers
from dicom_node.results.seg import SegOptions, SourceGridError, warm_up, write_seg
from dicom_node.results.segread import read_seg, source_grid
from dicom_node.results.uids import UidError, UidSeed, derive_uid, validate_uid
from inference.results import Algorithm, Code, LabelMap, SegmentLabel
from tests.peers import CT_J2K_SERIES, dciodvfy

pytestmark = dciodvfy.required()

ORGAN = Code("123037004", "SCT", "Anatomical Structure")
SPLEEN = SegmentLabel(1, "spleen", ORGAN, Code("78961009", "SCT", "Spleen"))
RIGHT_LUNG = SegmentLabel(1, "right lung", ORGAN, Code("3341006", "SCT", "Right lung"))
LEFT_LUNG = SegmentLabel(2, "left lung", ORGAN, Code("44029006", "SCT", "Left lung"))
ALGORITHM = Algorithm(name="spleen-unet", version="1.2.0", source="models/spleen")


@lru_cache(maxsize=1)
def real_sources() -> tuple[pydicom.Dataset, ...]:
    """Headers of the shared 20-slice CT, sorted by position along the slice normal."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(CT_J2K_SERIES.iterdir())]
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    # The shared series is anonymised: empty Study/Series UIDs (a PACS would hold
    # some, fixed here) and empty SOP Class/Instance UIDs (kept in the File Meta).
    for ds in headers:
        ds.StudyInstanceUID = derive_uid(None, "test study", CT_J2K_SERIES.name)
        ds.SeriesInstanceUID = derive_uid(None, "test series", CT_J2K_SERIES.name)
    return tuple(source_headers(headers))


def blob_mask(shape: tuple[int, int, int], centre: tuple[int, int], radius: int, first: int, last: int) -> np.ndarray:
    """A disc per slice between `first` and `last` (inclusive), radius varying so no two slices match."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    radii = np.where((k >= first) & (k <= last), radius - np.abs(k - (first + last) / 2), 0)
    return (((j - centre[0]) ** 2 + (i - centre[1]) ** 2) < radii**2).astype(np.uint8)


def label_map(array: np.ndarray, segments=(SPLEEN,)) -> LabelMap:
    return LabelMap(source_grid(real_sources()).with_array(array), tuple(segments), ALGORITHM)


def spleen_map() -> LabelMap:
    return label_map(blob_mask((20, 512, 512), (300, 380), 40, 3, 15))  # not symmetric in k: a flip shows


def lung_map() -> LabelMap:
    array = blob_mask((20, 512, 512), (250, 150), 60, 0, 19)
    array[blob_mask((20, 512, 512), (250, 360), 50, 2, 17) > 0] = 2
    return label_map(array, (RIGHT_LUNG, LEFT_LUNG))


def seg_options(pipeline: str = "abdomen", generation: int = 1, **kwargs) -> SegOptions:
    seed = UidSeed(str(real_sources()[0].SeriesInstanceUID), generation, pipeline, "1.2.826.0.1.3680043.10.1234")
    return SegOptions(series=OutputSeries(seed, series_number=9901, series_description="AI spleen"), **kwargs)


def assert_valid(path: Path) -> None:
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()


@pytest.mark.parametrize("compress", [True, False], ids=["jpeg2000-lossless", "explicit-le"])
def test_binary_seg_round_trips_through_highdicom(tmp_path: Path, compress: bool) -> None:
    sources = real_sources()
    labels = lung_map()
    path = write_seg(labels, sources, tmp_path, seg_options(compress=compress))
    assert_valid(path)

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2.4.90" if compress else "1.2.840.10008.1.2.1")
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert (seg.SeriesNumber, seg.SeriesDescription) == (9901, "AI spleen")
    # omit_empty_frames is off: one frame per source slice per segment.
    assert seg.NumberOfFrames == 2 * len(sources)
    source_uids = [str(s.SOPInstanceUID) for s in sources]
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == sorted(source_uids)

    pixels = seg.get_pixels_by_source_instance(source_uids, segment_numbers=[1, 2])
    for k in range(len(sources)):
        np.testing.assert_array_equal(pixels[k, :, :, 0], labels.volume.array[k] == 1, err_msg=f"slice {k}")
        np.testing.assert_array_equal(pixels[k, :, :, 1], labels.volume.array[k] == 2, err_msg=f"slice {k}")

    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx([float(v) for v in by_uid[source_uid].ImagePositionPatient])

    types = {d.segment_number: d.segmented_property_type.value for d in map(seg.get_segment_description, [1, 2])}
    assert types == {1: "3341006", 2: "44029006"}
    algorithm = seg.get_segment_description(1).algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("spleen-unet", "1.2.0")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"


def test_sources_without_the_type_2_patient_and_study_attributes_still_get_results(tmp_path: Path) -> None:
    """An export that drops the empty Patient and Study attributes (PatientBirthDate, AccessionNumber, ...)
    instead of sending them empty: SEG and SR carry them empty, and the source's other values."""
    from dicom_node.results.sr import ReportContent, SrOptions, write_report
    from tests.test_sr import RESULT

    stripped = []
    for source in real_sources():
        copy = pydicom.Dataset(source)
        copy.file_meta = source.file_meta
        for keyword in COPIED_TYPE_2:
            copy.pop(keyword, None)
        copy.PatientID = "EXPORT-17"
        stripped.append(copy)
    seed = UidSeed(str(stripped[0].SeriesInstanceUID), 1, "abdomen")
    seg_path = write_seg(spleen_map(), stripped, tmp_path, seg_options())
    sr_path = write_report(ReportContent((), (RESULT,)), stripped, tmp_path,
                           SrOptions(OutputSeries(seed, series_number=9902, series_description="AI report")))
    for path in (seg_path, sr_path):
        assert_valid(path)
        result = pydicom.dcmread(path)
        assert result.PatientID == "EXPORT-17"
        assert all(keyword in result and not result[keyword].value
                   for keyword in COPIED_TYPE_2 if keyword != "PatientID")
    assert "PatientBirthDate" not in stripped[0]  # the caller's headers are left as they were


def test_warm_up_builds_a_valid_seg(tmp_path: Path) -> None:
    path = tmp_path / "warm-up.dcm"
    path.write_bytes(warm_up())
    assert_valid(path)
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == 2 and seg.get_segment_description(1).segment_label == "warm-up"


def test_seg_overlays_the_source_volume_read_by_simpleitk(tmp_path: Path) -> None:
    labels = spleen_map()
    path = write_seg(labels, real_sources(), tmp_path, seg_options())

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_J2K_SERIES)))
    ct = reader.Execute()
    # The SEG read on its own grid (frame positions only, no source headers).
    own = read_seg(path).masks[1].to_sitk()
    assert own.GetSize() == ct.GetSize()
    np.testing.assert_allclose(own.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(own.GetSpacing(), ct.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(own.GetDirection(), ct.GetDirection(), atol=1e-6)
    # Same voxels where the label map put them, in SimpleITK's physical space.
    expected = labels.volume.to_sitk()
    resampled = sitk.Resample(own, ct, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(expected))
    # GDCM itself (SimpleITK's DICOM reader) on a native SEG: its frame geometry, its 0/255 unpacking.
    native = write_seg(labels, real_sources(), tmp_path / "native", seg_options(compress=False))
    gdcm = sitk.Resample(sitk.ReadImage(str(native)), ct, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(gdcm) > 0, labels.volume.array > 0)
    # And on the referenced source grid, matched by SOP Instance UID.
    on_sources = read_seg(path, real_sources())
    np.testing.assert_array_equal(on_sources.masks[1].array, labels.volume.array)
    assert on_sources.masks[1].same_grid(labels.volume)


def test_empty_mask_is_written_with_suffix_or_skipped(tmp_path: Path) -> None:
    empty = label_map(np.zeros((20, 512, 512), np.uint8))
    path = write_seg(empty, real_sources(), tmp_path / "write", seg_options(omit_empty_frames=True))
    assert_valid(path)
    seg = hd.seg.segread(path)
    assert seg.SeriesDescription == "AI spleen (empty)"
    assert seg.NumberOfFrames == len(real_sources())
    assert not seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in real_sources()]).any()

    assert write_seg(empty, real_sources(), tmp_path / "skip", seg_options(empty="skip")) is None
    assert not (tmp_path / "skip").exists()


def test_omit_empty_frames_writes_only_slices_with_segment_pixels(tmp_path: Path) -> None:
    labels = spleen_map()
    path = write_seg(labels, real_sources(), tmp_path, seg_options(omit_empty_frames=True))
    assert_valid(path)
    assert hd.seg.segread(path).NumberOfFrames == int(labels.volume.array.any(axis=(1, 2)).sum())
    np.testing.assert_array_equal(read_seg(path, real_sources()).masks[1].array, labels.volume.array)


def test_rerun_writes_the_same_uids(tmp_path: Path) -> None:
    first = pydicom.dcmread(write_seg(spleen_map(), real_sources(), tmp_path / "a", seg_options()))
    again = pydicom.dcmread(write_seg(spleen_map(), real_sources(), tmp_path / "b", seg_options()))
    other = pydicom.dcmread(write_seg(spleen_map(), real_sources(), tmp_path / "c", seg_options(generation=2)))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.1234.")
    assert {first.SOPInstanceUID, first.SeriesInstanceUID}.isdisjoint({other.SOPInstanceUID, other.SeriesInstanceUID})


def test_label_values_that_are_not_1_to_n_become_segments_1_to_n(tmp_path: Path) -> None:
    array = lung_map().volume.array * 3  # labels 3 and 6
    segments = (replace(RIGHT_LUNG, value=3), replace(LEFT_LUNG, value=6))
    path = write_seg(label_map(array, segments), real_sources(), tmp_path, seg_options())
    masks = read_seg(path, real_sources())
    np.testing.assert_array_equal(masks.masks[1].array, array == 3)
    np.testing.assert_array_equal(masks.masks[2].array, array == 6)
    assert masks.segments[2].type.meaning == "Left lung"


def test_labelmap_option_round_trips(tmp_path: Path) -> None:
    """LABELMAP is 66.7, which dciodvfy (and Orthanc, storescu) do not know yet: round trip only."""
    labels = lung_map()
    path = write_seg(labels, real_sources(), tmp_path, seg_options(segmentation_type="LABELMAP"))
    masks = read_seg(path, real_sources())
    assert masks.segmentation_type == "LABELMAP"
    np.testing.assert_array_equal(masks.masks[2].array, labels.volume.array == 2)


def test_label_map_off_the_source_grid_is_refused(tmp_path: Path) -> None:
    reversed_sources = real_sources()[::-1]
    with pytest.raises(SourceGridError, match="label map slice 0"):
        write_seg(spleen_map(), reversed_sources, tmp_path, seg_options())
    with pytest.raises(SourceGridError, match="20 slices but 19"):
        write_seg(spleen_map(), real_sources()[:19], tmp_path, seg_options())
    undescribed = label_map(lung_map().volume.array)  # value 2 present, only SPLEEN described
    with pytest.raises(ValueError, match=r"values \[2\]"):
        write_seg(undescribed, real_sources(), tmp_path, seg_options())
    assert list(tmp_path.iterdir()) == []


def test_slightly_uneven_slices_keep_their_own_positions(tmp_path: Path) -> None:
    """The loader accepts 5 % uneven spacing; each frame must still carry its source's true position."""
    uneven = [pydicom.Dataset(s) for s in real_sources()]
    uneven[7].ImagePositionPatient = [*uneven[7].ImagePositionPatient[:2], float(uneven[7].ImagePositionPatient[2]) + 0.1]
    seg = hd.seg.segread(write_seg(spleen_map(), uneven, tmp_path, seg_options()))
    positions = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID:
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert positions[uneven[7].SOPInstanceUID] == pytest.approx(float(uneven[7].ImagePositionPatient[2]))


def test_derived_uids_are_valid_stable_and_distinct() -> None:
    seed = UidSeed("1.2.3.4", 7, "lungs")
    assert seed.instance_uid("seg") == UidSeed("1.2.3.4", 7, "lungs").instance_uid("seg")
    uids = {seed.series_uid("seg"), seed.instance_uid("seg"), seed.series_uid("sr"), seed.instance_uid("overlay", 0),
            seed.instance_uid("overlay", 1), UidSeed("1.2.3.4", 8, "lungs").instance_uid("seg")}
    assert len(uids) == 6
    rooted = UidSeed("1.2.3.4", 7, "lungs", org_root="1.2.826.0.1.3680043.10.1234").instance_uid("overlay", 299)
    for uid in (*uids, rooted):
        assert validate_uid(uid) == uid and len(uid) <= 64
    with pytest.raises(UidError, match="leaves"):
        derive_uid("1.2.826.0.1.3680043.10.1234.5678.9999.1111.2222", "x")
    with pytest.raises(UidError, match="leading zeros"):
        derive_uid("1.2.03", "x")


def test_options_from_results_config() -> None:
    from dicom_node.config.results import ResultsConfig
    results = ResultsConfig(org_root="1.2.826.0.1.3680043.10.1234", compress_frames=False,
                                   empty_segmentation="skip", seg_omit_empty_frames=True)
    series = OutputSeries.from_config(results, kind="seg", series_instance_uid="1.2.3", generation=1,
                                      pipeline="abdomen", position=0, description="spleen")
    assert (series.series_number, series.series_description, series.manufacturer) == (9901, "AI spleen", "dicom-node")
    assert series.seed.instance_uid("seg").startswith("1.2.826.0.1.3680043.10.1234.")
    options = SegOptions.from_config(results, series)
    assert (options.compress, options.empty, options.omit_empty_frames) == (False, "skip", True)


def test_series_numbers_differ_per_pipeline_output_and_generation() -> None:
    """Two result series of one study never share a SeriesNumber: not two pipelines' SEGs, not a SEG and
    an SR, not the results of a series sent again; a job run again keeps its number."""
    from dicom_node.config.results import ResultsConfig
    from dicom_node.results import series_number
    results = ResultsConfig()
    numbers = {(kind, position, generation): series_number(results, kind, position, generation)
               for kind in ("seg", "sr", "overlay") for position in range(12) for generation in (1, 2, 3)}
    assert len(set(numbers.values())) == len(numbers)
    assert (numbers["seg", 0, 1], numbers["sr", 0, 1], numbers["seg", 1, 1], numbers["sr", 1, 1]) == (
        9901, 9902, 9911, 9912)
    assert series_number(results, "seg", 1, 2) == numbers["seg", 1, 2] == 10911
    with pytest.raises(ValueError, match="within 10"):
        ResultsConfig(seg_series_number=9901, sr_series_number=9911)
    with pytest.raises(ValueError, match="must differ"):
        ResultsConfig(seg_series_number=9901, sr_series_number=9901)
