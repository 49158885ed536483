"""The journal's tables, and the in-place upgrade of a journal an older (or newer) version wrote.

An upgraded node opens the journal its older self wrote: missing tables are
created and missing columns added in place (`ensure_tables`). So a column added
in a later version must be nullable or have a server default; anything else is
refused at start with the columns named, rather than failing C-STOREs at the
first insert. Rows an older version wrote in a shape this one reads differently
are rewritten at start (`type_forward_jobs`). The records and queries over these
tables are `dicom_node.store.journal`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, UniqueConstraint, func, inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateColumn

from dicom_node import JournalSchemaError
from dicom_node.states import JobKind

log = logging.getLogger(__name__)

# Before jobs had a `kind`, a forward rule's job was named "forward:<rule>" (`type_forward_jobs`).
_OLD_FORWARD_PREFIX = "forward:"

metadata = MetaData()

instances = Table(
    "instances", metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False, index=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("transfer_syntax", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

series = Table(
    "series", metadata,
    Column("series_instance_uid", String(64), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("instance_count", Integer, nullable=False),
    Column("first_received_at", DateTime(timezone=True), nullable=False),
    Column("last_received_at", DateTime(timezone=True), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("called_ae", String(16), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("series_description", Text, nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("reason", Text),
    # What an admin finds a study by (the console's search), from the first instance's header; NULL in
    # rows an older version wrote.
    Column("patient_id", String(64), index=True),
    Column("accession_number", String(16), index=True),
    Column("study_date", String(8)),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_instance_uid", String(64), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("pipeline", String(128), nullable=False),  # the pipeline's or the forward rule's name
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("output_dir", Text),
    Column("kind", String(16), nullable=False, server_default=JobKind.PIPELINE.value),
    # The node running it and until when (dicom_node.store.cluster); unused on a single node's SQLite journal.
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    UniqueConstraint("series_instance_uid", "generation", "pipeline"),
)

# What each step of a job's last run came to: a job is `done` when at least one step gave results
# (the others' failures are listed here and in its SR), `failed` when none did.
job_steps = Table(
    "job_steps", metadata,
    Column("job_id", Integer, primary_key=True),
    Column("position", Integer, primary_key=True),  # the step's place in the pipeline's `steps`
    Column("step", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
)

exports = Table(
    "exports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("destination", String(128), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_status", Integer),
    Column("reason", Text),
    Column("sent_at", DateTime(timezone=True)),
    Column("lease_owner", String(64)),  # the node sending it right now, until lease_until (dicom_node.store.cluster)
    Column("lease_until", DateTime(timezone=True)),
    UniqueConstraint("job_id", "destination", "sop_instance_uid"),
)

# The nodes sharing the journal (dicom_node.store.cluster): each writes its heartbeat (database clock) every
# cluster.heartbeat_seconds; one whose heartbeat is older than cluster.lease_seconds is dead.
nodes = Table(
    "nodes", metadata,
    Column("name", String(64), primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("spool_tag", String(16), nullable=False),  # names its temp files in the shared spool
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)

# Which open association (or STOW-RS request) of which node has delivered instances of which series
# generation: the release fast path of completion waits for the other nodes' senders of a series too.
sending = Table(
    "sending", metadata,
    Column("node", String(64), primary_key=True),
    Column("session", String(32), primary_key=True),
    Column("series_instance_uid", String(64), primary_key=True),
    Column("generation", Integer, primary_key=True),
)


def ensure_tables(engine: Engine, write: Callable[[], AbstractContextManager[Connection]], tables: MetaData) -> None:
    """Create the tables of `tables` the journal lacks and add the columns an older version's tables
    lack (with their indexes). Raises JournalSchemaError for a missing column that must have a
    value and has no server default, and for a column this version does not know that must have
    one (a newer version's journal: every insert here would fail)."""
    tables.create_all(engine)
    inspector = inspect(engine)
    missing, problems = [], []
    for table in tables.sorted_tables:
        present = {column["name"]: column for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if column.nullable or column.server_default is not None:
                missing.append(column)
            else:
                problems.append(f"{table.name}.{column.name} is missing and must have a value")
        problems += [f"{table.name}.{name} is unknown to this version and must have a value (a newer "
                     "version's journal?)" for name, column in present.items()
                     if name not in table.columns and not column["nullable"] and column["default"] is None]
    if problems:
        where = engine.url.render_as_string(hide_password=True)
        raise JournalSchemaError(f"the journal {where} cannot be used as it is: " + "; ".join(problems))
    for column in missing:
        spec = CreateColumn(column).compile(dialect=engine.dialect)
        with write() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {column.table.name} ADD COLUMN {spec}")
    for index in {index for column in missing for index in column.table.indexes
                  if index.columns.contains_column(column)}:
        index.create(engine, checkfirst=True)
    if missing:
        log.warning("journal upgraded in place: added %s",
                    ", ".join(f"{column.table.name}.{column.name}" for column in missing))

def type_forward_jobs(engine: Engine, write: Callable[[], AbstractContextManager[Connection]]) -> None:
    """A journal written before jobs had a kind names a forward rule's job `forward:<rule>`: such a job
    becomes kind FORWARD with the rule's own name, so it reads (and is retried) like a new one. Runs at
    every start (a read of `jobs`, which finds nothing after the first), so an upgrade the node stopped
    in the middle of is finished. A job whose plain name is taken by a pipeline job of the
    same series generation (an old config had a pipeline and a forward rule of one name) keeps its
    prefixed name, with its kind."""
    prefixed = jobs.c.pipeline.startswith(_OLD_FORWARD_PREFIX, autoescape=True) & (jobs.c.kind == JobKind.PIPELINE)
    rule = func.substr(jobs.c.pipeline, len(_OLD_FORWARD_PREFIX) + 1)
    other = jobs.alias("other")
    taken = select(other.c.id).where((other.c.series_instance_uid == jobs.c.series_instance_uid)
                                      & (other.c.generation == jobs.c.generation)
                                      & (other.c.pipeline == rule)).exists()
    with engine.connect() as conn:  # a read first: every CLI command opens the journal too
        if conn.execute(select(jobs.c.id).where(prefixed).limit(1)).first() is None:
            return
    with write() as conn:
        renamed = conn.execute(jobs.update().where(prefixed & ~taken)
                               .values(kind=JobKind.FORWARD.value, pipeline=rule)).rowcount
        kept = conn.execute(jobs.update().where(prefixed).values(kind=JobKind.FORWARD.value)).rowcount
    log.warning("journal upgraded in place: %d forward jobs given kind forward, %d of them renamed to their "
                "rule%s", renamed + kept, renamed,
                f" ({kept} keep their 'forward:' name: a pipeline job has the rule's name)" if kept else "")

