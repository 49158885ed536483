"""Results of a multi-frame CT source (Enhanced CT, Legacy Converted Enhanced CT): each SEG frame, overlay
instance and SR reference names the source instance and, where the object has frames, the exact source frame."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results.overlay import write_overlay
from dicom_node.results.seg import write_seg
from dicom_node.results.sr import ReportContent, write_report
from dicom_node.pipeline.volume import LoadedSeries, load_series
from inference.results import LabelMap
from tests import volume_variants as variants
from tests.peers import dciodvfy
from tests.test_overlay import overlay_options
from tests.test_seg import ALGORITHM, SPLEEN, seg_options
from tests.test_sr import RESULT, sr_options

pytestmark = pytest.mark.skipif(not dciodvfy.available(), reason="dciodvfy (dicom3tools) not installed")


def _multiframe(kind: str, out_dir: Path) -> tuple[LoadedSeries, pydicom.Dataset, LabelMap]:
    """A multi-frame CT of the real slices on disk, loaded, its header, and a label map on it that differs
    on every slice (so a frame matched to the wrong source frame shows)."""
    source = variants.MULTIFRAME[kind](variants.small_series())
    path = out_dir / "multiframe.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    source.save_as(path, enforce_file_format=True)
    loaded = load_series([path])
    array = np.zeros(loaded.volume.shape, np.uint8)
    for k in range(array.shape[0]):
        array[k, 10 + 3 * k: 30, 5: 20 + 2 * k] = 1
    return loaded, pydicom.dcmread(path, stop_before_pixels=True), LabelMap(
        loaded.volume.with_array(array), (SPLEEN,), ALGORITHM)


def _position(source: pydicom.Dataset, frame_number: int) -> list[float]:
    item = source.PerFrameFunctionalGroupsSequence[frame_number - 1]
    return [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]


@pytest.mark.parametrize("kind", sorted(variants.MULTIFRAME))
def test_seg_references_the_frames_of_a_multiframe_source(tmp_path, kind):
    loaded, source, labels = _multiframe(kind, tmp_path)
    frames = [s.frame_number for s in loaded.slices]
    assert sorted(frames) == list(range(1, len(frames) + 1))
    path = write_seg(labels, [source] * len(frames), tmp_path / "seg", seg_options(), frames)
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()

    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == len(frames)  # one frame per source frame (one segment)
    for item in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = item.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        # The SEG frame lies on the source frame it names.
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            _position(source, int(reference.ReferencedFrameNumber)))
    pixels = seg.get_pixels_by_source_frame(str(source.SOPInstanceUID), frames, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], labels.volume.array)


@pytest.mark.parametrize("kind", sorted(variants.MULTIFRAME))
def test_overlay_and_sr_reference_the_multiframe_source(tmp_path, kind):
    loaded, source, labels = _multiframe(kind, tmp_path)
    frames = [s.frame_number for s in loaded.slices]
    paths = write_overlay(labels, [source] * len(frames), loaded.volume, tmp_path / "overlay", overlay_options(),
                          frames)
    assert len(paths) == len(frames)
    validation = dciodvfy.validate(paths[0])
    assert validation.errors == [], validation.report()
    for k, path in enumerate(paths):
        (reference,) = pydicom.dcmread(path, stop_before_pixels=True).SourceImageSequence
        assert (reference.ReferencedSOPInstanceUID, reference.ReferencedFrameNumber) == (source.SOPInstanceUID,
                                                                                         frames[k])

    sr_path = write_report(ReportContent(classifications=(RESULT,)), [source] * len(frames), tmp_path / "sr",
                           sr_options())
    validation = dciodvfy.validate(sr_path)
    assert validation.errors == [], validation.report()
    sr = pydicom.dcmread(sr_path)
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == [source.SOPInstanceUID]
