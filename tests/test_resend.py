"""A series re-sent after an interruption is one sending episode: one generation, one SEG at the PACS that
references every instance (README, "Complete").

Real parts only: the node as a `dicom-node serve` process, a pynetdicom sender that re-sends one C-STORE
every 0.25 s (the whole re-send lasts several times `stable_seconds`), the spleen model on a CT series built
from the shared real slices, and Orthanc as the PACS.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.states import SeriesState
from tests.model_repository import install_spleen_model
from tests.peers import dcmtk, orthanc, wait_for
from tests.peers.orthanc import Orthanc
from tests.reliability.node import node_with_pipeline, with_journal
from tests.reliability.test_crash import SPLEEN, finished
from tests.series_factory import write_ct_series
from tests.test_receive import NODE_AE, Node

pytestmark = pytest.mark.skipif(not (dcmtk.available() and orthanc.available()), reason="dcmtk and Orthanc needed")

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STABLE_S = 2.0  # far shorter than the slow re-send below
RESEND_INTERVAL_S = 0.25  # one C-STORE every 0.25 s, as a modality throttled by its network or its queue


def make_node(root: Path, pacs: Orthanc) -> Node:
    install_spleen_model(root / "models")
    return node_with_pipeline(
        root, pacs.dicom_port, pipeline=SPLEEN, pacs_ae=pacs.ae_title,
        completion={"stable_seconds": STABLE_S, "after_release_seconds": 1},
        inference={"backend": "embedded", "model_repository": "models", "embedded": {"cpu_threads": 2}})


def open_association(node: Node):
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


def send(assoc, files: list[Path], interval: float = 0.0) -> None:
    for path in files:
        status = assoc.send_c_store(path)
        assert status and status.Status == 0, f"{path.name}: {status}"
        time.sleep(interval)


def slow_resend(node: Node, files: list[Path]) -> float:
    """The sender re-sends the whole series in one association, slowly, and releases it; returns seconds."""
    started = time.monotonic()
    assoc = open_association(node)
    try:
        send(assoc, files, RESEND_INTERVAL_S)
    finally:
        assoc.release()
    return time.monotonic() - started


def sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}


def assert_one_generation_and_one_seg(node: Node, pacs: Orthanc, files: list[Path]) -> None:
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    wait_for(lambda: finished(node), 300, "the job and its exports")
    time.sleep(2)  # a second generation's job would be queued within this
    generations = with_journal(node, lambda journal: [
        (s.generation, s.state, s.instance_count) for s in journal.series_in_state(*SeriesState)
        if s.series_instance_uid == uid])
    jobs = with_journal(node, lambda journal: journal.jobs_in_state("queued", "running", "done", "failed",
                                                                     "superseded"))
    assert generations == [(1, "routed", len(files))], node.log_text()
    assert [(job.generation, job.state) for job in jobs] == [(1, "done")]
    segs = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.instance_file(i))) for i in pacs.instances()]
    segs = [ds for ds in segs if ds.SOPClassUID == SEG_STORAGE]
    assert len(segs) == 1, f"{len(segs)} SEGs at the PACS"
    (referenced_series,) = segs[0].ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == uid
    referenced = {str(item.ReferencedSOPInstanceUID) for item in referenced_series.ReferencedInstanceSequence}
    assert referenced == sop_uids(files), f"the SEG references {len(referenced)} of {len(files)} instances"


def test_kill_9_after_60_acknowledged_then_a_slow_full_resend_makes_one_generation(tmp_path):
    files = write_ct_series(tmp_path / "ct", 80)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node = make_node(tmp_path / "node", pacs).start()
        try:
            assoc = open_association(node)
            send(assoc, files[:60])  # 60 acknowledged
            node.process.kill()
            wait_for(lambda: not assoc.is_alive(), 30, "the sender seeing the node die")
        finally:
            node.stop()
        node.start()  # same config, storage and port
        try:
            took = slow_resend(node, files)
            assert took > 5 * STABLE_S, f"the re-send took {took:.1f} s: not slow against the stable timer"
            assert_one_generation_and_one_seg(node, pacs, files)
        finally:
            node.stop()


def test_an_aborted_association_then_a_slow_full_resend_makes_one_generation(tmp_path):
    files = write_ct_series(tmp_path / "ct", 60)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node = make_node(tmp_path / "node", pacs).start()
        try:
            assoc = open_association(node)
            send(assoc, files[:30])
            assoc.abort()
            took = slow_resend(node, files)
            assert took > 5 * STABLE_S, f"the re-send took {took:.1f} s: not slow against the stable timer"
            assert_one_generation_and_one_seg(node, pacs, files)
        finally:
            node.stop()
