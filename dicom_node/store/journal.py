"""The state store: instances, series, jobs and exports (SQLAlchemy Core; SQLite in WAL mode by default).

Every stage hands over through these tables, so each can restart on its own.
SQLite runs with `journal_mode=WAL` (readers never block the one writer) and
`synchronous=FULL`: in WAL mode NORMAL may lose the last commits on power
loss, and the receiver acknowledges a C-STORE only after its row is
committed, so the commit must be on disk. PostgreSQL works as well
(`postgresql+psycopg://...`, its default synchronous commit; the tests run
on both); one process-wide writer lock keeps writes serial, and the
instances that concurrent associations record share one transaction and
commit (`record_instance`, `dicom_node.store.group_commit`).

Series identity is (Series Instance UID, generation): a new instance that
arrives after a series was complete opens a new generation, so late data is
never lost and never silently merged into a result already produced. The new
generation supersedes the earlier ones: their instances move into it (its jobs
see the whole series), their queued jobs and undelivered exports are
`superseded`, and so is the generation itself. A re-sent copy of an instance
the journal holds opens nothing.

An upgraded node opens the journal its older self wrote: the tables and their
in-place upgrade are `dicom_node.store.schema`'s.

Over 400 lines for a reason: each method of `Journal` is one transaction
(recording instances: one per batch), and several span tables (superseding a
generation touches four of them, also from inside a batch of recorded
instances), so they stay together, beside the records they return.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import and_, bindparam, case, create_engine, event, func, select, true
from sqlalchemy.engine import Connection, Dialect, Engine

from dicom_node.logs import series_context
from dicom_node.store.group_commit import GroupCommit
from dicom_node.states import ExportState, JobKind, JobState, SeriesState, StepState
from dicom_node.store.schema import (ensure_tables, exports, instances, job_steps, jobs, metadata, series,
                                     type_forward_jobs)

log = logging.getLogger(__name__)

# The states of a generation whose instances are still its own: a new generation takes them over.
HOLDS_INSTANCES = (SeriesState.COMPLETE, SeriesState.ROUTED, SeriesState.UNMATCHED, SeriesState.QUARANTINED)
# The states in which a generation is done with, once its jobs and exports are: what retention may purge.
SETTLED_STATES = (SeriesState.ROUTED, SeriesState.UNMATCHED, SeriesState.QUARANTINED, SeriesState.SUPERSEDED)

_FIND_INSTANCE = select(instances).where(instances.c.sop_instance_uid == bindparam("sop"))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    generation: int
    path: str
    calling_ae: str
    transfer_syntax: str
    size: int
    received_at: datetime


@dataclass(frozen=True)
class SeriesRecord:
    series_instance_uid: str
    generation: int
    study_instance_uid: str
    state: SeriesState
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    calling_ae: str
    called_ae: str
    modality: str
    series_description: str
    completed_at: datetime | None
    reason: str | None
    patient_id: str | None = None  # None: written by a version that did not record it
    accession_number: str | None = None
    study_date: str | None = None


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_instance_uid: str
    generation: int
    pipeline: str  # the pipeline's name, or the forward rule's for kind FORWARD
    state: JobState
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    output_dir: str | None
    kind: JobKind
    lease_owner: str | None = None  # the node running it, on a shared journal (dicom_node.store.leases)
    lease_until: datetime | None = None


@dataclass(frozen=True)
class StepOutcome:
    """One step of a job's run: `ok`, `failed` (reason: why) or `skipped` (reason: the failed step it needs)."""

    step: str
    state: StepState
    reason: str | None = None

    def __str__(self) -> str:
        return f"{self.step}: {self.state}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class ExportRecord:
    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    path: str
    state: ExportState
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    reason: str | None
    sent_at: datetime | None
    lease_owner: str | None = None  # the node sending it right now, on a shared journal
    lease_until: datetime | None = None


