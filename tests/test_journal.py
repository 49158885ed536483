"""The journal's own rules: duplicates, generations, idempotent jobs and exports, WAL mode."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from dicom_node.journal import Journal, NewInstance, utcnow


@pytest.fixture()
def journal(journal_url):
    j = Journal(journal_url)
    yield j
    j.close()


def instance(sop: str, series: str = "1.2.3", path: str | None = None) -> NewInstance:
    return NewInstance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
                       study_instance_uid="1.2", path=path or f"/spool/{sop}.dcm", calling_ae="SCANNER",
                       called_ae="DICOMNODE", transfer_syntax="1.2.840.10008.1.2.1", size=100, modality="CT",
                       series_description="Abdomen")


def test_sqlite_runs_in_wal_with_full_sync(tmp_path):
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    try:
        with journal.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    finally:
        journal.close()


def test_duplicate_not_counted_twice(journal):
    first, new = journal.record_instance(instance("1.1"))
    again, new_again = journal.record_instance(instance("1.1", path="/elsewhere.dcm"))
    assert new and not new_again
    assert again == first
    assert journal.get_series("1.2.3").instance_count == 1


def test_late_instance_opens_generation_two(journal):
    journal.record_instance(instance("1.1"))
    journal.record_instance(instance("1.2"))
    done = journal.complete_series("1.2.3", 1)
    assert done.state == "complete" and done.instance_count == 2
    late, _ = journal.record_instance(instance("1.3"))
    assert late.generation == 2
    assert journal.get_series("1.2.3").generation == 2
    assert journal.get_series("1.2.3", 1).instance_count == 2
    assert journal.complete_series("1.2.3", 1) is None  # already complete


def test_complete_refused_when_an_instance_arrived_after_quiet_since(journal):
    journal.record_instance(instance("1.1"))
    assert journal.complete_series("1.2.3", 1, quiet_since=utcnow() - timedelta(seconds=5)) is None
    assert journal.get_series("1.2.3").state == "receiving"


def test_delete_instance_uncounts(journal):
    journal.record_instance(instance("1.1"))
    journal.record_instance(instance("1.2"))
    assert journal.delete_instance("1.1").sop_instance_uid == "1.1"
    assert journal.get_series("1.2.3").instance_count == 1
    assert journal.find_instance("1.1") is None


def test_jobs_and_exports_are_idempotent(journal):
    job = journal.add_job("1.2.3", 1, "spleen")
    assert journal.add_job("1.2.3", 1, "spleen").id == job.id
    running = journal.update_job(job.id, state="running", attempts=1, started_at=utcnow())
    assert running.state == "running" and running.attempts == 1
    export = journal.add_export(job.id, "pacs", "9.9", "/out/9.9.dcm")
    assert journal.add_export(job.id, "pacs", "9.9", "/out/9.9.dcm").id == export.id
    assert [e.id for e in journal.exports_in_state("pending", due_before=utcnow())] == [export.id]
    sent = journal.update_export(export.id, state="sent", last_status=0, sent_at=utcnow())
    assert sent.state == "sent" and journal.exports_in_state("pending") == []
    with pytest.raises(ValueError):
        journal.update_job(job.id, state="bogus")
