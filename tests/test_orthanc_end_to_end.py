"""The whole node with Orthanc as the PACS: storescu -> `dicom-node serve` -> pipeline -> Orthanc.

Orthanc (tests/peers/orthanc.py) runs as a real foreground process; what it
holds is read back over its REST API, and with `verbose` its log counts every
C-STORE it was sent, so a resend of an instance it already has (which
/instances would list once) is still seen. The pipelines are the shipped
config.yaml's own `spleen_ct` and `chest_ct`; the expected results are
computed here with the project's inference code on the same files.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml

from dicom_node.config import Config, ConfigError, load_config
from dicom_node.results.segread import read_seg
from dicom_node.pipeline.route import match_pipelines, unmatched_reasons
from dicom_node.pipeline.volume import load_series
from inference import tasks
from inference.backends import BackendSettings, open_backend
from inference.involvement import quantify_involvement
from inference.lung import segment_lungs_classical
from inference.repository import ModelRepository
from tests.peers import REPO, dciodvfy, dcmtk, free_port, needs, orthanc, wait_for
from tests.chest_phantoms import CONSOLIDATION, GROUND_GLASS, Lesion, chest_case
from tests.phantoms import chest_phantom, write_ct_volume
from tests.test_classify import mean_classifier
from tests.test_end_to_end import LUNGS, _series_state
from tests.model_repository import install_spleen_model
from tests.test_api import get_json
from tests.test_pipeline import real_series
from tests.test_receive import Node, dataset_bytes, running_node
from tests.test_route import AXIAL_CT, series
from tests.test_sr import comments

needs_peers = needs(dcmtk.available() and orthanc.available(), "dcmtk and Orthanc needed (apt-get install dcmtk orthanc)")

SHIPPED_PIPELINES = yaml.safe_load((REPO / "config.yaml").read_text())["pipelines"]
COVID_PIPELINE = """\
task: classification
input: {name: INPUT__0, layout: NCXYZ}
output: {name: OUTPUT__0}
classification:
  classes:
    - {name: non-COVID}
    - name: COVID-19
      code: {value: "840539006", scheme: SCT, meaning: Disease caused by SARS-CoV-2}
  crop_margin_mm: 10
  input_size: [192, 192, 64]
  window: [-1000, 200]
"""


def covid_repository(target: Path) -> None:
    """covid19_ct: logits = mean(lung crop) * w + b (no public COVID-19 weights exist)."""
    entry = target / "covid19_ct"
    (entry / "1").mkdir(parents=True)
    mean_classifier(entry / "1" / "model.onnx", [1, 1, 192, 192, 64], weights=[-4.0, 6.0], bias=[1.0, -0.5])
    (entry / "config.pbtxt").write_text('name: "covid19_ct"\nplatform: "onnxruntime_onnx"\n')
    (entry / "pipeline.yaml").write_text(COVID_PIPELINE)


def overrides(pacs: orthanc.Orthanc, models: Path | None = None, **sections) -> dict:
    """A node config whose destination `pacs` is the Orthanc peer, with short retry delays."""
    destination = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
                   "retry": {"initial_delay_s": 0.5, "max_delay_s": 1, "jitter": 0, "max_attempts": 1000}}
    config = {"destinations": {"pacs": destination}, **sections}
    if models is not None:
        config["inference"] = {"backend": "embedded", "model_repository": str(models),
                               "embedded": {"cpu_threads": 2}}
    return config


def study_series(pacs: orthanc.Orthanc, study_instance_uid: str) -> dict[str, list[dict]]:
    """Orthanc's series of the study by Modality (each with MainDicomTags and Instances)."""
    found: dict[str, list[dict]] = {}
    for study in pacs.find_study(study_instance_uid):
        for found_series in pacs.get(f"/studies/{study}/series"):
            found.setdefault(found_series["MainDicomTags"]["Modality"], []).append(found_series)
    return found


