"""A step whose model is missing or broken fails alone; the node stays ready to take images.

The shipped config.yaml's pipelines (spleen_ct and chest_ct) run in `dicom-node serve` with Orthanc
as the PACS. A CHEST series matches both, so one study shows what each pipeline delivers while a
model of the other is missing or broken, and that their result series carry different
SeriesNumbers. The series are the shared real slices (an abdomen with lung bases, sent as CHEST)
and, where the classifier must see lungs, the chest phantom.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.results import series_number
from tests.model_repository import install_spleen_model
from tests.peers import dciodvfy, dcmtk, orthanc, wait_for
from tests.phantoms import chest_phantom, write_ct_volume
from tests.series_factory import write_ct_series
from tests.test_api import get_json, http, samples
from tests.test_cli_ops import cli
from tests.test_orthanc_end_to_end import (SHIPPED_PIPELINES, covid_repository, download, overrides, study_series,
                                           uid_of)
from tests.test_receive import running_node
from tests.test_sr import comments, step_texts

pytestmark = pytest.mark.skipif(not (dcmtk.available() and orthanc.available() and dciodvfy.available()),
                                reason="dcmtk, Orthanc and dciodvfy needed")

NOT_INSTALLED = "Step covid: not run: model covid19_ct is not installed or not usable: "


def chest_series(out_dir: Path) -> list[Path]:
    """The shared real slices (tests/series_factory.py) as a CHEST series."""
    files = write_ct_series(out_dir, 20)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "CHEST"
        ds.save_as(path, enforce_file_format=True)
    return files


def results_by_number(pacs: orthanc.Orthanc, study_uid: str, count: int) -> dict[int, dict]:
    """The study's result series in Orthanc by SeriesNumber, once there are `count` of them."""
    def found():
        held = [s for series in study_series(pacs, study_uid).values() for s in series]
        return len(held) >= count and held
    held = wait_for(found, 300, f"{count} result series in Orthanc")
    numbers = {int(s["MainDicomTags"]["SeriesNumber"]): s for s in held}
    assert len(numbers) == len(held), "two result series of one study share a SeriesNumber"
    return numbers


def job_of(node, pipeline: str) -> dict:
    listed = cli("jobs", "--config", node.config_path, "--json", "list")
    assert listed.returncode == 0, listed.stderr
    (job,) = [j for j in json.loads(listed.stdout) if j["pipeline"] == pipeline]
    return job


def numbers(node, pipeline: str, kinds: str = "seg sr") -> list[int]:
    """The SeriesNumbers the node's config gives the pipeline's first-generation results of `kinds`."""
    config = load_config(node.config_path)
    position = list(config.pipelines).index(pipeline)
    return [series_number(config.results, kind, position, 1) for kind in kinds.split()]


def corrupt(model: Path) -> None:
    model.write_bytes(b"not an ONNX model")


