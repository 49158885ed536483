"""Several nodes sharing one PostgreSQL journal and one spool: identity, heartbeat and singletons.

On a PostgreSQL journal every node runs as a member of a cluster (one node is
a cluster of one); on SQLite there is none and nothing here runs. Each node:

- has a name (`node.name`, default `<host>:<pid>`) and writes a heartbeat
  row every `cluster.heartbeat_seconds`, which also renews the leases of the
  jobs and exports it holds (`dicom_node.store.leases`); a node whose
  heartbeat is older than `cluster.lease_seconds` is dead, and its work is
  taken over once its leases run out;
- competes for the singletons, the duties that must run on one node at a
  time (`SINGLETONS`), each elected through a session-level PostgreSQL
  advisory lock (`pg_try_advisory_lock`) held on a connection of its own:
  when the node dies its session ends, the lock is released, and the next
  node to try (within a heartbeat) takes the duty over. A node that loses
  that connection stops its singletons at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from dicom_node.config import Config
from dicom_node.store.journal import Journal
from dicom_node.store.leases import Leases, NodeRecord

log = logging.getLogger(__name__)

COMPLETION, RETENTION, RECONCILE = "completion", "retention", "reconcile"
# completion: the stable-timeout sweep and the re-routing of series left complete; retention: its sweeps;
# reconcile: the half-written and unjournaled files of dead nodes, and their recorded senders.
SINGLETONS = (COMPLETION, RETENTION, RECONCILE)


def lock_key(singleton: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of a singleton, the same on every node and version."""
    return int.from_bytes(hashlib.sha256(f"dicom-node:{singleton}".encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class ClusterStatus:
    """What /v1/status shows of the cluster: this node, the singletons it runs, the live nodes."""

    node: str
    singletons: list[str]
    nodes: list[NodeRecord]


class Cluster:
    """This node's membership: heartbeat thread, singleton election, its leases."""

    def __init__(self, config: Config, journal: Journal):
        self.config = config.cluster
        self.name = config.node.name or f"{socket.gethostname()}:{os.getpid()}"
        # Temp files in the shared spool carry this tag (a file name part; the name may hold anything).
        self.spool_tag = "n" + hashlib.sha256(self.name.encode()).hexdigest()[:10]
        self.leases = Leases(journal, self.name, self.config.lease_seconds)
        self._engine = create_engine(journal.url, poolclass=NullPool)
        self._locks: Connection | None = None
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._duties = BackgroundScheduler(timezone=timezone.utc)

    def start(self) -> None:
        """Register, take the singletons that are free, then keep the heartbeat in a thread."""
        self.leases.register(socket.gethostname(), os.getpid(), self.spool_tag)
        self._elect()
        log.info("cluster member %s (lease %g s, heartbeat %g s); singletons here: %s", self.name,
                 self.config.lease_seconds, self.config.heartbeat_seconds, ", ".join(sorted(self._held)) or "none")
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()
        self._duties.start()

    def every(self, singleton: str, seconds: float, duty: Callable[[], None], at_once: bool = True) -> None:
        """Run `duty` every `seconds` while this node holds `singleton` (on a thread of its own, so a
        long duty never delays the heartbeat), the first time now unless not `at_once`."""
        def run() -> None:
            if not self.runs(singleton):
                return
            try:
                duty()
            except Exception:
                log.exception("singleton %s failed; it runs again in %g s", singleton, seconds)
        self._duties.add_job(run, "interval", seconds=seconds, id=singleton, max_instances=1, coalesce=True,
                             **({"next_run_time": datetime.now(timezone.utc)} if at_once else {}))

    def stop(self) -> None:
        """Stop the heartbeat and end the lock session: the singletons move to another node now."""
        self._stopping.set()
        if self._duties.running:
            self._duties.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(10)
        self._drop("the node is stopping")
        self._engine.dispose()
        try:
            self.leases.deregister()
        except Exception as error:  # its heartbeat runs out instead
            log.warning("cluster: could not deregister %s: %s", self.name, error)

    def runs(self, singleton: str) -> bool:
        """Does this node hold `singleton` now?"""
        with self._held_lock:
            return singleton in self._held

    def status(self) -> ClusterStatus:
        with self._held_lock:
            held = sorted(self._held)
        return ClusterStatus(self.name, held, self.leases.live_nodes())

    def live_spool_tags(self) -> frozenset[str]:
        return frozenset(node.spool_tag for node in self.leases.live_nodes())

    def _loop(self) -> None:
        while not self._stopping.wait(self.config.heartbeat_seconds):
            try:
                if not self.leases.heartbeat():
                    log.warning("cluster: this node's row (%s) was gone from the journal; registered again", self.name)
                    self.leases.register(socket.gethostname(), os.getpid(), self.spool_tag)
            except Exception as error:  # the journal is unreachable: the leases run out, others take over
                log.error("cluster heartbeat failed (leases run out in %g s unless renewed): %s",
                          self.config.lease_seconds, error)
            self._elect()

    def _elect(self) -> None:
        """Check the lock session and try each singleton not held; a broken session drops them all."""
        try:
            if self._locks is None:
                self._locks = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._locks.execute(text("SELECT 1"))
            for singleton in SINGLETONS:
                if self.runs(singleton):
                    continue
                if self._locks.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": lock_key(singleton)}).scalar():
                    with self._held_lock:
                        self._held.add(singleton)
                    log.info("singleton %s runs on this node (%s) from now", singleton, self.name)
        except Exception as error:
            self._drop(f"its journal session failed: {error}")

    def _drop(self, why: str) -> None:
        with self._held_lock:
            held, self._held = sorted(self._held), set()
        if held:
            log.warning("singletons %s stop on this node (%s): %s", ", ".join(held), self.name, why)
        if self._locks is not None:
            try:
                self._locks.close()  # ends the session: PostgreSQL releases its advisory locks
            except Exception:  # already broken
                pass
            self._locks = None
