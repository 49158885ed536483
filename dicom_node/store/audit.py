"""The audit log: who sent what, what the node made of it, where it went and with what status.

One row per fact, kept in the journal's database (table `audit`) so it shares
its durability and backups, and queried by `GET /v1/audit` and `dicom-node
audit`. Events:

- `received`: an association delivered instances of a series (calling AE, peer
  host, study/series, instance count), written when the association ends;
- `produced`: a job finished and wrote result instances (or failed, with why);
- `sent` / `failed`: one dispatch pass to one destination for one job, with the
  instance count and the DIMSE status or association failure;
- `retry`: an admin requeued a job (`POST /v1/jobs/{id}/retry`, the CLI, the console) or a dead-lettered
  export;
- `discard`: an admin gave a failed job or a dead-lettered export up (the console);
- `login` / `logout` / `login-failed`: a person and the console (who, from which host);
- `login-locked`: a user name reached its failed logins from one host and is refused from there for a
  while (dicom_node.ops.console.access);
- `purged`: retention deleted a series' files (instance count, why);
- `quarantined`: a received instance was kept in the quarantine instead of the spool (another payload
  under a stored SOP Instance UID), with why and where;
- `model_installed` / `model_removed`: an admin installed a model version or removed a model or version
  (`PUT`/`DELETE /admin/model/{name}`, dicom_node.ops.model_admin), or was refused (status `refused`, the
  reason in detail); detail starts with who (`by token`: the bearer token's holder);
- `inferred`: an inference request of the HTTP API (dicom_node.ops.infer_api): the pipeline or model, the
  series for DICOM input, and the outcome.

Every admin action names who did it in `actor`: a console user's name,
`token` (the bearer token), `cli:<OS user>`, or `anonymous` (a loopback API
without a token). The table is created here, not in journal.py, so the journal's schema for the
stages stays what the stages need; it lives on the same engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, select

from dicom_node.store.journal import Journal, utcnow
from dicom_node.store.schema import ensure_tables

AUDIT_EVENTS = ("received", "produced", "sent", "failed", "retry", "discard", "purged", "quarantined", "login",
                "logout", "login-failed", "login-locked", "model_installed", "model_removed", "inferred")

_metadata = MetaData()
audit = Table(
    "audit", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("calling_ae", String(16)),
    Column("host", String(64)),
    Column("study_instance_uid", String(64)),
    Column("series_instance_uid", String(64), index=True),
    Column("job_id", Integer),
    Column("destination", String(128)),
    Column("instance_count", Integer),
    Column("status", String(64)),
    Column("detail", Text),
    Column("actor", String(64)),  # who did an admin action (module docstring)
)


@dataclass(frozen=True)
class AuditEvent:
    event: str
    calling_ae: str | None = None
    host: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    job_id: int | None = None
    destination: str | None = None
    instance_count: int | None = None
    status: str | None = None
    detail: str | None = None
    actor: str | None = None


@dataclass(frozen=True)
class AuditRecord(AuditEvent):
    id: int = 0
    time: datetime | None = None


class AuditLog:
    """Append and query audit rows through the journal's engine and writer lock."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        ensure_tables(journal.engine, journal.write, _metadata)

    def record(self, event: AuditEvent) -> None:
        if event.event not in AUDIT_EVENTS:
            raise ValueError(f"unknown audit event {event.event!r}")
        with self.journal.write() as conn:
            conn.execute(audit.insert().values(time=utcnow(), **dataclasses.asdict(event)))

    def query(self, *, series_instance_uid: str | None = None, study_instance_uid: str | None = None,
              job_id: int | None = None, event: str | None = None, since: datetime | None = None,
              limit: int = 100) -> list[AuditRecord]:
        """Newest first."""
        query = select(audit)
        for column, value in (("series_instance_uid", series_instance_uid), ("study_instance_uid", study_instance_uid),
                              ("job_id", job_id), ("event", event)):
            if value is not None:
                query = query.where(audit.c[column] == value)
        if since is not None:
            query = query.where(audit.c.time >= since)
        return self.journal.select(AuditRecord, query.order_by(audit.c.id.desc()).limit(limit))

