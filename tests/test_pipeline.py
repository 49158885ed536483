"""Pipeline against a real journal and real files: routing, jobs, results, retry (no network)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil
import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.store.journal import Journal, NewInstance
from dicom_node.pipeline.stage import Pipeline
from pydicom.uid import generate_uid

from tests.model_repository import install_spleen_model
from tests.peers import CT_J2K_SERIES
from tests.phantoms import chest_phantom, write_ct_volume

CONFIG = """
node: {{ae_title: DICOMNODE, storage_dir: var}}
security: {{allow_any_calling_ae: true}}
inference: {{backend: embedded, model_repository: models}}
pipelines:
  spleen_ct:
    match: {{modality: {spleen_modality}, number_of_slices: {{min: 10}}}}
    steps: [{{name: spleen, task: segmentation, model: spleen_ct}}]
    outputs: [seg]
  lungs_ct:
    match: {{modality: CT, body_part_examined: [CHEST]}}
    steps: [{{name: lungs, task: lung_classical}}]
    outputs: [seg]
"""


def _config(tmp_path: Path, spleen_modality: str = "CT"):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(spleen_modality=spleen_modality))
    return load_config(path)


def real_series(out_dir: Path, count: int = 20, shift_slice: int | None = None,
                conflicting_duplicate: int | None = None) -> list[Path]:
    """The real J2K series with the UIDs its anonymisation blanked in the dataset restored
    (SOP UIDs from the file meta, new study/series); `shift_slice` moves one slice 3.3 mm
    along z so the stack has uneven spacing (refused from the headers, at routing);
    `conflicting_duplicate` adds a second instance at that slice's position with other pixel
    values (only the loader sees it). Pixel data stays the original codestream."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    copies = []
    for index, path in enumerate(sorted(CT_J2K_SERIES.iterdir())[:count]):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if index == shift_slice:
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 3.3
        ds.save_as(out_dir / path.name, enforce_file_format=True)
        copies.append(out_dir / path.name)
        if index == conflicting_duplicate:
            duplicate = pydicom.dcmread(path)
            duplicate.decompress()
            duplicate.PixelData = (duplicate.pixel_array + 1).tobytes()
            duplicate.StudyInstanceUID, duplicate.SeriesInstanceUID = study_uid, series_uid
            duplicate.SOPClassUID = duplicate.file_meta.MediaStorageSOPClassUID
            duplicate.SOPInstanceUID = duplicate.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            duplicate.save_as(out_dir / "duplicate.dcm", enforce_file_format=True)
            copies.append(out_dir / "duplicate.dcm")
    return copies


def _spool(journal: Journal, spool: Path, files: list[Path]):
    """Put files in the journal as the receiver would, then mark their series complete."""
    for source in files:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        target = spool / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        journal.record_instance(NewInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID, study_instance_uid=ds.StudyInstanceUID, path=str(target),
            calling_ae="STORESCU", called_ae="DICOMNODE", transfer_syntax=ds.file_meta.TransferSyntaxUID,
            size=target.stat().st_size, modality=ds.Modality, series_description=ds.get("SeriesDescription", "")))
    return journal.complete_series(ds.SeriesInstanceUID, 1)


def _wait_job(journal: Journal, job_id: int, states=("done", "failed"), timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = journal.get_job(job_id)
        if job.state in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {journal.get_job(job_id).state}")


@pytest.fixture
def node(tmp_path):
    def make(**kwargs):
        config = _config(tmp_path, **kwargs)
        Path(config.node.storage_dir).mkdir(exist_ok=True)
        journal = Journal(config.node.journal_url)
        pipeline = Pipeline(config, journal)
        made.append((pipeline, journal))
        return config, journal, pipeline
    made = []
    yield make
    for pipeline, journal in made:
        pipeline.stop()
        journal.close()


def _segs(out_dir: Path) -> dict[str, str]:
    return {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in sorted(Path(out_dir).glob("SEG_*.dcm"))}


def test_unmatched_series_is_kept_and_reported(node, tmp_path):
    config, journal, pipeline = node(spleen_modality="MR")
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "real"))
    pipeline.on_series_complete(record)
    series = journal.get_series(record.series_instance_uid)
    assert series.state == "unmatched" and series.instance_count == 20
    assert "spleen_ct" in series.reason and "modality" in series.reason
    assert journal.jobs_in_state("queued", "running", "done", "failed") == []
    assert all(Path(i.path).exists() for i in journal.series_instances(record.series_instance_uid, 1))


