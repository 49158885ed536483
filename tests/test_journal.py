"""The journal's own rules: duplicates, generations, idempotent jobs and exports, WAL mode."""

from __future__ import annotations

import dataclasses

from datetime import timedelta

import pytest
from sqlalchemy import Column, MetaData, String, Table, create_engine, inspect, text

from dicom_node import JournalSchemaError
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import Journal, NewInstance, StepOutcome, utcnow
from dicom_node.store.schema import instances
from dicom_node.states import ExportState, JobKind, JobState


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
    assert type(sent.state) is ExportState and type(running.state) is JobState and running.kind == JobKind.PIPELINE
    with pytest.raises(ValueError):
        journal.update_job(job.id, state="bogus")
    with pytest.raises(ValueError):
        journal.update_export(export.id, state="bogus")


def test_step_outcomes_of_a_run_replace_the_previous_runs(journal):
    job = journal.add_job("1.2.3", 1, "chest_ct")
    other = journal.add_job("1.2.3", 1, "spleen_ct")
    assert journal.job_steps(job.id, other.id) == {job.id: [], other.id: []}  # not run yet
    journal.record_steps(job.id, [StepOutcome("lungs", "ok"), StepOutcome("covid", "failed", "not installed"),
                                  StepOutcome("report", "skipped", "needs step covid, which did not run")])
    journal.record_steps(other.id, [StepOutcome("spleen", "ok")])
    assert [str(s) for s in journal.job_steps(job.id)[job.id]] == [
        "lungs: ok", "covid: failed (not installed)", "report: skipped (needs step covid, which did not run)"]
    journal.record_steps(job.id, [StepOutcome("lungs", "ok"), StepOutcome("covid", "ok")])  # retried
    assert journal.job_steps(job.id, other.id) == {
        job.id: [StepOutcome("lungs", "ok"), StepOutcome("covid", "ok")], other.id: [StepOutcome("spleen", "ok")]}
    with pytest.raises(ValueError, match="unknown step state"):
        journal.record_steps(job.id, [StepOutcome("lungs", "partly")])