def test_shipped_config_without_classifier_delivers_lungs_and_says_why_covid_did_not_run(tmp_path):
    """No covid19_ct installed: the node is ready, chest_ct degraded in every view (exit 0 unless
    --strict), and a CHEST series gets the spleen SEG, the lung SEG and an SR saying the classifier
    did not run, with a WARNING line and no traceback in the log."""
    models = tmp_path / "models"
    install_spleen_model(models)
    files = chest_series(tmp_path / "series")
    study_uid = uid_of(files[0], "StudyInstanceUID")
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, models, pipelines=SHIPPED_PIPELINES)) as node:
        assert get_json(node, "/readyz")["ready"]
        health = {p["pipeline"]: p for p in get_json(node, "/v1/status")["pipelines"]}
        assert (health["spleen_ct"]["state"], health["chest_ct"]["state"]) == ("ready", "degraded")
        (reason,) = health["chest_ct"]["reasons"]
        assert reason.startswith("step covid: model covid19_ct not available: ") and "not in the model repository" \
            in reason
        metrics = samples(node)
        assert [metrics[("dicom_node_pipeline_ready", (("pipeline", name),))] for name in ("spleen_ct", "chest_ct")] \
            == [1, 0]
        status = cli("status", "--config", node.config_path)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"\n{'  chest_ct':22} degraded ({reason})\n" in status.stdout, status.stdout
        assert f"\n{'  spleen_ct':22} ready\n" in status.stdout
        assert cli("status", "--strict", "--config", node.config_path).returncode == 1
        check = cli("models", "--config", node.config_path, "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "spleen_ct: ok (embedded)" in check.stdout and f"pipeline chest_ct: degraded ({reason})" in check.stdout
        assert "pipeline spleen_ct: ready" in check.stdout
        assert cli("models", "--config", node.config_path, "check", "--strict").returncode == 1

        assert dcmtk.storescu(node.port, files).returncode == 0
        held = results_by_number(pacs, study_uid, 3)
        (spleen_seg,), (lung_seg, sr_number) = numbers(node, "spleen_ct", "seg"), numbers(node, "chest_ct")
        assert {n: s["MainDicomTags"]["Modality"] for n, s in held.items()} == {
            spleen_seg: "SEG", lung_seg: "SEG", sr_number: "SR"}
        (lung_seg,) = download(pacs, held[lung_seg], tmp_path / "lungs")
        (sr_path,) = download(pacs, held[sr_number], tmp_path / "sr")
        chest = job_of(node, "chest_ct")
        assert chest["state"] == "done" and chest["error"] is None
        assert [(s["step"], s["state"]) for s in chest["steps"]] == [("lungs", "ok"), ("involvement", "ok"),
                                                                     ("covid", "failed")]
        detail = get_json(node, f"/v1/jobs/{chest['id']}")
        assert detail["steps"] == chest["steps"] and len(detail["exports"]) == 2  # the lung SEG and the SR
        figures = detail["lung_involvement"]
        shown = cli("jobs", "--config", node.config_path, "show", str(chest["id"])).stdout
        assert "step covid           failed: model covid19_ct is not installed" in shown, shown
        assert job_of(node, "spleen_ct")["steps"] == [{"step": "spleen", "state": "ok", "reason": None}]
        assert get_json(node, "/readyz")["ready"]

    for path in (lung_seg, sr_path):
        validation = dciodvfy.validate(path)
        assert validation.errors == [], validation.report()
    assert pydicom.dcmread(lung_seg).SegmentSequence[0].SegmentLabel  # the lung step's segments, whatever it found
    sr = hd.sr.srread(sr_path)
    # One report: these 20 slices hold no lung, so no measurement, no probabilities, and why for each.
    assert sr.StudyInstanceUID == study_uid and figures["sop_instance_uid"] == sr.SOPInstanceUID
    assert figures["category"] == "not assessed"
    assert sr.content.get_volumetric_roi_measurement_groups() == sr.content.get_image_measurement_groups() == []
    texts = comments(sr)
    assert texts[:3] == ["Lung involvement: not assessed, no lung found in the series", "Step lungs: completed",
                         "Step involvement: completed"]
    assert texts[3].startswith(NOT_INSTALLED) and len(texts) == 4, texts
    dump = dcmtk.dsrdump(sr_path)
    assert dump.returncode == 0 and NOT_INSTALLED in dump.stdout, dump.stdout + dump.stderr

    log = node.log_text()
    warnings = [line for line in log.splitlines() if f"job {chest['id']} (chest_ct): step covid not run" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "model covid19_ct" in warnings[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_broken_model_fails_its_own_pipeline_step_only(tmp_path):
    """A broken spleen model leaves the chest results (lung SEG, SR with the test classifier's
    probabilities) as they are; then a broken classifier leaves the lungs delivered, its SR saying why."""
    models = tmp_path / "models"
    corrupt(install_spleen_model(models) / "1" / "model.onnx")
    covid_repository(models)
    first = write_ct_volume(chest_phantom().volume, tmp_path / "first")
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, models, pipelines=SHIPPED_PIPELINES)) as node:
        health = {p["pipeline"]: p["state"] for p in get_json(node, "/v1/status")["pipelines"]}
        assert health == {"spleen_ct": "degraded", "chest_ct": "ready"}
        assert dcmtk.storescu(node.port, first).returncode == 0
        seg_number, sr_number = numbers(node, "chest_ct")
        held = results_by_number(pacs, uid_of(first[0], "StudyInstanceUID"), 2)
        assert {n: s["MainDicomTags"]["Modality"] for n, s in held.items()} == {seg_number: "SEG", sr_number: "SR"}
        (sr_path,) = download(pacs, held[sr_number], tmp_path / "first-sr")
        sr = hd.sr.srread(sr_path)
        probabilities = [m.value for g in sr.content.get_image_measurement_groups() for m in g.get_measurements()
                         if m.name.value == "122157"]
        assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert len(sr.content.get_volumetric_roi_measurement_groups()) == 8  # 2 lungs, 6 zones: the same report
        assert step_texts(sr) == ["Step lungs: completed", "Step involvement: completed", "Step covid: completed"]
        spleen = wait_for(lambda: (j := job_of(node, "spleen_ct"))["state"] == "failed" and j, 60, "spleen failed")
        assert spleen["error"].startswith("no step gave a result: spleen: failed (BackendError: ")
        assert "Traceback" in node.log_text()  # an unexpected failure keeps its traceback

        corrupt(models / "covid19_ct" / "1" / "model.onnx")
        second = write_ct_volume(chest_phantom(seed=1).volume, tmp_path / "second")
        assert dcmtk.storescu(node.port, second).returncode == 0
        held = results_by_number(pacs, uid_of(second[0], "StudyInstanceUID"), 2)
        assert {n: s["MainDicomTags"]["Modality"] for n, s in held.items()} == {seg_number: "SEG", sr_number: "SR"}
        (seg_path,) = download(pacs, held[seg_number], tmp_path / "second-seg")
        (sr_path,) = download(pacs, held[sr_number], tmp_path / "second-sr")
        assert http(node, "/readyz")[0] == 200

    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence][:2] == ["Right lung", "Left lung"]  # both lungs of the phantom
    assert len(seg.SegmentSequence) == 4 and seg.NumberOfFrames > 0  # and the involvement step's opacities
    texts = step_texts(hd.sr.srread(sr_path))
    assert texts[:2] == ["Step lungs: completed", "Step involvement: completed"], texts
    assert texts[2].startswith("Step covid: not run: BackendError: ") and "ONNX Runtime cannot load" in texts[2]