def test_lung_job_writes_seg_with_the_same_uids_when_rerun(node, tmp_path):
    config, journal, pipeline = node(spleen_modality="MR")
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    record = _spool(journal, tmp_path / "spool", files)
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    assert job.pipeline == "lungs_ct"
    job = _wait_job(journal, job.id)
    assert job.state == "done", job.error
    first = _segs(job.output_dir)
    assert len(first) == 1
    seg = pydicom.dcmread(next(Path(job.output_dir).glob("SEG_*.dcm")))
    assert seg.StudyInstanceUID == record.study_instance_uid
    assert seg.SeriesInstanceUID != record.series_instance_uid

    pipeline.on_series_complete(record)  # routing again is idempotent: same job
    assert [j.id for j in journal.jobs_in_state("queued", "running", "done", "failed")] == [job.id]
    shutil.rmtree(job.output_dir)
    journal.update_job(job.id, state="queued")  # what `dicom-node jobs retry` does
    pipeline.pick_up_queued()
    job = _wait_job(journal, job.id)
    assert job.state == "done" and job.attempts == 2
    assert _segs(job.output_dir) == first


def test_a_job_whose_series_is_sent_again_with_new_instances_while_it_runs_delivers_nothing(node, tmp_path):
    """A new instance of the series arrives while its job runs: the new generation takes the series over,
    and the running job ends `superseded` with no result queued for any destination."""
    config, journal, pipeline = node(spleen_modality="MR")
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    record = _spool(journal, tmp_path / "spool", files)
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running")
    _wait_job(journal, job.id, states=("running",), timeout=30)
    late = pydicom.dcmread(files[0], stop_before_pixels=True)
    journal.record_instance(NewInstance(
        sop_instance_uid=generate_uid(), sop_class_uid=late.SOPClassUID, series_instance_uid=late.SeriesInstanceUID,
        study_instance_uid=late.StudyInstanceUID, path=str(tmp_path / "late.dcm"), calling_ae="STORESCU",
        called_ae="DICOMNODE", transfer_syntax=late.file_meta.TransferSyntaxUID, size=1, modality="CT",
        series_description=""))
    job = _wait_job(journal, job.id, states=("done", "failed", "superseded"))
    assert job.state == "superseded" and "superseded by generation 2" in job.error
    assert journal.exports_in_state("pending", "sent", "dead", "superseded") == []
    assert journal.get_series(record.series_instance_uid, 1).state == "superseded"
    assert journal.get_series(record.series_instance_uid, 2).instance_count == len(files) + 1


def test_geometry_error_only_pixels_show_fails_the_job_and_quarantines_the_series(node, tmp_path):
    config, journal, pipeline = node()
    files = real_series(tmp_path / "broken", count=12, conflicting_duplicate=6)
    record = _spool(journal, tmp_path / "spool", files)
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    job = _wait_job(journal, job.id)
    assert job.state == "failed"
    assert "SeriesGeometryError" in job.error and "hold different pixel values" in job.error
    series = journal.get_series(record.series_instance_uid)
    assert series.state == "quarantined" and series.reason == job.error
    assert all(Path(i.path).exists() for i in journal.series_instances(record.series_instance_uid, 1))


def test_header_geometry_error_quarantines_at_routing_without_a_job(node, tmp_path):
    """A series the headers already condemn never becomes a job: quarantined with the reason, audited."""
    from dicom_node.store.audit import AuditLog

    config, journal, pipeline = node()
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "broken", count=12, shift_slice=6))
    pipeline.on_series_complete(record)
    assert journal.jobs_in_state("queued", "running", "done", "failed") == []
    series = journal.get_series(record.series_instance_uid)
    assert series.state == "quarantined"
    assert series.reason.startswith("refused before inference (spleen_ct): SeriesGeometryError: series ")
    # The slice moved 3.3 mm up leaves a 4 mm hole in the 2 mm grid where it was.
    assert "missing slice between z=" in series.reason and "about 1 slice(s) missing" in series.reason
    (event,) = [e for e in AuditLog(journal).query() if e.event == "produced"]
    assert event.status == "refused" and event.detail == series.reason


