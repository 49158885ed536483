"""The whole node with real peers: storescu -> `dicom-node serve` -> pipeline -> C-STORE to a PACS.

The PACS here is dcmtk's storescp (every instance it stores is a file we can
count); Orthanc-specific checks live with its peer (tests/peers/orthanc.py).
"""

from __future__ import annotations

import time

import pydicom

from dicom_node.store.journal import Journal
from tests.peers import free_port, wait_for
from tests.peers import dcmtk
from tests.phantoms import chest_phantom, write_ct_volume
from tests.test_pipeline import real_series
from tests.test_receive import running_node

pytestmark = dcmtk.required()

LUNGS = {"match": {"modality": "CT", "image_type": {"contains_all": ["ORIGINAL", "PRIMARY", "AXIAL"]},
                   "body_part_examined": ["CHEST"]},
         "steps": [{"name": "lungs", "task": "lung_classical"}], "outputs": ["seg"], "destinations": ["pacs"]}


def _destination(port: int) -> dict:
    return {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                     "retry": {"initial_delay_s": 0.5, "max_delay_s": 1, "jitter": 0, "max_attempts": 50}}}


def _overrides(pacs_port: int) -> dict:
    return {"pipelines": {"lungs_ct": LUNGS}, "destinations": _destination(pacs_port),
            "results": {"compress_frames": False}}  # storescp takes the uncompressed syntaxes only


def _series_state(node, series_uid: str) -> str | None:
    journal: Journal = node.journal()
    try:
        record = journal.get_series(series_uid)
        return record.state if record else None
    finally:
        journal.close()


def test_localizer_and_unmatched_series_are_kept_not_processed(tmp_path):
    with running_node(tmp_path / "node", **_overrides(free_port())) as node:
        files = real_series(tmp_path / "localizer")
        for path in files:  # a chest localizer: matches all but image_type, not a CT model's input
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = "CHEST"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.save_as(path, enforce_file_format=True)
        result = dcmtk.storescu(node.port, files, extra=["-xv"])
        assert result.returncode == 0, result.output
        series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        wait_for(lambda: _series_state(node, series_uid) == "unmatched", 20, "unmatched")
        journal = node.journal()
        try:
            assert "image_type" in journal.get_series(series_uid).reason
            assert journal.jobs_in_state("queued", "running", "done", "failed") == []
        finally:
            journal.close()
        assert len(node.spool_files()) == 20
        assert "matched no pipeline" in node.log_text()


def test_chest_seg_reaches_the_pacs_once_after_an_outage_and_a_node_restart(tmp_path):
    pacs_port = free_port()
    received = tmp_path / "pacs"
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with running_node(tmp_path / "node", **_overrides(pacs_port)) as node:  # the PACS is down
        result = dcmtk.storescu(node.port, files)
        assert result.returncode == 0, result.output
        wait_for(lambda: _series_state(node, series_uid) == "routed", 20, "routed")

        def attempted():
            journal = node.journal()
            try:
                return [e for e in journal.exports_in_state("pending") if e.attempts >= 1]
            finally:
                journal.close()
        (export,) = wait_for(attempted, 60, "a failed send attempt")
        assert export.state == "pending" and export.next_attempt_at is not None
    with dcmtk.storescp(pacs_port, received) as pacs, running_node(tmp_path / "node", **_overrides(pacs_port)) as node:
        wait_for(lambda: list(received.glob("*")), 30, "SEG at the PACS")
        time.sleep(3)  # a resend would arrive within the dispatch period
        stored = [pydicom.dcmread(p) for p in received.glob("*")]
        assert [ds.Modality for ds in stored] == ["SEG"]
        assert stored[0].StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
        assert stored[0].SeriesInstanceUID != series_uid
        journal = node.journal()
        try:
            (sent,) = journal.exports_in_state("sent")
            assert sent.sop_instance_uid == stored[0].SOPInstanceUID and sent.attempts >= 2
            assert journal.exports_in_state("pending", "dead") == []
        finally:
            journal.close()
        assert pacs.alive()


def test_seg_refused_by_sop_class_is_dead_lettered_and_the_overlay_goes_instead(tmp_path):
    """A PACS without SEG Storage (pynetdicom SCP offering Secondary Capture only)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    stored = []
    scp = AE(ae_title="STORESCP")
    scp.add_supported_context(SecondaryCaptureImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2",
                                                             "1.2.840.10008.1.2.5"])
    handlers = [(evt.EVT_C_STORE, lambda event: stored.append(event.request.AffectedSOPInstanceUID) or 0x0000)]
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    overrides = _overrides(port)
    overrides["pipelines"]["lungs_ct"] = {**LUNGS, "outputs": ["seg", "overlay"]}
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    try:
        with running_node(tmp_path / "node", **overrides) as node:
            assert dcmtk.storescu(node.port, files).returncode == 0
            wait_for(lambda: len(stored) == len(files), 30, "every overlay instance at the PACS")
            time.sleep(3)  # no retry loop: nothing more arrives, the SEG stays dead
            journal = node.journal()
            try:
                (dead,) = journal.exports_in_state("dead")
                assert dead.attempts == 1 and dead.reason
                assert len(journal.exports_in_state("sent")) == len(files) == len(set(stored))
            finally:
                journal.close()
    finally:
        server.shutdown()