def as_record(cls, row):
    """A result row as the record dataclass `cls` (columns it has no field for left out), datetimes UTC-aware,
    states and kinds as their enum members."""
    fields, enums = cls.__dataclass_fields__, _enum_fields(cls)
    return cls(**{k: (_aware(v) if isinstance(v, datetime) else enums[k](v) if k in enums and v is not None else v)
                  for k, v in row._mapping.items() if k in fields})


@functools.cache
def _enum_fields(cls) -> dict[str, type[enum.Enum]]:
    """The fields of record class `cls` typed as an enum, with their enum."""
    return {name: hint for name, hint in typing.get_type_hints(cls).items()
            if isinstance(hint, type) and issubclass(hint, enum.Enum)}


@dataclass(frozen=True)
class NewInstance:
    """What the receiver knows about an instance it has just written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    calling_ae: str
    called_ae: str
    transfer_syntax: str
    size: int
    modality: str
    series_description: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""


@dataclass
class _PendingInstance:
    """An instance waiting for its batch; what its recording superseded, for the log line after the commit."""

    new: NewInstance
    received_at: datetime
    superseded: list[int] = field(default_factory=list)
    taken_over: int = 0


class _InstanceStatements:
    """The statements that record an instance, as SQL for the driver itself: they run for every
    instance while its sender waits, and SQLAlchemy's Core cost more than twice the CPU for them
    (docs/performance.md, "Where ingest time goes"). Built once per dialect: its parameter
    marker, and the SQLAlchemy column types' own conversion of timestamps, so rows read back the same
    through the rest of the journal."""

    _MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
    _INSTANCE_COLUMNS = tuple(InstanceRecord.__dataclass_fields__)
    _SERIES_COLUMNS = ("series_instance_uid", "generation", "study_instance_uid", "state", "instance_count",
                       "first_received_at", "last_received_at", "calling_ae", "called_ae", "modality",
                       "series_description", "patient_id", "accession_number", "study_date")

    def __init__(self, dialect: Dialect):
        if dialect.paramstyle not in self._MARKERS:
            raise ValueError(f"journal driver {dialect.driver!r} uses parameter style {dialect.paramstyle!r}; "
                             f"the journal supports {', '.join(self._MARKERS)}")
        mark = self._MARKERS[dialect.paramstyle]
        timestamp = instances.c.received_at.type
        self.time = timestamp.dialect_impl(dialect).bind_processor(dialect) or (lambda value: value)
        self._read_time = timestamp.dialect_impl(dialect).result_processor(dialect, None) or (lambda value: value)
        self._mark = mark
        self.latest_generation = (f"SELECT generation, state FROM series WHERE series_instance_uid = {mark} "
                                  f"ORDER BY generation DESC LIMIT 1")
        self.count_in_generation = (f"UPDATE series SET instance_count = instance_count + {mark}, last_received_at = "
                                    f"{mark} WHERE series_instance_uid = {mark} AND generation = {mark}")
        self.insert_series = (f"INSERT INTO series ({', '.join(self._SERIES_COLUMNS)}) "
                              f"VALUES ({', '.join([mark] * len(self._SERIES_COLUMNS))})")
        self._instance_values = f"({', '.join([mark] * len(self._INSTANCE_COLUMNS))})"

    def find_instances(self, count: int) -> str:
        """The rows of `count` SOP Instance UIDs, sop_instance_uid first."""
        return (f"SELECT {', '.join(self._INSTANCE_COLUMNS)} FROM instances "
                f"WHERE sop_instance_uid IN ({', '.join([self._mark] * count)})")

    def insert_instances(self, count: int) -> str:
        """One INSERT of `count` instance rows (one statement: executemany would step the database once per
        row, each step a hand-over of the GIL)."""
        return (f"INSERT INTO instances ({', '.join(self._INSTANCE_COLUMNS)}) "
                f"VALUES {', '.join([self._instance_values] * count)}")

    def instance_row(self, record: InstanceRecord) -> tuple:
        return tuple(self.time(getattr(record, name)) if name == "received_at" else getattr(record, name)
                     for name in self._INSTANCE_COLUMNS)

    def instance_record(self, row: tuple) -> InstanceRecord:
        values = dict(zip(self._INSTANCE_COLUMNS, row))
        values["received_at"] = _aware(self._read_time(values["received_at"]))
        return InstanceRecord(**values)


@dataclass(frozen=True)
class SettledSeries:
    """A series generation no stage will touch again unless an admin retries something."""

    series: SeriesRecord
    failed: bool  # quarantined, a failed job or a dead-lettered export
    last_activity: datetime  # its latest receipt, completion, job end or delivery


class Journal:
    """Typed access to the state store; safe to call from many threads."""

    def __init__(self, url: str):
        self.url = url
        # A database server restarts (maintenance, failover) and leaves the pooled connections dead:
        # each is checked with a round trip before use, so no C-STORE fails on one.
        self.engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock()
        self._sql = _InstanceStatements(self.engine.dialect)
        self._recorder = GroupCommit(self.engine, self._write_lock, self._record_batch, self._recorded)
        ensure_tables(self.engine, self.write, metadata)
        type_forward_jobs(self.engine, self.write)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction under the journal's lock: SQLite has one writer at a time, and
        waiting here is cheaper than its busy-retry. For modules with tables of their own (audit)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def select(self, cls, query) -> list:
        """The rows of `query` as `cls` records."""
        with self.engine.connect() as conn:
            return [as_record(cls, row) for row in conn.execute(query)]

    # --- instances -------------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_FIND_INSTANCE, {"sop": sop_instance_uid}).first()
        return as_record(InstanceRecord, row) if row else None

    def record_instance(self, new: NewInstance, received_at: datetime | None = None) -> tuple[InstanceRecord, bool]:
        """Insert the instance and count it in its series' open generation, once that is committed.

        Returns (record, True) for a new instance. A SOP Instance UID already in
        the journal returns (existing record, False) and changes nothing: a
        duplicate is never stored or counted twice. When the series' latest
        generation is no longer `receiving`, a new generation is opened that
        supersedes the earlier ones (`_supersede`).

        Instances recorded at the same time by several associations share one
        transaction and its one commit (`GroupCommit`): on a disk that honours
        fsync the commit is most of what a row costs, and each caller returns only
        once its batch is on disk. Rows are applied one after another in the
        transaction, so duplicates and generations come out as if recorded one
        by one.
        """
        return self._recorder.submit(_PendingInstance(new, received_at or utcnow()))

    def record_instances(self, instances: list[NewInstance], received_at: datetime | None = None
                         ) -> list[tuple[InstanceRecord, bool] | BaseException]:
        """`record_instance` for several at once, in one transaction with whatever else is queued: for each,
        its (record, new) once committed, or the error that kept its row out (the others still committed)."""
        now = received_at or utcnow()
        return self._recorder.submit_all([_PendingInstance(new, now) for new in instances])

    def _record_batch(self, conn: Connection, batch: list[_PendingInstance]) -> list[tuple[InstanceRecord, bool]]:
        """Record the pending instances in order, in the caller's transaction, with a few statements for the
        whole batch: one look-up of their SOP Instance UIDs, one of each series' latest generation, one count
        per series generation and one insert of all the rows. Each statement gives the GIL up while the
        database works and must win it back from the receiving threads, so it is the number of statements,
        not their size, that holds the journal's lock longest. The hot statements go straight to the driver
        (`_InstanceStatements`)."""
        sql = self._sql
        for series_uid in sorted({pending.new.series_instance_uid for pending in batch}):
            _lock_series(conn, series_uid)  # sorted: two nodes' batches never wait on each other in a cycle
        cursor = conn.connection.cursor()
        try:
            uids = [pending.new.sop_instance_uid for pending in batch]
            cursor.execute(sql.find_instances(len(uids)), uids)
            existing = {row[0]: sql.instance_record(row) for row in cursor.fetchall()}
            open_generations: dict[str, int] = {}
            counted: dict[tuple[str, int], tuple[int, datetime]] = {}  # (series, generation) -> (new rows, latest)
            results: list[tuple[InstanceRecord, bool]] = []
            rows = []
            for pending in batch:
                pending.superseded, pending.taken_over = [], 0  # a batch retried one by one records it again
                found = existing.get(pending.new.sop_instance_uid)
                if found is not None:
                    results.append((found, False))
                    continue
                record = self._place(conn, cursor, pending, open_generations)
                key = (record.series_instance_uid, record.generation)
                count, _ = counted.get(key, (0, pending.received_at))
                counted[key] = (count + 1, pending.received_at)
                existing[record.sop_instance_uid] = record  # the same UID twice in one batch: a duplicate
                rows.append(sql.instance_row(record))
                results.append((record, True))
            for (series_uid, generation), (count, latest) in counted.items():
                cursor.execute(sql.count_in_generation, (count, sql.time(latest), series_uid, generation))
            if rows:
                cursor.execute(sql.insert_instances(len(rows)), [value for row in rows for value in row])
        finally:
            cursor.close()
        return results

    def _place(self, conn: Connection, cursor, pending: _PendingInstance,
               open_generations: dict[str, int]) -> InstanceRecord:
        """The record of a new instance in its series' open generation; opens one (superseding the earlier
        ones) when the latest is no longer receiving."""
        new, now, sql = pending.new, pending.received_at, self._sql
        series_uid = new.series_instance_uid
        generation = open_generations.get(series_uid)
        if generation is None:
            cursor.execute(sql.latest_generation, (series_uid,))
            latest = cursor.fetchone()
            if latest is not None and latest[1] == SeriesState.RECEIVING:
                generation = latest[0]
            else:
                generation = 1 if latest is None else latest[0] + 1
                if latest is not None:
                    pending.superseded, pending.taken_over = _supersede(conn, series_uid, generation)
                cursor.execute(sql.insert_series, (
                    series_uid, generation, new.study_instance_uid, SeriesState.RECEIVING.value, pending.taken_over,
                    sql.time(now), sql.time(now), new.calling_ae, new.called_ae, new.modality,
                    new.series_description, new.patient_id, new.accession_number, new.study_date))
            open_generations[series_uid] = generation
        return InstanceRecord(
            sop_instance_uid=new.sop_instance_uid, sop_class_uid=new.sop_class_uid, series_instance_uid=series_uid,
            study_instance_uid=new.study_instance_uid, generation=generation, path=new.path,
            calling_ae=new.calling_ae, transfer_syntax=new.transfer_syntax, size=new.size, received_at=now)

    def _recorded(self, pending: _PendingInstance, result: tuple[InstanceRecord, bool]) -> None:
        """Once its batch is committed: a generation that superseded others says so."""
        record, _ = result
        if pending.superseded:
            log.warning("series %s sent again with new instance %s: generation %d takes over the %d instances of "
                        "generation(s) %s, which it supersedes", record.series_instance_uid, record.sop_instance_uid,
                        record.generation, pending.taken_over, ", ".join(map(str, pending.superseded)))

    def note_duplicate(self, record: InstanceRecord, received_at: datetime | None = None) -> bool:
        """A re-sent instance counts as activity of the generation that holds it (its `last_received_at`):
        while that generation is receiving, a sender re-sending the series after an abort or a node
        restart keeps it open until the re-send is over, so the first copies and the new instances
        make one generation; once it is done, retention does not delete it while it is being re-sent.

        Returns False when the generation is `purged`: retention, on this node or another sharing the
        journal, is deleting its files, so the copy is not held and must not be acknowledged. This and
        `start_purge` each change the one series row under a condition on what the other writes, so
        whichever commits first decides: a re-send noted first keeps the purge off, a purge started
        first has the re-send refused."""
        generation = ((series.c.series_instance_uid == record.series_instance_uid)
                      & (series.c.generation == record.generation))
        with self._write_lock, self.engine.begin() as conn:
            noted = conn.execute(series.update().where(
                generation & series.c.state.not_in((SeriesState.SUPERSEDED, SeriesState.PURGED)))
                .values(last_received_at=received_at or utcnow())).rowcount
            return bool(noted) or conn.execute(select(series.c.state).where(generation)).scalar() != SeriesState.PURGED

    def start_purge(self, series_instance_uid: str, generation: int, quiet_since: datetime, reason: str) -> bool:
        """Mark a settled generation `purged` before retention deletes its files, unless it received
        anything (a re-sent copy, `note_duplicate`) after `quiet_since`, the activity retention judged it
        by; False when it did, or is no longer settled."""
        with self._write_lock, self.engine.begin() as conn:
            return conn.execute(series.update().where(
                (series.c.series_instance_uid == series_instance_uid) & (series.c.generation == generation)
                & series.c.state.in_(SETTLED_STATES) & (series.c.last_received_at <= quiet_since))
                .values(state=SeriesState.PURGED.value, reason=reason)).rowcount == 1

    def forget_instances(self, series_instance_uid: str, generation: int) -> int:
        """Delete the instance rows of a purged series generation (its files are gone); its count stays as history."""
        with self._write_lock, self.engine.begin() as conn:
            return conn.execute(instances.delete().where(
                (instances.c.series_instance_uid == series_instance_uid)
                & (instances.c.generation == generation))).rowcount

    def delete_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """Remove an instance row (its file is gone) and uncount it from its series. A generation still
        receiving that is left with nothing goes too: there is nothing for it to complete."""
        with self._write_lock, self.engine.begin() as conn:
            row = conn.execute(select(instances).where(instances.c.sop_instance_uid == sop_instance_uid)).first()
            if row is None:
                return None
            conn.execute(instances.delete().where(instances.c.sop_instance_uid == sop_instance_uid))
            generation = (series.c.series_instance_uid == row.series_instance_uid) & (series.c.generation == row.generation)
            conn.execute(series.update().where(generation).values(instance_count=series.c.instance_count - 1))
            conn.execute(series.delete().where(generation & (series.c.instance_count == 0)
                                               & (series.c.state == SeriesState.RECEIVING)))
        return as_record(InstanceRecord, row)

    def all_instances(self) -> list[InstanceRecord]:
        with self.engine.connect() as conn:
            return [as_record(InstanceRecord, r) for r in conn.execute(select(instances))]

    def series_instances(self, series_instance_uid: str, generation: int) -> list[InstanceRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances).where(
                (instances.c.series_instance_uid == series_instance_uid) & (instances.c.generation == generation))
                .order_by(instances.c.received_at))
            return [as_record(InstanceRecord, r) for r in rows]

    # --- series ----------------------------------------------------------------------------------

    def get_series(self, series_instance_uid: str, generation: int | None = None) -> SeriesRecord | None:
        """One generation of a series, the latest when `generation` is None."""
        query = select(series).where(series.c.series_instance_uid == series_instance_uid)
        if generation is not None:
            query = query.where(series.c.generation == generation)
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(series.c.generation.desc()).limit(1)).first()
        return as_record(SeriesRecord, row) if row else None

    def series_in_state(self, *states: SeriesState) -> list[SeriesRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(series).where(series.c.state.in_(states)).order_by(series.c.first_received_at))
            return [as_record(SeriesRecord, r) for r in rows]

    def settled_series(self, series_instance_uid: str | None = None, generation: int | None = None
                       ) -> list[SettledSeries]:
        """Routed and superseded series whose jobs are all finished and whose exports are all sent, dead or
        superseded, and unmatched and quarantined ones: what retention may delete once old enough. With a
        series and generation, only that one (if it is settled)."""
        def of_series(table):  # one series: keep the aggregates to its rows, not the whole history
            if series_instance_uid is None:
                return true()
            return (table.c.series_instance_uid == series_instance_uid) & (table.c.generation == generation)

        open_job = case((jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)), 1), else_=0)
        job_totals = (select(jobs.c.series_instance_uid, jobs.c.generation,
                             func.sum(open_job).label("open_jobs"),
                             func.sum(case((jobs.c.state == JobState.FAILED, 1), else_=0)).label("failed_jobs"),
                             func.max(jobs.c.finished_at).label("jobs_finished_at"))
                      .where(of_series(jobs)).group_by(jobs.c.series_instance_uid, jobs.c.generation).subquery())
        export_totals = (select(jobs.c.series_instance_uid, jobs.c.generation,
                                func.sum(case((exports.c.state == ExportState.PENDING, 1), else_=0)).label("pending_exports"),
                                func.sum(case((exports.c.state == ExportState.DEAD, 1), else_=0)).label("dead_exports"),
                                func.max(exports.c.sent_at).label("last_sent_at"))
                         .select_from(jobs.join(exports, exports.c.job_id == jobs.c.id)).where(of_series(jobs))
                         .group_by(jobs.c.series_instance_uid, jobs.c.generation).subquery())

        def same_series(totals):
            return and_(totals.c.series_instance_uid == series.c.series_instance_uid,
                        totals.c.generation == series.c.generation)

        query = (select(series, job_totals.c.open_jobs, job_totals.c.failed_jobs, job_totals.c.jobs_finished_at,
                        export_totals.c.pending_exports, export_totals.c.dead_exports, export_totals.c.last_sent_at)
                 .select_from(series.outerjoin(job_totals, same_series(job_totals))
                              .outerjoin(export_totals, same_series(export_totals)))
                 .where(series.c.state.in_(SETTLED_STATES) & of_series(series)))
        settled = []
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                if row.open_jobs or row.pending_exports:
                    continue
                record = as_record(SeriesRecord, row)
                times = [_aware(t) for t in (record.last_received_at, record.completed_at, row.jobs_finished_at,
                                             row.last_sent_at) if t is not None]
                failed = record.state == SeriesState.QUARANTINED or bool(row.failed_jobs) or bool(row.dead_exports)
                settled.append(SettledSeries(record, failed, max(times)))
        return settled

    def purged_with_instances(self) -> list[SeriesRecord]:
        """Purged series that still have instance rows: a purge the node stopped in the middle of."""
        query = select(series).where((series.c.state == SeriesState.PURGED) & select(instances.c.sop_instance_uid).where(
            (instances.c.series_instance_uid == series.c.series_instance_uid)
            & (instances.c.generation == series.c.generation)).exists())
        return self.select(SeriesRecord, query)

    def complete_series(self, series_instance_uid: str, generation: int,
                        quiet_since: datetime | None = None) -> SeriesRecord | None:
        """Mark a receiving series complete; returns it, or None if it was not receiving
        (already complete) or received an instance after `quiet_since` (still arriving)."""
        condition = ((series.c.series_instance_uid == series_instance_uid) & (series.c.generation == generation)
                     & (series.c.state == SeriesState.RECEIVING))
        if quiet_since is not None:
            condition = condition & (series.c.last_received_at <= quiet_since)
        with self._write_lock, self.engine.begin() as conn:
            _lock_series(conn, series_instance_uid)
            result = conn.execute(series.update().where(condition).values(state=SeriesState.COMPLETE.value, completed_at=utcnow()))
            if result.rowcount == 0:
                return None
        return self.get_series(series_instance_uid, generation)

    def set_series_state(self, series_instance_uid: str, generation: int, state: SeriesState,
                         reason: str | None = None) -> None:
        """A superseded generation only ever becomes `purged`: a router or job that finishes after a newer
        generation took the series over does not bring it back."""
        state = SeriesState(state)  # ValueError for a state that is not one
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(series.update().where(
                (series.c.series_instance_uid == series_instance_uid) & (series.c.generation == generation)
                & ((series.c.state != SeriesState.SUPERSEDED.value) | (state == SeriesState.PURGED)))
                .values(state=state.value, reason=reason))

    # --- jobs ------------------------------------------------------------------------------------

    def add_job(self, series_instance_uid: str, generation: int, pipeline: str,
                kind: JobKind = JobKind.PIPELINE) -> JobRecord:
        """Queue a job of `kind` for the pipeline or forward rule named `pipeline`; idempotent per (series,
        generation, name): dicom_node.config keeps pipeline and forward rule names apart."""
        with self._write_lock, self.engine.begin() as conn:
            key = ((jobs.c.series_instance_uid == series_instance_uid) & (jobs.c.generation == generation)
                   & (jobs.c.pipeline == pipeline))
            row = _insert_once(conn, jobs, key, series_instance_uid=series_instance_uid, generation=generation,
                               pipeline=pipeline, kind=JobKind(kind).value, state=JobState.QUEUED.value, attempts=0,
                               created_at=utcnow())
        return as_record(JobRecord, row)

    def get_job(self, job_id: int) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return as_record(JobRecord, row) if row else None

    def job_log_context(self, job_id: int):
        """Log context of a job (`dicom_node.logs`): its id and its series' Study/Series Instance UIDs."""
        job = self.get_job(job_id)
        series = self.get_series(job.series_instance_uid, job.generation) if job else None
        return series_context(series.study_instance_uid if series else None,
                              job.series_instance_uid if job else None, job_id)

    def jobs_in_state(self, *states: JobState) -> list[JobRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.state.in_(states)).order_by(jobs.c.id))
            return [as_record(JobRecord, r) for r in rows]

    def update_job(self, job_id: int, **values) -> JobRecord:
        """Set job columns (state, attempts, error, started_at, finished_at, output_dir)."""
        if "state" in values:
            values["state"] = JobState(values["state"]).value  # ValueError for a state that is not one
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        return self.get_job(job_id)

    def record_steps(self, job_id: int, outcomes) -> None:
        """Replace what the job's previous run recorded of its steps with `outcomes` (StepOutcome, in order)."""
        for outcome in outcomes:
            if outcome.state not in set(StepState):
                raise ValueError(f"unknown step state {outcome.state!r}")
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(job_steps.delete().where(job_steps.c.job_id == job_id))
            if outcomes:
                conn.execute(job_steps.insert(), [
                    {"job_id": job_id, "position": position, "step": o.step, "state": o.state, "reason": o.reason}
                    for position, o in enumerate(outcomes)])

    def job_steps(self, *job_ids: int) -> dict[int, list[StepOutcome]]:
        """Job id -> its steps' outcomes in pipeline order (jobs not run yet, or failed before their
        steps ran, have none)."""
        found: dict[int, list[StepOutcome]] = {job_id: [] for job_id in job_ids}
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_steps).where(job_steps.c.job_id.in_(job_ids))
                                .order_by(job_steps.c.job_id, job_steps.c.position))
            for row in rows:
                found[row.job_id].append(StepOutcome(row.step, StepState(row.state), row.reason))
        return found

    # --- exports ---------------------------------------------------------------------------------

    def add_exports(self, job: JobRecord, items: list[tuple[str, str, str]]) -> bool:
        """Queue (destination, SOP Instance UID, path) exports of a job in one transaction, unless a newer
        generation superseded the job's series generation (then nothing is queued and False returned):
        checked under the same lock that supersedes, so a result is either queued before its series was
        taken over (and superseded with it) or never."""
        with self._write_lock, self.engine.begin() as conn:
            state = conn.execute(select(series.c.state).where(
                (series.c.series_instance_uid == job.series_instance_uid)
                & (series.c.generation == job.generation))).scalar()
            if state == SeriesState.SUPERSEDED:
                return False
            for destination, sop_instance_uid, path in items:
                key = ((exports.c.job_id == job.id) & (exports.c.destination == destination)
                       & (exports.c.sop_instance_uid == sop_instance_uid))
                if conn.execute(select(exports.c.id).where(key)).first() is None:
                    conn.execute(exports.insert().values(job_id=job.id, destination=destination,
                                                         sop_instance_uid=sop_instance_uid, path=path,
                                                         state=ExportState.PENDING.value, attempts=0,
                                                         next_attempt_at=utcnow()))
        return True

    def add_export(self, job_id: int, destination: str, sop_instance_uid: str, path: str) -> ExportRecord:
        """Queue one instance for one destination; idempotent per (job, destination, instance)."""
        with self._write_lock, self.engine.begin() as conn:
            key = ((exports.c.job_id == job_id) & (exports.c.destination == destination)
                   & (exports.c.sop_instance_uid == sop_instance_uid))
            row = _insert_once(conn, exports, key, job_id=job_id, destination=destination,
                               sop_instance_uid=sop_instance_uid, path=path, state=ExportState.PENDING.value,
                               attempts=0, next_attempt_at=utcnow())
        return as_record(ExportRecord, row)

    def exports_in_state(self, *states: ExportState, due_before: datetime | None = None) -> list[ExportRecord]:
        query = select(exports).where(exports.c.state.in_(states))
        if due_before is not None:
            query = query.where(exports.c.next_attempt_at <= due_before)
        with self.engine.connect() as conn:
            return [as_record(ExportRecord, r) for r in conn.execute(query.order_by(exports.c.id))]

    def update_export(self, export_id: int, **values) -> ExportRecord:
        """Set export columns (state, attempts, next_attempt_at, last_status, reason, sent_at)."""
        if "state" in values:
            values["state"] = ExportState(values["state"]).value  # ValueError for a state that is not one
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(exports.update().where(exports.c.id == export_id).values(**values))
            row = conn.execute(select(exports).where(exports.c.id == export_id)).first()
        return as_record(ExportRecord, row)


