"""The journal's side of several nodes sharing it: node heartbeats, leased claims of jobs and exports,
the senders of each series on every node, and the conditional transitions that let one node act.

PostgreSQL only (`dicom_node.store.cluster` runs on a PostgreSQL journal). Every
time here is the database's clock (`now()`), never a node's: leases are
compared across hosts, and their clocks differ. A claim is
`SELECT ... FOR UPDATE SKIP LOCKED` then an UPDATE in the same transaction,
so two nodes claiming at once get different rows and neither waits for the
other. Kept apart from `dicom_node.store.journal`, whose functions stay
those of a single node.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, true
from sqlalchemy.dialects.postgresql import insert

from dicom_node.states import ExportState, JobState, SeriesState
from dicom_node.store.journal import ExportRecord, JobRecord, Journal, as_record, utcnow
from dicom_node.store.schema import exports, jobs, nodes, sending, series


@dataclass(frozen=True)
class NodeRecord:
    name: str
    host: str
    pid: int
    spool_tag: str
    started_at: datetime
    heartbeat_at: datetime


class Leases:
    """The journal as node `owner` sees it, with leases of `lease_seconds`."""

    def __init__(self, journal: Journal, owner: str, lease_seconds: float):
        self.journal = journal
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)

    def _until(self):
        return func.now() + self.lease

    # --- nodes ------------------------------------------------------------------------------------

    def register(self, host: str, pid: int, spool_tag: str) -> None:
        """This node is alive from now; the senders its previous life (same name) recorded are gone."""
        with self.journal.write() as conn:
            conn.execute(insert(nodes).values(name=self.owner, host=host, pid=pid, spool_tag=spool_tag,
                                              started_at=func.now(), heartbeat_at=func.now())
                         .on_conflict_do_update(index_elements=[nodes.c.name], set_=dict(
                             host=host, pid=pid, spool_tag=spool_tag, started_at=func.now(), heartbeat_at=func.now())))
            conn.execute(sending.delete().where(sending.c.node == self.owner))

    def deregister(self) -> None:
        """This node stopped cleanly: it is not alive any more (its temp files are gone with it)."""
        with self.journal.write() as conn:
            conn.execute(sending.delete().where(sending.c.node == self.owner))
            conn.execute(nodes.delete().where(nodes.c.name == self.owner))

    def heartbeat(self) -> bool:
        """Renew this node's heartbeat and the leases of what it runs; False when its row is gone."""
        with self.journal.write() as conn:
            alive = conn.execute(nodes.update().where(nodes.c.name == self.owner)
                                 .values(heartbeat_at=func.now())).rowcount
            conn.execute(jobs.update().where((jobs.c.lease_owner == self.owner) & (jobs.c.state == JobState.RUNNING))
                         .values(lease_until=self._until()))
            conn.execute(exports.update().where((exports.c.lease_owner == self.owner)
                                                & (exports.c.state == ExportState.PENDING))
                         .values(lease_until=self._until()))
        return bool(alive)

    def live_nodes(self) -> list[NodeRecord]:
        """Nodes whose heartbeat is younger than a lease, by name."""
        return self.journal.select(NodeRecord, select(nodes).where(nodes.c.heartbeat_at > func.now() - self.lease)
                                   .order_by(nodes.c.name))

    # --- jobs -------------------------------------------------------------------------------------

    def claim_jobs(self, limit: int) -> list[JobRecord]:
        """Up to `limit` queued jobs, oldest first, now `running` under this node's lease (a run more)."""
        if limit <= 0:
            return []
        with self.journal.write() as conn:
            chosen = list(conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.QUEUED).order_by(jobs.c.id)
                                       .limit(limit).with_for_update(skip_locked=True)).scalars())
            if not chosen:
                return []
            conn.execute(jobs.update().where(jobs.c.id.in_(chosen)).values(
                state=JobState.RUNNING.value, lease_owner=self.owner, lease_until=self._until(), started_at=utcnow(),
                attempts=jobs.c.attempts + 1, error=None))
            rows = conn.execute(select(jobs).where(jobs.c.id.in_(chosen)).order_by(jobs.c.id))
            return [as_record(JobRecord, row) for row in rows]

    def abandoned_jobs(self) -> list[JobRecord]:
        """Running jobs whose lease ran out (their node died or lost the journal), or that a version
        without leases left running, or that this node's previous life (same name) was running."""
        return self.journal.select(JobRecord, select(jobs).where(
            (jobs.c.state == JobState.RUNNING)
            & (jobs.c.lease_until.is_(None) | (jobs.c.lease_until < func.now()) | (jobs.c.lease_owner == self.owner)))
            .order_by(jobs.c.id))

    def take_over_job(self, job: JobRecord) -> bool:
        """Make an abandoned running job this node's (to requeue or fail it), unless another node did
        first or its owner renewed the lease meanwhile."""
        owner = jobs.c.lease_owner.is_(None) if job.lease_owner is None else jobs.c.lease_owner == job.lease_owner
        expired = (true() if job.lease_owner == self.owner  # its previous life's: no one else renews it
                   else jobs.c.lease_until.is_(None) | (jobs.c.lease_until < func.now()))
        with self.journal.write() as conn:
            return conn.execute(jobs.update().where((jobs.c.id == job.id) & (jobs.c.state == JobState.RUNNING)
                                                    & owner & expired)
                                .values(lease_owner=self.owner, lease_until=self._until())).rowcount == 1

    def release_job(self, job_id: int) -> None:
        """A job claimed and not started (the node is stopping) goes back to the queue as it was."""
        with self.journal.write() as conn:
            conn.execute(jobs.update().where((jobs.c.id == job_id) & (jobs.c.lease_owner == self.owner)
                                             & (jobs.c.state == JobState.RUNNING))
                         .values(state=JobState.QUEUED.value, lease_owner=None, lease_until=None,
                                 attempts=jobs.c.attempts - 1))

    # --- exports ----------------------------------------------------------------------------------

    def claim_exports(self, due_before: datetime, limit: int = 500) -> list[ExportRecord]:
        """Pending exports due by `due_before` that no live lease holds, now leased to this node."""
        with self.journal.write() as conn:
            chosen = list(conn.execute(select(exports.c.id).where(
                (exports.c.state == ExportState.PENDING) & (exports.c.next_attempt_at <= due_before)
                & (exports.c.lease_until.is_(None) | (exports.c.lease_until < func.now())))
                .order_by(exports.c.id).limit(limit).with_for_update(skip_locked=True)).scalars())
            if not chosen:
                return []
            conn.execute(exports.update().where(exports.c.id.in_(chosen))
                         .values(lease_owner=self.owner, lease_until=self._until()))
            rows = conn.execute(select(exports).where(exports.c.id.in_(chosen)).order_by(exports.c.id))
            return [as_record(ExportRecord, row) for row in rows]

    def release_exports(self, export_ids: list[int]) -> None:
        """The pass over these exports is over (each sent, rescheduled or dead): any node may take the
        rescheduled ones when they are due."""
        if not export_ids:
            return
        with self.journal.write() as conn:
            conn.execute(exports.update().where(exports.c.id.in_(export_ids) & (exports.c.lease_owner == self.owner))
                         .values(lease_owner=None, lease_until=None))

    # --- series -----------------------------------------------------------------------------------

    def sending_started(self, session: str, series_instance_uid: str, generation: int) -> None:
        with self.journal.write() as conn:
            conn.execute(insert(sending).values(node=self.owner, session=session,
                                                series_instance_uid=series_instance_uid, generation=generation)
                         .on_conflict_do_nothing())

    def sending_ended(self, session: str) -> None:
        with self.journal.write() as conn:
            conn.execute(sending.delete().where((sending.c.node == self.owner) & (sending.c.session == session)))

    def sending_anywhere(self, series_instance_uid: str, generation: int) -> bool:
        """Is an open association (or STOW-RS request) of a live node sending this series generation?"""
        query = (select(sending.c.session).select_from(sending.join(nodes, nodes.c.name == sending.c.node))
                 .where((sending.c.series_instance_uid == series_instance_uid) & (sending.c.generation == generation)
                        & (nodes.c.heartbeat_at > func.now() - self.lease)).limit(1))
        with self.journal.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def forget_dead_senders(self) -> int:
        """The senders recorded by nodes that died: their associations ended with them."""
        dead = select(nodes.c.name).where(nodes.c.heartbeat_at <= func.now() - self.lease)
        with self.journal.write() as conn:
            return conn.execute(sending.delete().where(sending.c.node.in_(dead)
                                                       | sending.c.node.not_in(select(nodes.c.name)))).rowcount

    def claim_unrouted(self, series_instance_uid: str, generation: int, completed_at: datetime) -> bool:
        """Take a series left `complete` for routing: its completion time is stamped anew only if no
        other node did so since `completed_at` was read, so exactly one node routes it again."""
        with self.journal.write() as conn:
            return conn.execute(series.update().where(
                (series.c.series_instance_uid == series_instance_uid) & (series.c.generation == generation)
                & (series.c.state == SeriesState.COMPLETE) & (series.c.completed_at == completed_at))
                .values(completed_at=utcnow())).rowcount == 1