def download(pacs: orthanc.Orthanc, series: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for instance in series["Instances"]:
        path = out_dir / f"{instance}.dcm"
        path.write_bytes(pacs.instance_file(instance))
        paths.append(path)
    return paths


def uid_of(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


def expected_inference(files: list[Path], models: Path):
    """What the node must have computed: the same loader, repository and embedded backend, in this process."""
    repository = ModelRepository(models)
    return load_series(files), repository, open_backend(BackendSettings(kind="embedded", cpu_threads=2))


@needs_peers
def test_real_series_gets_its_spleen_seg_in_orthanc(tmp_path):
    files = real_series(tmp_path / "series")
    study_uid, series_uid = uid_of(files[0], "StudyInstanceUID"), uid_of(files[0], "SeriesInstanceUID")
    install_spleen_model(tmp_path / "models")
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, tmp_path / "models",
                                           pipelines={"spleen_ct": SHIPPED_PIPELINES["spleen_ct"]})) as node:
        result = dcmtk.storescu(node.port, files, extra=["-xv"])
        assert result.returncode == 0, result.output
        series = wait_for(lambda: study_series(pacs, study_uid).get("SEG"), 240, "a SEG series in Orthanc")
        assert set(study_series(pacs, study_uid)) == {"SEG"}  # results only: the source was not forwarded
        (seg_series,) = series
        assert seg_series["MainDicomTags"]["SeriesInstanceUID"] not in ("", series_uid)
        (seg_path,) = download(pacs, seg_series, tmp_path / "from_orthanc")
        assert node.process.alive()
        # Decoded while receiving: every instance prepared before the job started was used by its load.
        journal = node.journal()
        (job,) = journal.jobs_in_state("done")
        journal.close()
        ready = sum(1 for entry in (node.storage / "prepared" / "local").glob("*.npy")
                    if datetime.fromtimestamp(entry.stat().st_mtime, timezone.utc) < job.started_at)
        used = re.search(r"(\d+) of 20 slices decoded while the series arrived", node.log_text())
        assert used is not None, node.log_text()[-3000:]
        assert ready <= int(used[1]) <= 20

    loaded, repository, backend = expected_inference(files, tmp_path / "models")
    try:
        expected = tasks.segment(loaded.volume, repository.get("spleen_ct"), backend)
    finally:
        backend.close()
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    seg = read_seg(seg_path, sources)
    assert uid_of(seg_path, "StudyInstanceUID") == study_uid
    assert seg.segments[1].label == "Spleen"
    spleen = expected.volume.array == 1
    assert spleen.sum() > 1000
    np.testing.assert_array_equal(seg.masks[1].array, spleen)


