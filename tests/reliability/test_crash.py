"""Crash at every stage: kill -9 the node mid-receive, while a series waits for completion,
mid-inference, mid-encode and mid-dispatch; after a restart Orthanc holds exactly what an uninterrupted run
leaves there (same result instances, same pixels, nothing twice) and the storage has no temp debris.

The stages are hit with real parts only: the real spleen model on the real CT series makes inference and
encoding long enough to land in, a SIGSTOPped Orthanc holds a dispatch association open, and a pynetdicom
sender that stops after 8 of 20 instances holds the receive open.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.peers import dcmtk, orthanc, wait_for
from tests.peers.orthanc import Orthanc
from tests.reliability.node import node_with_pipeline, with_journal
from tests.reliability.summary import CaseResult
from tests.model_repository import install_spleen_model
from tests.test_pipeline import real_series
from tests.test_receive import NODE_AE, Node

pytestmark = [dcmtk.required(), orthanc.required()]

SPLEEN = {"match": {"modality": "CT"}, "steps": [{"name": "spleen", "task": "segmentation", "model": "spleen_ct"}],
          "outputs": ["seg"], "destinations": ["pacs"]}
AFTER_RELEASE_S = 4  # the window in which a released series waits for completion
STABLE_S = 6


@dataclass(frozen=True)
class PacsState:
    """What Orthanc holds: (SOP Class, SOP Instance, Series Instance UID, SHA-256 of Pixel Data) per instance."""

    instances: tuple[tuple[str, str, str, str], ...]


@dataclass(frozen=True)
class Timings:
    load_s: float
    inference_s: float
    encode_s: float


def pacs_state(pacs: Orthanc) -> PacsState:
    rows = []
    for orthanc_id in pacs.instances():
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.instance_file(orthanc_id)))
        rows.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                     hashlib.sha256(ds.PixelData).hexdigest()))
    return PacsState(tuple(sorted(rows)))


def make_node(root: Path, pacs: Orthanc) -> Node:
    install_spleen_model(root / "models") if not (root / "models").exists() else None
    return node_with_pipeline(
        root, pacs.dicom_port, pipeline=SPLEEN, pacs_ae=pacs.ae_title,
        completion={"stable_seconds": STABLE_S, "after_release_seconds": AFTER_RELEASE_S},
        inference={"backend": "embedded", "model_repository": "models", "embedded": {"cpu_threads": 2}},
        results={"compress_frames": True})


def finished(node: Node) -> bool:
    """Every job done and every export sent (nothing queued, running, pending or failed)."""
    def read(journal):
        jobs = journal.jobs_in_state("queued", "running", "done", "failed")
        exports = journal.exports_in_state("pending", "sent", "dead")
        return bool(jobs) and all(j.state == "done" for j in jobs) and bool(exports) and all(
            e.state == "sent" for e in exports)
    return with_journal(node, read)


def debris(node: Node) -> list[Path]:
    """Temp files anywhere under the storage dir (spool writes and result writes use dot-named .tmp files)."""
    return [p for p in node.storage.rglob("*") if p.is_file() and (p.suffix == ".tmp" or p.name.endswith(".tmp"))]


def job_timings(log: str) -> Timings:
    match = re.search(r"done: load ([\d.]+) s, inference ([\d.]+) s, encode ([\d.]+) s", log)
    assert match, "no job timing line in the node log"
    return Timings(*(float(v) for v in match.groups()))


def running_job(node: Node):
    return with_journal(node, lambda journal: next(iter(journal.jobs_in_state("running")), None))


def send(node: Node, files: list[Path]) -> None:
    result = dcmtk.storescu(node.port, files, extra=["-xv"])  # the real series is JPEG 2000 lossless
    assert len(result.acknowledged) == len(files), result.output


# --- how each stage is reached; each returns what proves the kill landed there ------------------------

def kill_mid_receive(node: Node, pacs: Orthanc, files: list[Path], baseline: Timings) -> str:
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                                  .file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    statuses = [assoc.send_c_store(path).Status for path in files[:8]]
    assert statuses == [0] * 8
    node.process.kill()
    wait_for(lambda: not assoc.is_alive(), 30, "the sender seeing the node die")
    return "8 of 20 instances acknowledged, association still open"


def kill_waiting_for_completion(node: Node, pacs: Orthanc, files: list[Path], baseline: Timings) -> str:
    send(node, files)
    node.process.kill()
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    state = with_journal(node, lambda journal: journal.get_series(uid).state)
    assert state == "receiving", f"the series was already {state} at the kill"
    return f"series released by the sender, state {state}"


def kill_mid_inference(node: Node, pacs: Orthanc, files: list[Path], baseline: Timings) -> str:
    assert baseline.inference_s > 1.0, f"inference takes {baseline.inference_s} s: too short to land in"
    send(node, files)
    job = wait_for(lambda: running_job(node), 60, "a running job", interval=0.02)
    time.sleep(baseline.load_s + baseline.inference_s / 2)
    workers = psutil.Process(node.process.pid).children()  # the job runs in a worker process
    node.process.kill()
    output = node.storage / "results" / str(job.id)
    state = with_journal(node, lambda journal: journal.get_job(job.id).state)
    assert state == "running" and not output.exists(), f"job {state}, output dir exists: {output.exists()}"
    assert workers, "no worker process under the node"
    wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 10,
             "the job's worker process exiting with the node (no orphan writing results)")
    return (f"job {job.id} running {baseline.load_s + baseline.inference_s / 2:.1f} s in, no output yet; "
            f"its worker exited with the node")


def kill_mid_encode(node: Node, pacs: Orthanc, files: list[Path], baseline: Timings) -> str:
    send(node, files)
    job = wait_for(lambda: running_job(node), 60, "a running job", interval=0.02)
    output = node.storage / "results" / str(job.id)
    wait_for(output.exists, 120, "the job's output folder (encoding starts)", interval=0.005)
    node.process.kill()
    state = with_journal(node, lambda journal: journal.get_job(job.id).state)
    exports = with_journal(node, lambda journal: journal.exports_in_state("pending", "sent", "dead"))
    assert state == "running" and not exports, f"job {state}, {len(exports)} exports: the encode was over"
    return f"job {job.id} running with its output folder created, no export queued ({baseline.encode_s:.2f} s encode)"


def kill_mid_dispatch(node: Node, pacs: Orthanc, files: list[Path], baseline: Timings) -> str:
    send(node, files)
    wait_for(lambda: running_job(node), 60, "a running job", interval=0.02)
    os.kill(pacs.process.pid, signal.SIGSTOP)  # the PACS hangs: the node's association waits on it
    try:
        def connected():
            return any(c.raddr and c.raddr.port == pacs.dicom_port
                       for c in psutil.Process(node.process.pid).net_connections(kind="tcp"))
        wait_for(connected, 120, "a dispatch association to the PACS", interval=0.05)
        pending = with_journal(node, lambda journal: journal.exports_in_state("pending"))
        node.process.kill()
    finally:
        os.kill(pacs.process.pid, signal.SIGCONT)
    assert pending, "no pending export at the kill"
    return f"{len(pending)} export(s) pending, association to the PACS open"


STAGES: dict[str, Callable[[Node, Orthanc, list[Path], Timings], str]] = {
    "mid-receive": kill_mid_receive,
    "waiting for completion": kill_waiting_for_completion,
    "mid-inference": kill_mid_inference,
    "mid-encode": kill_mid_encode,
    "mid-dispatch": kill_mid_dispatch,
}


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return real_series(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def uninterrupted(series, tmp_path_factory) -> tuple[PacsState, Timings]:
    root = tmp_path_factory.mktemp("uninterrupted")
    with Orthanc(root / "orthanc") as pacs:
        node = make_node(root / "node", pacs).start()
        try:
            send(node, series)
            wait_for(lambda: finished(node), 300, "the uninterrupted run")
            state = pacs_state(pacs)
            timings = job_timings(node.log_text())
        finally:
            node.stop()
    assert state.instances, "the uninterrupted run left nothing in Orthanc"
    return state, timings


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_at_every_stage_ends_like_an_uninterrupted_run(stage, series, uninterrupted, tmp_path, ledger):
    expected, timings = uninterrupted
    with Orthanc(tmp_path / "orthanc") as pacs:
        node = make_node(tmp_path / "node", pacs).start()
        try:
            evidence = STAGES[stage](node, pacs, series, timings)
        finally:
            node.stop()
        assert not node.process.alive()
        node.start()  # same config, storage and port
        try:
            if stage == "mid-receive":  # the modality resends the whole series after the abort
                send(node, series)
            wait_for(lambda: finished(node), 300, f"{stage}: the run after the restart")
            time.sleep(2)  # a resend would arrive within a dispatch period
            state = pacs_state(pacs)
            left_over = debris(node)
            journal_series = with_journal(node, lambda journal: journal.series_in_state(
                "receiving", "complete", "routed", "unmatched", "quarantined"))
        finally:
            node.stop()
    same = state == expected and not left_over and len(journal_series) == 1
    ledger.record(CaseResult("crash", f"kill -9 {stage}", "Orthanc as uninterrupted, no debris",
                             f"{evidence}; {len(state.instances)} instance(s), same={state == expected}, "
                             f"debris={len(left_over)}", same))
    assert state == expected, f"{stage}: Orthanc holds {state}, uninterrupted run left {expected}"
    assert left_over == []
    assert [(s.generation, s.instance_count, s.state) for s in journal_series] == [(1, len(series), "routed")]
