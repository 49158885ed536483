"""Retention: settled series leave the spool after their keep time, nothing unsettled ever does.

The sweeps run on a real journal (SQLite) and spool in a temp folder, with
`now` moved forward instead of waiting days; the last tests run `dicom-node
serve` with a short sweep interval and dcmtk storescu, and a purge by this
process (another node's retention) on the PostgreSQL journal of a running node
while a sender re-sends the series to it.
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.ops import jobs as jobs_cli
from dicom_node.pipeline.requeue import NotRetryable, requeue
from dicom_node.store.audit import AuditLog
from dicom_node.config.node import RetentionConfig
from dicom_node.store.journal import Journal, NewInstance, utcnow
from dicom_node.store.schema import exports, jobs, series
from dicom_node.store.retention import Retention
from dicom_node.ops.server import reconcile
from dicom_node.store.spool import LOCK_STRIPES, InstanceKey, Spool
from tests.peers import dcmtk
from tests.series_factory import write_ct_series
from tests.test_api import get_json, samples
from tests.test_receive import running_node
from tests.tmpfs import small_tmpfs

STUDY, SERIES = "1.2.826.0.1.3680043.9.7.1", "1.2.826.0.1.3680043.9.7.1.2"


@pytest.fixture()
def node_state(tmp_path, journal_url):
    spool = Spool(tmp_path / "var")
    journal = Journal(journal_url)
    yield spool, journal
    journal.close()


def receive(spool: Spool, journal: Journal, count: int = 3, series_uid: str = SERIES, size: int = 0) -> list[Path]:
    """What the receiver does for `count` instances: spool file, then journal row."""
    paths = []
    for number in range(1, count + 1):
        key = InstanceKey(STUDY, series_uid, f"{series_uid}.{number}")
        path = spool.write(key, ((b"DICM-ish bytes of instance %d" % number).ljust(size, b"\0"),))
        journal.record_instance(NewInstance(
            sop_instance_uid=key.sop_instance_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=series_uid, study_instance_uid=STUDY, path=str(path), calling_ae="SCANNER",
            called_ae="DICOMNODE", transfer_syntax="1.2.840.10008.1.2.1", size=path.stat().st_size, modality="CT",
            series_description="Abdomen"))
        paths.append(path)
    return paths


def processed(journal: Journal, results_dir: Path, job_state: str = "done", export_state: str = "sent",
              series_uid: str = SERIES) -> int:
    """Complete, route, run one job that wrote a result file, queue its export; returns the job id."""
    journal.complete_series(series_uid, 1)
    journal.set_series_state(series_uid, 1, "routed", reason="spleen_ct")
    job = journal.add_job(series_uid, 1, "spleen_ct")
    out_dir = results_dir / str(job.id)
    out_dir.mkdir(parents=True)
    (out_dir / "SEG.dcm").write_bytes(b"a result")
    journal.update_job(job.id, state=job_state, output_dir=str(out_dir), finished_at=utcnow())
    export = journal.add_export(job.id, "pacs", f"2.25.{job.id}", str(out_dir / "SEG.dcm"))
    journal.update_export(export.id, state=export_state, sent_at=utcnow() if export_state == "sent" else None)
    return job.id


def age(journal: Journal, series_uid: str, days: float) -> None:
    """Make everything of the series `days` old."""
    then = utcnow() - timedelta(days=days)
    job_ids = select(jobs.c.id).where(jobs.c.series_instance_uid == series_uid)
    with journal.engine.begin() as conn:
        conn.execute(series.update().where(series.c.series_instance_uid == series_uid)
                     .values(last_received_at=then, completed_at=then))
        conn.execute(jobs.update().where(jobs.c.series_instance_uid == series_uid).values(finished_at=then))
        conn.execute(exports.update().where(exports.c.job_id.in_(job_ids)).values(sent_at=then))


def retention(spool: Spool, journal: Journal, **settings) -> Retention:
    return Retention(RetentionConfig(**settings), journal, spool)


def test_delivered_series_deleted_after_keep_days_history_kept(node_state, tmp_path):
    spool, journal = node_state
    files = receive(spool, journal)
    job_id = processed(journal, tmp_path / "var" / "results")
    sweeper = retention(spool, journal, keep_days=7)
    assert sweeper.sweep(utcnow() + timedelta(days=6)) == []
    assert all(path.exists() for path in files)
    (purged,) = sweeper.sweep(utcnow() + timedelta(days=7, minutes=1))
    assert (purged.series_instance_uid, purged.generation, purged.instances) == (SERIES, 1, 3)
    assert purged.bytes == sum(len(b"DICM-ish bytes of instance %d" % n) for n in (1, 2, 3))
    assert not any(path.exists() for path in files)
    assert not (spool.root / STUDY).exists()  # empty series and study folders go too
    assert not (tmp_path / "var" / "results" / str(job_id)).exists()
    record = journal.get_series(SERIES, 1)
    assert record.state == "purged" and record.instance_count == 3
    assert record.reason.startswith("retention: done, last activity ") and "kept 7 days" in record.reason
    assert journal.series_instances(SERIES, 1) == []
    assert journal.get_job(job_id).state == "done"  # the history stays
    (event,) = AuditLog(journal).query(series_instance_uid=SERIES, event="purged")
    assert event.instance_count == 3 and event.status == "done"
    assert sweeper.sweep(utcnow() + timedelta(days=30)) == []  # purged once


@pytest.mark.parametrize("unsettled", ["receiving", "complete", "queued job", "running job", "pending export"])
def test_series_with_work_left_is_never_deleted(node_state, tmp_path, unsettled):
    spool, journal = node_state
    files = receive(spool, journal)
    if unsettled == "complete":
        journal.complete_series(SERIES, 1)
    elif unsettled.endswith("job"):
        processed(journal, tmp_path / "results", job_state=unsettled.split()[0])
    elif unsettled == "pending export":
        processed(journal, tmp_path / "results", export_state="pending")
    assert retention(spool, journal, keep_days=0, keep_failed_days=0).sweep(utcnow() + timedelta(days=365)) == []
    assert all(path.exists() for path in files)
    assert len(journal.series_instances(SERIES, 1)) == 3


@pytest.mark.parametrize("failure", ["failed job", "dead export", "quarantined"])
def test_failed_series_kept_for_keep_failed_days(node_state, tmp_path, failure, capsys):
    spool, journal = node_state
    files = receive(spool, journal)
    if failure == "quarantined":
        journal.complete_series(SERIES, 1)
        journal.set_series_state(SERIES, 1, "quarantined", reason="gap between slices")
    else:
        processed(journal, tmp_path / "results", job_state="failed" if failure == "failed job" else "done",
                  export_state="dead" if failure == "dead export" else "sent")
    sweeper = retention(spool, journal, keep_days=7, keep_failed_days=30)
    assert sweeper.sweep(utcnow() + timedelta(days=29)) == []
    assert all(path.exists() for path in files)
    (purged,) = sweeper.sweep(utcnow() + timedelta(days=30, minutes=1))
    assert purged.instances == 3 and not any(path.exists() for path in files)
    assert journal.get_series(SERIES, 1).reason.startswith("retention: failed or quarantined")
    if failure == "dead export":  # its result file went with the series: a retry says so instead of failing later
        (dead,) = journal.exports_in_state("dead")
        out = io.StringIO()
        assert jobs_cli.run_dead_letter(argparse.Namespace(action="retry", id=dead.id, json=False), journal, out) == 1
        assert capsys.readouterr().err.strip() == (
            f"export {dead.id}: {dead.path} is no longer on disk (deleted by retention?)")
        assert journal.exports_in_state("dead") == [dead]


def test_unmatched_series_deleted_and_off_means_kept(node_state):
    spool, journal = node_state
    files = receive(spool, journal)
    journal.complete_series(SERIES, 1)
    journal.set_series_state(SERIES, 1, "unmatched", reason="spleen_ct: modality MR is not CT")
    assert retention(spool, journal, keep_days=None, keep_failed_days=None).sweep(utcnow() + timedelta(days=999)) == []
    assert all(path.exists() for path in files)
    assert len(retention(spool, journal, keep_days=1).sweep(utcnow() + timedelta(days=2))) == 1
    assert not any(path.exists() for path in files)


def test_quarantined_files_deleted_after_keep_failed_days_never_overwritten(node_state, tmp_path, caplog):
    spool, journal = node_state
    (first, second) = (receive(spool, journal, count=1, series_uid=uid)[0] for uid in (SERIES, SERIES + ".9"))
    same_name = first.with_name("1.2.3.dcm"), second.with_name("1.2.3.dcm")  # one SOP UID in two series folders
    for source, path in zip((first, second), same_name):
        source.rename(path)
    moved = [spool.quarantine(path, f"reconcile could not journal it: copy {n}") for n, path in enumerate(same_name)]
    assert [path.name for path in moved] == ["1.2.3.dcm", "1.2.3.2.dcm"]
    assert [path.read_bytes() for path in moved] == [b"DICM-ish bytes of instance 1"] * 2
    assert sorted(item.reason for item in spool.quarantined()) == [
        "reconcile could not journal it: copy 0", "reconcile could not journal it: copy 1"]
    sweeper = retention(spool, journal, keep_days=7, keep_failed_days=30)
    sweeper.sweep(utcnow() + timedelta(days=29))
    assert all(path.exists() for path in moved)
    assert retention(spool, journal, keep_days=1, keep_failed_days=None).sweep(utcnow() + timedelta(days=999)) == []
    assert all(path.exists() for path in moved)
    with caplog.at_level("INFO", logger="dicom_node.store.retention"):
        sweeper.sweep(utcnow() + timedelta(days=30, minutes=1))
    assert list(spool.quarantine_root.iterdir()) == []
    assert "quarantined file deleted: 1.2.3.2.dcm (28 bytes" in caplog.text and "copy 1" in caplog.text


def test_resent_duplicate_counts_as_activity(node_state, tmp_path):
    spool, journal = node_state
    files = receive(spool, journal)
    processed(journal, tmp_path / "results")
    sweeper = retention(spool, journal, keep_days=7)
    age(journal, SERIES, days=10)  # the series was delivered 10 days ago
    journal.note_duplicate(journal.find_instance(f"{SERIES}.1"))  # a sender re-sends it today
    assert sweeper.sweep() == []
    assert all(path.exists() for path in files)
    assert len(sweeper.sweep(utcnow() + timedelta(days=7, minutes=1))) == 1



def test_a_resend_and_a_purge_of_one_generation_exclude_each_other_in_the_journal(node_state, tmp_path):
    """Whichever of the two is recorded first decides: a re-send noted after retention's check keeps the
    purge off; once the purge has started, a re-send is not held."""
    spool, journal = node_state
    receive(spool, journal)
    processed(journal, tmp_path / "results")
    age(journal, SERIES, days=10)
    (checked,) = journal.settled_series(SERIES, 1)
    assert journal.note_duplicate(journal.find_instance(f"{SERIES}.1"))  # a re-send after the check
    assert not journal.start_purge(SERIES, 1, checked.series.last_received_at, "retention: done")
    assert journal.get_series(SERIES, 1).state == "routed"
    (again,) = journal.settled_series(SERIES, 1)  # the next sweep's check sees the re-send
    assert journal.start_purge(SERIES, 1, again.series.last_received_at, "retention: done")
    assert journal.get_series(SERIES, 1).state == "purged"
    assert not journal.note_duplicate(journal.find_instance(f"{SERIES}.2"))  # too late: not held
    assert not journal.start_purge(SERIES, 1, again.series.last_received_at, "retention: done")  # once


def test_short_of_space_purges_done_series_oldest_first(tmp_path):
    """Below free_disk_target_mb, done series go before their keep time, oldest first, only until there is
    space again; a failed series stays (on a real, small tmpfs)."""
    megabyte = 1024 * 1024
    with small_tmpfs(tmp_path / "disk", 16) as disk:
        spool = Spool(disk)
        journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
        try:
            uids = {name: f"{SERIES}.{index}" for index, name in enumerate(("failed", "old", "middle", "new"), 1)}
            for days, (name, uid) in zip((10, 3, 2, 1), uids.items()):
                receive(spool, journal, count=2, series_uid=uid, size=megabyte)
                processed(journal, tmp_path / "results", series_uid=uid,
                          job_state="failed" if name == "failed" else "done")
                age(journal, uid, days)
            target_mb = spool.free_bytes() / megabyte + 3  # two series of 2 MB must go
            sweeper = retention(spool, journal, keep_days=7, keep_failed_days=30, free_disk_target_mb=target_mb)
            purged = sweeper.sweep()
            assert [p.series_instance_uid for p in purged] == [uids["old"], uids["middle"]]
            assert all(p.bytes >= 2 * megabyte for p in purged)
            assert spool.free_bytes() >= target_mb * megabyte
            for name in ("failed", "new"):
                assert len(journal.series_instances(uids[name], 1)) == 2
                assert all(Path(i.path).exists() for i in journal.series_instances(uids[name], 1))
            reason = journal.get_series(uids["old"], 1).reason
            assert reason.startswith("retention: done, purged early: ") and "below retention.free_disk_target_mb" in reason
            assert sweeper.sweep() == []  # there is space again
        finally:
            journal.close()

def test_series_sent_again_after_purge_is_a_new_generation(node_state, tmp_path):
    spool, journal = node_state
    receive(spool, journal)
    job_id = processed(journal, tmp_path / "results")
    retention(spool, journal, keep_days=0).sweep()
    again = receive(spool, journal)  # the same instances, the same UIDs
    assert all(path.exists() for path in again)
    assert journal.get_series(SERIES).generation == 2
    assert len(journal.series_instances(SERIES, 2)) == 3
    with pytest.raises(NotRetryable, match=r"generation 1 is no longer in the spool \(retention: done"):
        requeue(AuditLog(journal), journal.get_job(job_id), "a test")


def test_interrupted_purge_is_finished_and_left_alone_by_reconcile(node_state, tmp_path):
    spool, journal = node_state
    files = receive(spool, journal)
    processed(journal, tmp_path / "results")
    # The node stopped mid-purge: the state was journaled, one file deleted, the rows not yet.
    journal.set_series_state(SERIES, 1, "purged", reason="retention: done")
    files[0].unlink()
    reconcile(spool, journal)  # the restart
    assert len(journal.series_instances(SERIES, 1)) == 3
    assert journal.get_series(SERIES, 1).instance_count == 3
    (finished,) = retention(spool, journal, keep_days=7).sweep()
    assert finished.instances == 3
    assert not any(path.exists() for path in files)
    assert journal.series_instances(SERIES, 1) == []


def test_serve_purges_on_schedule_and_takes_the_series_again(tmp_path):
    """The sweep runs in `dicom-node serve`: an unmatched series (this node has no pipelines) leaves the
    spool, the journal shows it purged, and the same series sent again is stored as generation 2."""
    files = write_ct_series(tmp_path / "series", 3, rows=64, columns=64)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with running_node(tmp_path / "node", retention={"keep_days": 0, "sweep_interval_s": 0.5}) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "series purged" not in node.log_text():
            time.sleep(0.2)
        assert node.spool_files() == []
        (generation,) = get_json(node, f"/v1/series/{series_uid}")["generations"]
        assert generation["state"] == "purged" and generation["reason"].startswith("retention: done")
        assert samples(node)[("dicom_node_series_purged_total", (("outcome", "done"),))] == 1
        assert dcmtk.storescu(node.port, files).returncode == 0
        assert len(node.spool_files()) == 3
        assert [g["generation"] for g in get_json(node, f"/v1/series/{series_uid}")["generations"]] == [1, 2]


def test_instances_of_one_series_are_received_side_by_side_and_a_purge_waits_for_them(tmp_path):
    """Receiving holds its series shared: two instances of one series are inside at once. A purge of the
    series waits until both have left, and an instance arriving while the purge waits comes after it."""
    spool = Spool(tmp_path / "storage")
    # Three instances on three different instance-lock stripes (str hashes change from run to run): two
    # sharing a stripe would take turns, by design, and never be inside at once.
    keys, stripes = [], set()
    for number in range(1, 100):
        key = InstanceKey("1.2", "1.2.3", f"1.2.3.{number}")
        if hash(key.sop_instance_uid) % LOCK_STRIPES not in stripes:
            keys.append(key)
            stripes.add(hash(key.sop_instance_uid) % LOCK_STRIPES)
    first, second, late = keys[:3]
    order: list[str] = []
    # The two receivers and this thread: it trips only while both instances are inside at once.
    both_inside, leave = threading.Barrier(3, timeout=30), threading.Event()

    def receive(key: InstanceKey) -> None:
        with spool.receiving(key):
            if key is late:
                order.append("late received")
                return
            both_inside.wait()
            leave.wait(30)
            order.append(f"{key.sop_instance_uid} left")

    def purge() -> None:
        with spool.purging("1.2.3"):
            order.append("purged")
    receivers = [threading.Thread(target=receive, args=(key,)) for key in (first, second)]
    for thread in receivers:
        thread.start()
    both_inside.wait()  # the purge starts once both are inside, however slowly the threads get going
    purger = threading.Thread(target=purge)
    purger.start()
    deadline = time.monotonic() + 10
    while not spool._series_locks[hash("1.2.3") % len(spool._series_locks)]._exclusive_waiting:
        assert time.monotonic() < deadline, "the purge never started waiting"
        time.sleep(0.01)
    late_receiver = threading.Thread(target=receive, args=(late,))
    late_receiver.start()
    time.sleep(0.2)
    assert order == [], "nothing may pass while both instances are being received"
    leave.set()
    for thread in [*receivers, purger, late_receiver]:
        thread.join(30)
    assert sorted(order[:2]) == sorted(f"{key.sop_instance_uid} left" for key in (first, second))
    assert order[2:] == ["purged", "late received"]


def test_a_series_re_sent_to_a_node_while_another_nodes_retention_purges_it_is_never_acknowledged_and_lost(
        tmp_path, postgres_server):
    """Node B (`dicom-node serve`) and node A (this process's retention) share a PostgreSQL journal and the
    spool. The series is re-sent to node B at three moments of node A's purge: right after A decided the
    series is due (the re-send keeps it), after A started the purge but before it deleted files (each copy
    is refused: not held), and after A deleted the files but not their rows (each copy is refused, and its
    new file removed). Whatever B acknowledged is on disk; after the purge the series is stored anew."""
    files = write_ct_series(tmp_path / "series", 3, rows=64, columns=64)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    url = postgres_server.new_database()
    with running_node(tmp_path / "node", node={"journal_url": url}) as node:  # no pipeline: unmatched, settled
        assert len(dcmtk.storescu(node.port, files).acknowledged) == 3
        node.wait_for_completion(series_uid)
        resends: dict[str, dcmtk.StoreResult] = {}

        class NodeA(Journal):
            """Node A's journal, re-sending the series to node B at `moment` of the purge."""
            moment = ""

            def resend_at(self, moment: str) -> None:
                if moment == self.moment and moment not in resends:
                    resends[moment] = dcmtk.storescu(node.port, files, extra=["--no-halt"])

            def start_purge(self, *args) -> bool:
                self.resend_at("decided")
                return super().start_purge(*args)

            def series_instances(self, *args):  # _delete_files' first step, after the purge started
                self.resend_at("started")
                return super().series_instances(*args)

            def forget_instances(self, *args) -> int:  # after the files, before the rows
                self.resend_at("files deleted")
                return super().forget_instances(*args)

        node_a = NodeA(url)
        try:
            sweeper = retention(Spool(node.storage), node_a, keep_days=0)
            node_a.moment = "decided"
            assert sweeper.sweep() == []  # the re-send noted in between keeps the series
            assert resends["decided"].statuses() == ["Success"] * 3
            assert len(node.spool_files()) == 3 and node_a.get_series(series_uid, 1).state == "unmatched"

            node_a.moment = "started"
            (purged,) = sweeper.sweep()
            assert purged.instances == 3
            assert resends["started"].statuses() == ["Refused: OutOfResources"] * 3, resends["started"].output

            node_a.moment = "files deleted"
            assert dcmtk.storescu(node.port, files).statuses() == ["Success"] * 3  # stored anew: generation 2
            node.wait_for_completion(series_uid, generation=2)
            assert len(node.spool_files()) == 3
            assert len(sweeper.sweep()) == 1
            assert resends["files deleted"].statuses() == ["Refused: OutOfResources"] * 3, resends["files deleted"].output
            assert node.spool_files() == []  # the refused copies' files were removed, and nothing was acknowledged
            assert node_a.get_series(series_uid).state == "purged"
        finally:
            node_a.close()
        assert "which retention is deleting now: send it again in a minute" in node.log_text()
        assert dcmtk.storescu(node.port, files).statuses() == ["Success"] * 3
        assert len(node.spool_files()) == 3 and node.wait_for_completion(series_uid, generation=3)