@needs_peers
def test_chest_pipeline_seg_and_one_report_arrive_in_orthanc(tmp_path):
    """Shipped chest_ct: SEG (lungs, ground-glass, consolidation) and ONE SR with the involvement measurements,
    the classifier's probabilities and how each step went."""
    case = chest_case((Lesion("left", "lower", GROUND_GLASS, posterior_y_mm=20.0),
                       Lesion("right", "middle", CONSOLIDATION, radius_mm=14.0)))
    files = write_ct_volume(case.volume, tmp_path / "phantom")
    study_uid = uid_of(files[0], "StudyInstanceUID")
    covid_repository(tmp_path / "models")
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, tmp_path / "models",
                                           pipelines={"chest_ct": SHIPPED_PIPELINES["chest_ct"]})) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        held = wait_for(lambda: (found := study_series(pacs, study_uid)).keys() >= {"SEG", "SR"} and found, 120,
                        "SEG and SR in Orthanc")
        job = wait_for(lambda: (j := get_json(node, "/v1/jobs/1"))["job"]["state"] == "done"
                       and all(e["state"] == "sent" for e in j["exports"]) and j, 60, "the job's exports sent")
        held = study_series(pacs, study_uid)
        assert set(held) == {"SEG", "SR"} and len(held["SR"]) == 1 and len(held["SR"][0]["Instances"]) == 1
        (seg_path,) = download(pacs, held["SEG"][0], tmp_path / "seg")
        (sr_path,) = download(pacs, held["SR"][0], tmp_path / "sr")
        assert node.process.alive()

    loaded, repository, backend = expected_inference(files, tmp_path / "models")
    try:
        lungs = segment_lungs_classical(loaded.volume)
        expected = tasks.classify(loaded.volume, lungs, repository.get("covid19_ct"), backend)
    finally:
        backend.close()
    involvement = quantify_involvement(loaded.volume, lungs)
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    seg = read_seg(seg_path, sources)
    assert [seg.segments[n].label for n in (1, 2, 3, 4)] == [
        "Right lung", "Left lung", "Ground-glass opacity", "Consolidation"]
    for number, value, labels in ((1, 1, lungs), (2, 2, lungs), (3, 1, involvement.opacities),
                                  (4, 2, involvement.opacities)):
        np.testing.assert_array_equal(seg.masks[number].array > 0, labels.volume.array == value)
    for path in (seg_path, sr_path):
        validation = dciodvfy.validate(path)
        assert validation.errors == [], validation.report()

    report = hd.sr.srread(sr_path)
    assert report.StudyInstanceUID == study_uid and report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 8 and all(g.referenced_segment.referenced_sop_instance_uid == uid_of(seg_path, "SOPInstanceUID")
                                    for g in groups)
    scores = [next(m.value for m in g.get_measurements() if m.name.value == "zone-score") for g in groups[2:]]
    assert scores == [z.score for z in involvement.zones] and sum(scores) > 0
    both, *classes = report.content.get_image_measurement_groups()
    assert both.tracking_identifier == "both lungs"
    assert [g.tracking_identifier for g in classes] == ["non-COVID", "COVID-19"]
    np.testing.assert_allclose([g.get_measurements()[0].value for g in classes], expected.probabilities, atol=1e-6)
    assert comments(report) == [involvement.disclaimer, "Step lungs: completed", "Step involvement: completed",
                                "Step covid: completed"]
    dump = dcmtk.dsrdump(sr_path)
    assert dump.returncode == 0, dump.stderr
    assert "not a diagnosis" in dump.stdout and "Step covid: completed" in dump.stdout
    assert f'"Lung severity score, 6 zones")="{involvement.total_score}.0"' in dump.stdout
    assert dump.stdout.count('"Probability")=') == 2, dump.stdout
    assert job["job"]["pipeline"] == "chest_ct" and len(job["exports"]) == 2  # the SEG and the SR
    figures = job["lung_involvement"]
    assert figures["sop_instance_uid"] == uid_of(sr_path, "SOPInstanceUID")
    assert (figures["total_score"], figures["category"]) == (involvement.total_score, involvement.category)
    assert [z["score"] for z in figures["zones"]] == scores and "not a diagnosis" in figures["disclaimer"]


