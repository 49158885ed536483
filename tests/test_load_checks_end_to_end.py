"""The node with real peers on what a model cannot use, and on multi-frame CT.

storescu sends each series to `dicom-node serve` running the shipped
`spleen_ct` pipeline with the real spleen model. Series the headers condemn
(colour pixels, two Frames of Reference, a duplicate position, a missing slice,
a slice without Image Position (Patient)) are quarantined at routing with a
reason naming the problem, and no job is made, so no inference runs. Enhanced
CT and Legacy Converted Enhanced CT series get a SEG in Orthanc that is
dciodvfy clean and references each frame of the multi-frame source.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference import tasks
from tests import volume_variants as variants
from tests.model_repository import install_spleen_model
from tests.peers import dciodvfy, dcmtk, free_port, orthanc, wait_for
from tests.series_factory import ct_datasets
from tests.test_orthanc_end_to_end import (SHIPPED_PIPELINES, download, expected_inference, overrides,
                                           study_series)
from tests.test_receive import running_node

pytestmark = pytest.mark.skipif(not (dcmtk.available() and orthanc.available() and dciodvfy.available()),
                                reason="dcmtk, Orthanc and dciodvfy needed")

SPLEEN = {"spleen_ct": SHIPPED_PIPELINES["spleen_ct"]}


class _NoPacs:
    """A destination nothing listens on: a refused series must never produce anything to send."""

    ae_title = "NOPACS"

    def __init__(self) -> None:
        self.dicom_port = free_port()


def _refused_series(tmp_path: Path) -> dict[str, tuple[list[Path], str]]:
    """Each condemned series on disk, with the words its quarantine reason must hold."""
    def series():
        return variants.small_series(n_slices=12)  # new UIDs each time; 12 slices pass `number_of_slices`

    rgb = series()
    mixed = variants.with_frame_of_reference(series(), 4)
    near = variants.with_near_duplicate(series(), 5, 0.4)
    gap = series()
    unplaced = series()
    z = float(near[5].ImagePositionPatient[2])
    below, above = (float(gap[i].ImagePositionPatient[2]) for i in (5, 7))
    return {
        "rgb": (variants.write(variants.in_colour(rgb, "RGB"), tmp_path / "rgb"),
                "Photometric Interpretation RGB with 3 sample(s) per pixel in 12 of 12 frames"),
        "frame-of-reference": (variants.write(mixed, tmp_path / "for"),
                               f"mixed Frame of Reference UIDs: {mixed[0].FrameOfReferenceUID} in 8 frame(s), "
                               f"{mixed[-1].FrameOfReferenceUID} in 4"),
        "duplicate": (variants.write(near, tmp_path / "duplicate"),
                      f"duplicate slice position z={z:.6g} mm: instances {near[5].SOPInstanceUID} and "
                      f"{near[-1].SOPInstanceUID} are 0.4 mm apart"),
        "gap": (variants.write(variants.without(gap, 6), tmp_path / "gap"),
                f"missing slice between z={below:.6g} mm and z={above:.6g} mm"),
        "no-position": (variants.write(variants.without_position(unplaced, 3), tmp_path / "no-position"),
                        f"instance {unplaced[3].SOPInstanceUID} has no Image Position (Patient)"),
    }


def test_condemned_series_are_quarantined_at_routing_with_the_reason_and_no_job(tmp_path):
    install_spleen_model(tmp_path / "models")
    refused = _refused_series(tmp_path)
    with running_node(tmp_path / "node", **overrides(_NoPacs(), tmp_path / "models", pipelines=SPLEEN)) as node:
        for files, _ in refused.values():
            result = dcmtk.storescu(node.port, files)
            assert result.returncode == 0, result.output
        journal = node.journal()
        try:
            for name, (files, words) in refused.items():
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                record = wait_for(lambda: (r := journal.get_series(uid)) and r.state not in ("receiving", "complete")
                                  and r, 60, f"{name} series routed")
                assert record.state == "quarantined", (name, record.state, record.reason)
                assert record.reason.startswith("refused before inference (spleen_ct): SeriesGeometryError: "), name
                assert words in record.reason, (name, record.reason)
                assert f"series {uid} generation 1 quarantined: refused before inference" in node.log_text(), name
            assert journal.jobs_in_state("queued", "running", "done", "failed") == []
        finally:
            journal.close()
        assert node.process.alive()


def test_multiframe_ct_gets_a_seg_referencing_its_frames_in_orthanc(tmp_path):
    """One real 20-slice CT as an Enhanced CT and as a Legacy Converted Enhanced CT (two studies)."""
    slices = list(ct_datasets(20))
    single = variants.write(slices, tmp_path / "single")
    sources = {}
    for kind, build in variants.MULTIFRAME.items():
        datasets = [variants.renamed(ds) for ds in slices]
        study, series = hd.UID(), hd.UID()
        for ds in datasets:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        path = tmp_path / kind / "multiframe.dcm"
        path.parent.mkdir()
        build(datasets).save_as(path, enforce_file_format=True)
        sources[kind] = path
    install_spleen_model(tmp_path / "models")
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, tmp_path / "models", pipelines=SPLEEN)) as node:
        for path in sources.values():
            # -R: propose the files' own SOP Classes (storescu's default list lacks Legacy Converted Enhanced CT).
            result = dcmtk.storescu(node.port, [path], extra=["-R"])
            assert result.returncode == 0, result.output
        segs = {}
        for kind, path in sources.items():
            study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            (held,) = wait_for(lambda: study_series(pacs, study).get("SEG"), 300, f"the {kind} SEG in Orthanc")
            (segs[kind],) = download(pacs, held, tmp_path / "from_orthanc" / kind)
        assert node.process.alive()

    loaded, repository, backend = expected_inference(single, tmp_path / "models")
    try:
        spleen = tasks.segment(loaded.volume, repository.get("spleen_ct"), backend).volume.array == 1
    finally:
        backend.close()
    assert spleen.sum() > 1000
    for kind, path in sources.items():
        validation = dciodvfy.validate(segs[kind])
        assert validation.errors == [], (kind, validation.report())
        source = pydicom.dcmread(path, stop_before_pixels=True)
        seg = hd.seg.segread(segs[kind])
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.NumberOfFrames == source.NumberOfFrames == 20
        referenced = []
        for item in seg.PerFrameFunctionalGroupsSequence:
            (reference,) = item.DerivationImageSequence[0].SourceImageSequence
            assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID, kind
            frame = int(reference.ReferencedFrameNumber)
            position = source.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
            assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
                [float(v) for v in position.ImagePositionPatient]), kind
            referenced.append(frame)
        assert sorted(referenced) == list(range(1, 21)), kind
        # Frame by frame, the SEG is the spleen the model finds on the same slices sent single-frame.
        by_z = sorted(range(1, 21), key=lambda f: float(
            source.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient[2]))
        pixels = seg.get_pixels_by_source_frame(str(source.SOPInstanceUID), by_z, segment_numbers=[1])
        np.testing.assert_array_equal(pixels[..., 0] > 0, spleen, err_msg=kind)