def _alter(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def test_an_older_versions_journal_is_upgraded_in_place(journal_url, caplog):
    """An upgraded node opens the journal its older self wrote; columns added since (nullable) are added."""
    old = Journal(journal_url)
    old.record_instance(instance("1.1"))
    AuditLog(old).record(AuditEvent("received", series_instance_uid="1.2.3", instance_count=1))
    old.close()
    _alter(journal_url, "DROP TABLE job_steps", "ALTER TABLE series DROP COLUMN reason",
           "DROP INDEX ix_series_patient_id", "ALTER TABLE series DROP COLUMN patient_id",
           "ALTER TABLE jobs DROP COLUMN output_dir",
           "DROP INDEX ix_audit_series_instance_uid", "ALTER TABLE audit DROP COLUMN series_instance_uid")
    with caplog.at_level("WARNING", logger="dicom_node.store.schema"):
        upgraded = Journal(journal_url)
        audit = AuditLog(upgraded)
    try:
        assert "journal upgraded in place: added " in caplog.text
        assert "series.reason" in caplog.text and "jobs.output_dir" in caplog.text
        assert "series.patient_id" in caplog.text
        assert upgraded.get_series("1.2.3", 1).patient_id is None  # an older version did not record it
        upgraded.record_instance(dataclasses.replace(instance("9.1", series="9.9"), patient_id="P-9"))
        assert upgraded.get_series("9.9").patient_id == "P-9"
        assert "audit.series_instance_uid" in caplog.text
        assert "ix_audit_series_instance_uid" in {i["name"] for i in inspect(upgraded.engine).get_indexes("audit")}
        audit.record(AuditEvent("received", series_instance_uid="1.2.3", instance_count=2))
        assert [e.instance_count for e in audit.query(series_instance_uid="1.2.3")] == [2]
        assert upgraded.find_instance("1.1").size == 100  # what the older version stored is kept
        upgraded.complete_series("1.2.3", 1)
        upgraded.set_series_state("1.2.3", 1, "unmatched", reason="no pipeline")
        assert upgraded.get_series("1.2.3", 1).reason == "no pipeline"
        job = upgraded.add_job("1.2.3", 1, "spleen_ct")
        assert upgraded.update_job(job.id, output_dir="/results/1").output_dir == "/results/1"
        upgraded.record_steps(job.id, [StepOutcome("spleen", "ok")])  # the table added since, created
        assert upgraded.job_steps(job.id) == {job.id: [StepOutcome("spleen", "ok")]}
    finally:
        upgraded.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dicom_node.store.schema"):
        again = Journal(journal_url)
        AuditLog(again)
        again.close()
    assert "upgraded" not in caplog.text  # once


def test_an_older_versions_forward_jobs_get_their_kind_and_rule_name(journal_url, caplog):
    """Before jobs had a kind, a forward rule's job was named `forward:<rule>`: after the upgrade it is kind
    forward with the rule's name; a pipeline job keeps its kind and name, and a prefixed job whose rule
    name a pipeline job of the same series generation already has keeps its prefixed name."""
    Journal(journal_url).close()
    _alter(journal_url, "ALTER TABLE jobs DROP COLUMN kind",
           *(f"INSERT INTO jobs (series_instance_uid, generation, pipeline, state, attempts, created_at) "
             f"VALUES ('1.2.3', {generation}, '{name}', 'done', 1, '2026-01-01 00:00:00')"
             for generation, name in ((1, "forward:archive"), (1, "spleen_ct"), (2, "forward:spleen_ct"),
                                      (2, "spleen_ct"))))
    with caplog.at_level("WARNING", logger="dicom_node.store.schema"):
        upgraded = Journal(journal_url)
    try:
        jobs = {(j.generation, j.pipeline): j.kind for j in upgraded.jobs_in_state("done")}
        assert jobs == {(1, "archive"): "forward", (1, "spleen_ct"): "pipeline",
                        (2, "forward:spleen_ct"): "forward", (2, "spleen_ct"): "pipeline"}
        assert all(type(kind) is JobKind for kind in jobs.values())
        assert "jobs.kind" in caplog.text and "2 forward jobs given kind forward, 1 of them renamed to their rule" in caplog.text
        assert "1 keep their 'forward:' name" in caplog.text
        again = upgraded.add_job("1.2.3", 1, "archive", JobKind.FORWARD)
        assert (again.kind, again.state) == (JobKind.FORWARD, JobState.DONE)  # the migrated job, not a new one
    finally:
        upgraded.close()


def test_a_journal_this_version_cannot_use_is_refused_naming_the_columns(journal_url):
    """A column that must have a value is missing, or a newer version's journal has one this version
    would leave empty: refused before anything is written, so no C-STORE is acknowledged into it."""
    Journal(journal_url).close()
    _alter(journal_url, "ALTER TABLE instances DROP COLUMN size",
           "ALTER TABLE exports ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",  # newer, has a default: fine
           "ALTER TABLE exports ADD COLUMN note TEXT")  # newer, may be empty: fine
    with pytest.raises(JournalSchemaError) as refused:
        Journal(journal_url)
    assert str(refused.value).endswith("cannot be used as it is: instances.size is missing and must have a value")


def test_a_newer_versions_required_column_is_refused(journal_url):
    newer = MetaData()
    Table("instances", newer, *(Column(c.name, c.type, nullable=c.nullable, primary_key=c.primary_key)
                                for c in instances.columns),
          Column("checksum", String(64), nullable=False))
    engine = create_engine(journal_url)
    newer.create_all(engine)
    engine.dispose()
    with pytest.raises(JournalSchemaError, match=r"instances\.checksum is unknown to this version and must have a "
                                                 r"value \(a newer version's journal\?\)"):
        Journal(journal_url)


def test_a_postgresql_restart_fails_no_write(postgres_server):
    """After a database restart (maintenance, failover) the pooled connections are dead; the journal
    checks a connection before use, so the next C-STORE's insert does not fail on one."""
    journal = Journal(postgres_server.new_database())
    try:
        journal.record_instance(instance("1.1"))
        postgres_server.restart()
        record, new = journal.record_instance(instance("1.2"))
        assert new and journal.get_series("1.2.3", 1).instance_count == 2
    finally:
        journal.close()