@needs_peers
def test_outage_and_node_restart_every_result_arrives_once(tmp_path):
    """Orthanc down while the results are ready, the node restarted meanwhile, Orthanc back on its storage."""
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    study_uid = uid_of(files[0], "StudyInstanceUID")
    covid_repository(tmp_path / "models")
    pacs = orthanc.Orthanc(tmp_path / "orthanc", verbose=True)
    pacs.start()
    pacs.stop()  # a PACS with its storage, down from now on
    node = Node(tmp_path / "node", **overrides(pacs, tmp_path / "models",
                                               pipelines={"chest_ct": SHIPPED_PIPELINES["chest_ct"]})).start()
    try:
        assert dcmtk.storescu(node.port, files).returncode == 0

        def failed_attempts(minimum: int):
            journal = node.journal()
            try:
                pending = journal.exports_in_state("pending")
                return len(pending) == 2 and all(e.attempts >= minimum for e in pending) and pending
            finally:
                journal.close()

        before = wait_for(lambda: failed_attempts(1), 120, "SEG and SR ready and refused by the stopped PACS")
        node.stop()
        node.start()  # same storage, journal and port: the retry schedule continues
        wait_for(lambda: failed_attempts(max(e.attempts for e in before) + 1), 30, "a retry after the node restart")
        pacs.start()
        wait_for(lambda: study_series(pacs, study_uid).keys() >= {"SEG", "SR"}, 30, "SEG and SR in Orthanc")
        time.sleep(3)  # a resend would come within a few dispatch periods
        journal = node.journal()
        try:
            sent = journal.exports_in_state("sent")
            assert journal.exports_in_state("pending", "dead") == []
            (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
        finally:
            journal.close()
        held = {pydicom.dcmread(io.BytesIO(pacs.instance_file(i)), stop_before_pixels=True).SOPInstanceUID
                for i in pacs.instances()}
        assert held == {e.sop_instance_uid for e in sent} and len(sent) == 2  # SEG, SR
        assert job.state == "done" and job.attempts == 1
        assert pacs.store_requests() == 2, "an instance was sent to Orthanc more than once"
    finally:
        node.stop()
        pacs.stop()


@needs_peers
def test_permanent_rejection_is_dead_lettered_once_and_listed(tmp_path):
    """Orthanc accepts C-STORE only from the AEs it knows (DicomAlwaysAllowStore false); ours is not one."""
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    with orthanc.Orthanc(tmp_path / "orthanc", allowed_aes={"MODALITY": free_port()}, restrict_calling_aes=True,
                         verbose=True) as pacs, running_node(
            tmp_path / "node", **overrides(pacs, pipelines={"lungs_ct": LUNGS})) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0

        def dead():
            journal = node.journal()
            try:
                return journal.exports_in_state("dead")
            finally:
                journal.close()

        (export,) = wait_for(dead, 120, "the SEG dead-lettered")
        attempts = export.attempts
        time.sleep(3)  # with retry delays of 0.5-1 s a retry loop would show here
        (export,) = dead()
        # One attempt; two when pynetdicom saw Orthanc close the connection before it read the
        # A-ASSOCIATE-RJ (a race seen once on a loaded runner: Orthanc's log shows both rejections,
        # the node's first attempt ended "aborted", a transient failure). Never a retry loop.
        assert export.attempts == attempts and attempts in (1, 2), attempts
        assert "association rejected (permanent" in export.reason, export.reason
        listed = subprocess.run([REPO / ".venv" / "bin" / "dicom-node", "jobs", "--config", node.config_path,
                                 "--json", "dead-letter"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["id"], row["reason"], row["attempts"]) == (export.id, export.reason, attempts)
        assert f"export {export.id} to pacs dead-lettered" in node.log_text()
        assert pacs.instances() == [] and pacs.store_requests() == 0


@needs_peers
def test_forward_rule_sends_the_original_series_byte_identical(tmp_path):
    """Plain auto-routing of the real J2K series, with no pipeline: the node inline before the PACS."""
    files = real_series(tmp_path / "series")
    series_uid = uid_of(files[0], "SeriesInstanceUID")
    forward = {"archive": {"match": {"modality": "CT"}, "destinations": ["pacs"]}}
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, forward=forward)) as node:
        assert dcmtk.storescu(node.port, files, extra=["-xv"]).returncode == 0
        wait_for(lambda: len(pacs.instances()) == len(files), 60, "every original instance in Orthanc")
        held = {}
        for instance in pacs.instances():
            data = pacs.instance_file(instance)
            held[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
        journal = node.journal()
        try:
            (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
            sent = journal.exports_in_state("sent")
        finally:
            journal.close()
        assert _series_state(node, series_uid) == "routed"
    assert (job.kind, job.pipeline, job.state) == ("forward", "archive", "done")
    assert len(sent) == len(files)
    for path in files:
        stored = tmp_path / "stored.dcm"
        stored.write_bytes(held[uid_of(path, "SOPInstanceUID")])
        assert dataset_bytes(stored) == dataset_bytes(path), f"{path.name} changed on the way"
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"


def test_forward_rules_route_like_pipelines_and_name_known_destinations(tmp_path):
    """Forward rules share the match rules; their jobs are of kind forward, named by the rule, run before any
    pipeline's; a forward rule may not share a pipeline's name (jobs are named by either)."""
    rules = {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
             "forward": {"archive": {"match": {"modality": ["CT", "MR"]}, "destinations": ["pacs"]}},
             "pipelines": {"spleen_ct": SHIPPED_PIPELINES["spleen_ct"]}}
    config = Config.model_validate(rules)
    assert [(m.kind, m.pipeline) for m in match_pipelines(config, AXIAL_CT, "STORESCU", "DICOMNODE")] == [
        ("forward", "archive"), ("pipeline", "spleen_ct")]
    why = unmatched_reasons(config, series(modality="PT"), "STORESCU", "DICOMNODE")
    assert why["archive"] == "not modality 'PT' in ['CT', 'MR']"
    rules["forward"]["archive"]["destinations"] = ["archive_pacs"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    with pytest.raises(ConfigError, match=r"config.yaml:\d+ forward.archive.destinations.0: unknown destination"):
        load_config(path)
    rules["forward"] = {"spleen_ct": {"match": {"modality": "CT"}, "destinations": ["pacs"]}}
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    with pytest.raises(ConfigError, match=r"config.yaml:(\d+) forward.spleen_ct: a pipeline is named 'spleen_ct' too"):
        load_config(path)