def _insert_once(conn: Connection, table, key, **values):
    """The row of `table` that `key` selects, inserted with `values` first when there is none: what makes
    queueing a job or an export idempotent, in the caller's transaction."""
    row = conn.execute(select(table).where(key)).first()
    if row is None:
        conn.execute(table.insert().values(**values))
        row = conn.execute(select(table).where(key)).first()
    return row


def _supersede(conn: Connection, series_instance_uid: str, generation: int) -> tuple[list[int], int]:
    """Hand every earlier generation of the series that still holds its instances over to `generation`,
    in the caller's transaction; returns those generations and how many instances moved.

    The series was sent again with something new after the node had closed it: the new generation is
    the series as the sender now has it, so its jobs read every instance (earlier copies included) and
    its result references them all. The earlier generations' queued jobs will not run, their exports
    not yet delivered will not be sent, and a job still running delivers nothing (`add_exports`): one
    result per series, not one per part. Results already delivered stay at their destination (C-STORE
    cannot take an object back); the new result, with its own SOP Instance UIDs, follows them.
    """
    earlier = [row.generation for row in conn.execute(select(series.c.generation).where(
        (series.c.series_instance_uid == series_instance_uid) & (series.c.generation < generation)
        & series.c.state.in_(HOLDS_INSTANCES)))]
    if not earlier:
        return earlier, 0
    of_earlier = (jobs.c.series_instance_uid == series_instance_uid) & jobs.c.generation.in_(earlier)
    earlier_jobs = select(jobs.c.id).where(of_earlier).scalar_subquery()
    conn.execute(exports.update().where(exports.c.job_id.in_(earlier_jobs) & (exports.c.state == ExportState.PENDING.value))
                 .values(state=ExportState.SUPERSEDED.value, reason=f"superseded by generation {generation}"))
    conn.execute(jobs.update().where(of_earlier & (jobs.c.state == JobState.QUEUED.value))
                 .values(state=JobState.SUPERSEDED.value, error=f"superseded by generation {generation}", finished_at=utcnow()))
    conn.execute(series.update().where((series.c.series_instance_uid == series_instance_uid)
                                       & series.c.generation.in_(earlier))
                 .values(state=SeriesState.SUPERSEDED.value, reason=f"sent again with new instances: superseded by generation "
                                                    f"{generation}, which holds its instances"))
    return earlier, conn.execute(instances.update().where(
        (instances.c.series_instance_uid == series_instance_uid) & instances.c.generation.in_(earlier))
        .values(generation=generation)).rowcount


def _lock_series(conn: Connection, series_instance_uid: str) -> None:
    """On PostgreSQL, where other nodes write the same series (dicom_node.store.cluster), hold the series'
    transaction-level advisory lock: the first instances of a series arriving at two nodes at once open
    one generation, not two inserts of one, and an instance is never counted into a generation another
    node is completing at that moment. SQLite has one writer (this process's write lock) already."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(series_instance_uid, 0))))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
