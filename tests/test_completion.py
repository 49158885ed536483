"""Series completion with real associations: release fast path across two associations, stable timeout,
re-sent copies as arrival, the stable wait from the port's opening, and late instances opening a new
generation that supersedes the earlier one (README, "Complete")."""

from __future__ import annotations

import time
from datetime import timedelta

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.store.audit import AuditLog
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.pipeline.requeue import NotRetryable, requeue
from dicom_node.store.journal import Journal, NewInstance, utcnow
from dicom_node.states import JobKind
from tests.peers import dcmtk
from tests.series_factory import write_ct_series
from tests.test_receive import NODE_AE, running_node

pytestmark = dcmtk.required()


def series_uid(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def test_two_associations_within_the_grace_make_one_generation(tmp_path):
    """The second association starts during the release grace: the series waits for it."""
    files = write_ct_series(tmp_path / "ct", 40, rows=128, columns=128)
    with running_node(tmp_path / "n", completion={"after_release_seconds": 2, "stable_seconds": 60}) as node:
        assert dcmtk.storescu(node.port, files[:20]).returncode == 0
        time.sleep(0.5)
        assert dcmtk.storescu(node.port, files[20:]).returncode == 0
        record = node.wait_for_completion(series_uid(files[0]), timeout=10)
    assert record.generation == 1 and record.instance_count == 40


def test_stable_timeout_completes_a_series_sent_over_two_associations(tmp_path):
    """With the fast path out of reach (long grace), the series completes stable_seconds after its last instance."""
    files = write_ct_series(tmp_path / "ct", 30, rows=128, columns=128)
    uid = series_uid(files[0])
    with running_node(tmp_path / "n", completion={"after_release_seconds": 120, "stable_seconds": 3}) as node:
        assert dcmtk.storescu(node.port, files[:15]).returncode == 0
        time.sleep(1.5)
        assert dcmtk.storescu(node.port, files[15:]).returncode == 0
        last_sent = time.monotonic()
        journal = node.journal()
        assert journal.get_series(uid).state == "receiving"
        journal.close()
        record = node.wait_for_completion(uid, timeout=15)
        waited = time.monotonic() - last_sent
        assert node.logs(f"series complete (stable timeout): study={record.study_instance_uid} series={uid}")
    assert record.generation == 1 and record.instance_count == 30
    assert waited >= 2.0  # not before the stable timeout (3 s, checked every 0.75 s)


def test_late_instances_open_a_generation_that_takes_over_the_whole_series(tmp_path):
    files = write_ct_series(tmp_path / "ct", 12, rows=64, columns=64)
    uid = series_uid(files[0])
    with running_node(tmp_path / "n", completion={"after_release_seconds": 0.5, "stable_seconds": 30}) as node:
        assert dcmtk.storescu(node.port, files[:10]).returncode == 0
        first = node.wait_for_completion(uid)
        assert dcmtk.storescu(node.port, files[10:]).returncode == 0
        second = node.wait_for_completion(uid, generation=2, timeout=10)
        journal = node.journal()
        first_again = journal.get_series(uid, 1)
        rows = journal.series_instances(uid, 2)
        journal.close()
    assert first.instance_count == 10 and first_again.instance_count == 10  # its history stays
    assert first_again.state == "superseded" and "superseded by generation 2" in first_again.reason
    assert second.instance_count == 12
    assert {row.sop_instance_uid for row in rows} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def test_an_identical_resend_of_a_complete_series_opens_no_generation(tmp_path):
    files = write_ct_series(tmp_path / "ct", 6, rows=64, columns=64)
    uid = series_uid(files[0])
    with running_node(tmp_path / "n", completion={"after_release_seconds": 0.5, "stable_seconds": 30}) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        first = node.wait_for_completion(uid)
        assert len(dcmtk.storescu(node.port, files).acknowledged) == len(files)
        time.sleep(2)  # the re-send's release grace (0.5 s) several times over
        journal = node.journal()
        latest = journal.get_series(uid)
        journal.close()
    assert (latest.generation, latest.instance_count, latest.completed_at) == (1, 6, first.completed_at)
    assert latest.state == "unmatched"  # routed once; no pipeline configured


def open_association(port: int):
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


def test_resent_copies_keep_a_receiving_series_open_and_an_idle_association_does_not(tmp_path):
    """Re-sent copies on an open association, each within stable_seconds of the last, hold the series
    longer than stable_seconds; once the association sends nothing more the series completes while the
    association is still open."""
    files = write_ct_series(tmp_path / "ct", 8, rows=64, columns=64)
    uid = series_uid(files[0])
    stable = 2.0
    with running_node(tmp_path / "n", completion={"after_release_seconds": 120, "stable_seconds": stable}) as node:
        assoc = open_association(node.port)
        try:
            for path in files[:4]:
                assert assoc.send_c_store(path).Status == 0
            resend_until = time.monotonic() + 3 * stable
            while time.monotonic() < resend_until:  # the first four again, one every 0.5 s
                for path in files[:4]:
                    assert assoc.send_c_store(path).Status == 0
                    time.sleep(0.5)
                    journal = node.journal()
                    state = journal.get_series(uid).state
                    journal.close()
                    assert state == "receiving", "completed while its copies were still arriving"
            assert assoc.send_c_store(files[4]).Status == 0  # the rest joins the same generation
            idle_since = time.monotonic()
            record = node.wait_for_completion(uid, timeout=15)
            assert assoc.is_established, "the series must complete while the association is open"
            waited = time.monotonic() - idle_since
        finally:
            assoc.release()
    assert (record.generation, record.instance_count) == (1, 5)
    assert waited >= stable - 0.5


def new_instance(sop: str, series: str = "1.2.3") -> NewInstance:
    return NewInstance(sop_instance_uid=sop, sop_class_uid=CTImageStorage, series_instance_uid=series,
                       study_instance_uid="1.2", path=f"/spool/{sop}.dcm", calling_ae="SCANNER",
                       called_ae="DICOMNODE", transfer_syntax=ExplicitVRLittleEndian, size=100, modality="CT",
                       series_description="Abdomen")


@pytest.fixture()
def journal(journal_url):
    j = Journal(journal_url)
    yield j
    j.close()


def test_after_a_restart_the_stable_wait_starts_when_the_port_opens(journal):
    """A series last heard of long before the node (re)started is not complete until stable_seconds
    after the DICOM port opened: before that its sender could not re-send anything."""
    journal.record_instance(new_instance("1.1"), received_at=utcnow() - timedelta(hours=1))
    tracker = CompletionTracker(journal, stable_seconds=1.0, after_release_seconds=1.0)
    time.sleep(1.2)  # longer than stable_seconds since the tracker was made
    tracker.check_stable()
    assert journal.get_series("1.2.3").state == "receiving", "completed before the port was open"
    tracker.port_opened()
    opened = time.monotonic()
    tracker.check_stable()
    assert journal.get_series("1.2.3").state == "receiving"
    while journal.get_series("1.2.3").state == "receiving":
        assert time.monotonic() - opened < 10
        tracker.check_stable()
        time.sleep(0.1)
    assert time.monotonic() - opened >= 1.0


def test_a_resent_copy_counts_as_arrival_while_the_series_is_receiving(journal):
    first, _ = journal.record_instance(new_instance("1.1"), received_at=utcnow() - timedelta(seconds=30))
    journal.note_duplicate(first)
    assert journal.complete_series("1.2.3", 1, quiet_since=utcnow() - timedelta(seconds=5)) is None
    assert journal.get_series("1.2.3").state == "receiving"


def test_a_new_generation_supersedes_the_queued_job_and_undelivered_exports_of_the_earlier(journal):
    for sop in ("1.1", "1.2"):
        journal.record_instance(new_instance(sop))
    journal.complete_series("1.2.3", 1)
    queued = journal.add_job("1.2.3", 1, "spleen")
    running = journal.update_job(journal.add_job("1.2.3", 1, "lungs").id, state="running")
    delivered = journal.update_job(journal.add_job("1.2.3", 1, "archive", JobKind.FORWARD).id, state="done")
    sent = journal.update_export(journal.add_export(delivered.id, "pacs", "9.1", "/r/9.1.dcm").id, state="sent")
    pending = journal.add_export(delivered.id, "pacs", "9.2", "/r/9.2.dcm")
    journal.set_series_state("1.2.3", 1, "routed", reason="spleen, lungs, archive")

    late, _ = journal.record_instance(new_instance("1.3"))

    assert late.generation == 2
    assert {row.sop_instance_uid for row in journal.series_instances("1.2.3", 2)} == {"1.1", "1.2", "1.3"}
    assert journal.series_instances("1.2.3", 1) == []
    assert journal.get_series("1.2.3", 2).instance_count == 3
    earlier = journal.get_series("1.2.3", 1)
    assert earlier.state == "superseded" and earlier.instance_count == 2
    assert journal.get_job(queued.id).state == "superseded"
    assert journal.get_job(running.id).state == "running"  # it runs on, and delivers nothing:
    assert journal.add_exports(running, [("pacs", "9.3", "/r/9.3.dcm")]) is False
    assert [e.sop_instance_uid for e in journal.exports_in_state("pending")] == []
    assert journal.exports_in_state("superseded")[0].id == pending.id
    assert journal.exports_in_state("sent")[0].id == sent.id  # already at the PACS: stays as it was
    journal.set_series_state("1.2.3", 1, "routed")  # a router that finishes late does not bring it back
    assert journal.get_series("1.2.3", 1).state == "superseded"
    with pytest.raises(NotRetryable, match="superseded by generation 2.*retry that generation's job"):
        requeue(AuditLog(journal), journal.get_job(delivered.id), "a test")
    journal.update_job(running.id, state="superseded")
    assert [s.series.generation for s in journal.settled_series()] == [1]  # retention may clean it up
    assert journal.add_exports(journal.add_job("1.2.3", 2, "spleen"), [("pacs", "9.4", "/r/9.4.dcm")])