def test_forward_rule_still_sends_a_series_refused_at_routing(tmp_path):
    """The originals of a condemned series still go where a forward rule sends them; only models are spared."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(spleen_modality="CT") + """
forward:
  archive: {match: {modality: CT}, destinations: [pacs]}
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 1}
""")
    config = load_config(path)
    Path(config.node.storage_dir).mkdir(exist_ok=True)
    journal = Journal(config.node.journal_url)
    pipeline = Pipeline(config, journal)
    try:
        record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "broken", count=12, shift_slice=6))
        pipeline.on_series_complete(record)
        (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
        assert (job.kind, job.pipeline) == ("forward", "archive")
        series = journal.get_series(record.series_instance_uid)
        assert series.state == "quarantined" and "missing slice between" in series.reason
    finally:
        pipeline.stop()
        journal.close()


def test_spleen_job_fails_without_its_model_and_retry_runs_it(node, tmp_path):
    config, journal, pipeline = node()
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "real"))
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    job = _wait_job(journal, job.id)
    assert job.state == "failed" and "spleen_ct" in job.error  # the repository has no such model yet
    assert journal.get_series(record.series_instance_uid).state == "routed"

    pipeline.stop()
    install_spleen_model(tmp_path / "models")
    config, journal, pipeline = node()
    journal.update_job(job.id, state="queued", error=None)
    pipeline.start()
    job = _wait_job(journal, job.id)
    assert job.state == "done", job.error
    assert job.error is None and len(_segs(job.output_dir)) == 1


def _jobs_cli(config, *argv: str) -> tuple[int, str]:
    import argparse
    import io

    from dicom_node.ops import jobs

    parser = argparse.ArgumentParser()
    jobs.add_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    code = jobs.run(parser.parse_args(["jobs", *argv]), config, out)
    return code, out.getvalue()


def test_jobs_commands_list_show_and_requeue(node, tmp_path):
    import json

    config, journal, pipeline = node()
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "broken", count=12, conflicting_duplicate=6))
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    _wait_job(journal, job.id)

    code, text = _jobs_cli(config, "--json", "list", "--state", "failed")
    assert code == 0
    (row,) = json.loads(text)
    assert row["id"] == job.id and "SeriesGeometryError" in row["error"] and row["kind"] == "pipeline"
    assert journal.get_series(record.series_instance_uid, record.generation).state == "quarantined"
    code, text = _jobs_cli(config, "list")
    assert text.splitlines()[0].split()[:4] == ["id", "state", "kind", "pipeline"] and "failed" in text
    code, text = _jobs_cli(config, "show", str(job.id))
    assert code == 0 and "spleen_ct" in text
    assert _jobs_cli(config, "show", "999")[0] == 1

    code, text = _jobs_cli(config, "retry", "--failed")
    assert code == 0 and f"job {job.id}" in text
    assert journal.get_job(job.id).state in ("queued", "running", "failed")
    from dicom_node.store.audit import AuditLog
    (audited,) = AuditLog(journal).query(event="retry")
    assert audited.job_id == job.id and "the CLI" in audited.detail
    code, text = _jobs_cli(config, "--json", "dead-letter")
    assert code == 0 and json.loads(text) == []


def test_a_job_the_node_died_in_three_times_is_failed_not_rerun(node, tmp_path):
    """A job that crashes the process (a native codec fault) must not crash-loop the node."""
    from dicom_node.pipeline.runner import MAX_INTERRUPTED_RUNS

    config, journal, pipeline = node(spleen_modality="MR")
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "real"))
    job = journal.add_job(record.series_instance_uid, record.generation, "lungs_ct")
    journal.update_job(job.id, state="running", attempts=MAX_INTERRUPTED_RUNS)
    pipeline.start()
    job = journal.get_job(job.id)
    assert job.state == "failed"
    assert job.error.startswith(f"the node stopped while running it, in each of its {MAX_INTERRUPTED_RUNS} runs")
    assert f"jobs retry {job.id}" in job.error
    assert all(Path(i.path).exists() for i in journal.series_instances(record.series_instance_uid, 1))


def _job_workers_of(pid: int) -> list[int]:
    """Live worker processes (multiprocessing spawn children, not its resource tracker) of process `pid`."""
    workers = []
    for child in psutil.Process(pid).children():
        try:
            if any("spawn_main" in part for part in child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return workers


def test_a_job_whose_worker_process_dies_is_rerun_then_failed_and_the_node_goes_on(node, tmp_path):
    """SIGKILL is what the kernel's OOM killer sends: the job's worker dies, the node does not."""
    import os
    import signal

    from dicom_node.pipeline.runner import MAX_INTERRUPTED_RUNS

    config, journal, pipeline = node(spleen_modality="MR")  # only the lung pipeline matches
    record = _spool(journal, tmp_path / "spool", write_ct_volume(chest_phantom().volume, tmp_path / "phantom"))
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    output = tmp_path / "var" / "results" / str(job.id)
    for run in range(1, MAX_INTERRUPTED_RUNS + 1):
        deadline = time.monotonic() + 60
        while not output.exists():  # the worker creates it when it starts encoding: mid-job for sure
            assert time.monotonic() < deadline, f"run {run}: the job never reached its encoding"
            time.sleep(0.005)
        (worker,) = _job_workers_of(os.getpid())
        os.kill(worker, signal.SIGKILL)
        job = _wait_job(journal, job.id, states=("queued", "failed", "done"))
        assert job.state != "done", f"run {run} finished before the kill landed"
        assert "killed by SIGKILL" in job.error and job.attempts == run
        shutil.rmtree(output)
        pipeline.pick_up_queued()  # the dispatch loop does this every second in a running node
    assert job.state == "failed" and f"jobs retry {job.id}" in job.error

    journal.update_job(job.id, state="queued")  # `dicom-node jobs retry`: a fresh worker runs it
    pipeline.pick_up_queued()
    job = _wait_job(journal, job.id)
    assert job.state == "done" and len(_segs(job.output_dir)) == 1, job.error
    (idle,) = _job_workers_of(os.getpid())
    os.kill(idle, signal.SIGKILL)  # a worker that dies between jobs is replaced at the next one
    deadline = time.monotonic() + 10
    while idle in _job_workers_of(os.getpid()):
        assert time.monotonic() < deadline, "the idle worker did not die"
        time.sleep(0.01)
    shutil.rmtree(job.output_dir)
    journal.update_job(job.id, state="queued")
    pipeline.pick_up_queued()
    job = _wait_job(journal, job.id)
    assert job.state == "done" and job.attempts == MAX_INTERRUPTED_RUNS + 2, job.error


def _has_loaded(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def test_job_workers_start_with_the_node_and_import_before_the_first_job(node, tmp_path):
    """The first study after a restart does not wait for a worker process and its imports (1-2 s)."""
    import os

    config, journal, pipeline = node(spleen_modality="MR")
    idle = Pipeline(config.model_copy(update={"pipelines": {}}), journal)  # nothing to run: no worker
    idle.start()
    idle.stop()
    assert _job_workers_of(os.getpid()) == []

    pipeline.start()
    (worker,) = _job_workers_of(os.getpid())
    deadline = time.monotonic() + 60
    while not (_has_loaded(worker, "SimpleITK") and _has_loaded(worker, "onnxruntime")):  # before any job:
        assert time.monotonic() < deadline, "the idle worker did not import what a job uses"  # the volume
        time.sleep(0.05)                                                   # loader's and the model's libraries
    record = _spool(journal, tmp_path / "spool", write_ct_volume(chest_phantom().volume, tmp_path / "phantom"))
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    assert _wait_job(journal, job.id).state == "done"
    assert _job_workers_of(os.getpid()) == [worker]  # the job ran in the worker started with the node


def test_a_series_the_router_did_not_take_is_handed_over_again(node, tmp_path, caplog):
    """The router's journal write refused (another connection holds SQLite's write lock past the busy
    timeout) leaves the series `complete`; a minute later the periodic check hands it over again, and
    the node does not wait for a restart to route it."""
    import sqlite3
    from datetime import timedelta

    from dicom_node.pipeline.complete import UNROUTED_AFTER_S, CompletionTracker
    from dicom_node.store.journal import utcnow
    from dicom_node.store.schema import series

    config, journal, pipeline = node(spleen_modality="MR")
    handed = []
    tracker = CompletionTracker(journal, stable_seconds=3600, after_release_seconds=1,
                                on_series_complete=lambda record: handed.append(record) or
                                pipeline.on_series_complete(record))
    record = _spool(journal, tmp_path / "spool", real_series(tmp_path / "real"))
    admin = sqlite3.connect(Path(config.node.storage_dir) / "journal.sqlite", timeout=0)
    admin.execute("BEGIN IMMEDIATE")
    try:
        tracker.hand_over(record)
    finally:
        admin.rollback()
        admin.close()
    assert journal.get_series(record.series_instance_uid).state == "complete"
    assert "database is locked" in caplog.text
    tracker.check_stable()
    assert len(handed) == 1  # complete for less than UNROUTED_AFTER_S: its routing may still be running
    with journal.write() as conn:
        conn.execute(series.update().values(completed_at=utcnow() - timedelta(seconds=UNROUTED_AFTER_S + 1)))
    tracker.check_stable()
    assert len(handed) == 2 and journal.get_series(record.series_instance_uid).state == "unmatched"
    assert "is not routed; handing it over again" in caplog.text
    tracker.check_stable()
    assert len(handed) == 2


def test_a_job_whose_outcome_the_journal_refused_is_run_again(node, tmp_path, caplog):
    """SQLite refuses the job's writes while another connection holds the journal's write lock past the
    busy timeout (an admin's sqlite3 shell left in a transaction): the run ends with the job journaled
    `running` and no thread on it. Once the lock is gone the dispatch loop requeues it and it runs again,
    instead of staying `running` until the node restarts."""
    import sqlite3

    config, journal, pipeline = node(spleen_modality="MR")
    pipeline.start()
    record = _spool(journal, tmp_path / "spool", write_ct_volume(chest_phantom().volume, tmp_path / "phantom"))
    pipeline.on_series_complete(record)
    (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
    _wait_job(journal, job.id, states=("running",))
    # The admin waits its turn: the node's own short writes (the job's start) may hold the lock right now.
    admin = sqlite3.connect(Path(config.node.storage_dir) / "journal.sqlite", timeout=10)
    admin.execute("BEGIN IMMEDIATE")
    try:
        deadline = time.monotonic() + 90
        while "its outcome could not be journaled" not in caplog.text:
            assert time.monotonic() < deadline, "the job's writes were not refused"
            time.sleep(0.2)
        assert journal.get_job(job.id).state == "running"
    finally:
        admin.rollback()
        admin.close()
    job = _wait_job(journal, job.id)
    assert job.state == "done" and job.attempts == 2, job.error
    assert "its run ended without its outcome in the journal; run 1 of 3, queued again" in caplog.text
    assert len(_segs(job.output_dir)) == 1


def test_preload_loads_the_models_of_enabled_pipelines_and_leaves_a_broken_one_to_its_job(node, caplog):
    """What a worker started with the node does while idle (dicom_node.pipeline.job.preload)."""
    from dicom_node.pipeline import job

    config, _, _ = node()
    install_spleen_model(Path(config.inference.model_repository))
    try:
        job.preload(config)
        _, backend = job.open_inference(config)
        assert set(backend._sessions) == {"spleen_ct"}  # the lung step is classical: no model
    finally:
        job.close_inference()
    model_file = Path(config.inference.model_repository) / "spleen_ct" / "1" / "model.onnx"
    model_file.write_bytes(b"not a model")
    try:
        with caplog.at_level("WARNING", logger="dicom_node.pipeline.job"):
            job.preload(config)
    finally:
        job.close_inference()
    assert "model spleen_ct not loaded ahead (its first job tries again): model 'spleen_ct': ONNX Runtime " \
           "cannot load" in caplog.text
