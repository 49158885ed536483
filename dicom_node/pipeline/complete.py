"""Series completion: when has a series finished arriving?

DICOM has no "end of series" message, so two signals are used (apscheduler
jobs in the `serve` process):

- stable timeout: nothing of the series arrived for `completion.stable_seconds`
  (a re-sent copy of an instance already stored counts as arrival), counted
  from no earlier than the moment the DICOM port opened: a series still
  arriving when the node died gets a full stable period once its sender can
  reach the node again, because the sender saw the association abort and
  re-sends; completing it earlier would process the partial series and file
  the re-sent rest as a second generation. So an open association keeps a
  series from completing while it has delivered an instance of it, new or
  re-sent, within `stable_seconds`; one that stays open without sending any
  more of it does not hold it (a sender may keep an association open for
  hours);
- release fast path: the association that delivered the series (new or
  re-sent instances) was released normally (A-RELEASE, PS3.8 7.2) and no
  other open association is still sending that series (a STOW-RS request
  counts as an association, released once its response is sent); after
  `completion.after_release_seconds` of grace the series is complete. An
  aborted association never takes the fast path.

Each series that becomes complete is logged and handed to the
`on_series_complete` callback (the pipeline's router), which must not block.
A series the router did not take (left `complete`: the journal refused its
next write, or the node stopped first) is handed over again: at start, and by
the periodic check once it has been complete for `UNROUTED_AFTER_S`.

Nodes sharing a PostgreSQL journal (`dicom_node.store.cluster`) see one series
whichever node each instance arrived at: `last_received_at` is the journal's,
and each node records in the journal which of its open associations sends
which series (`dicom_node.store.leases`), so the release fast path waits for
the senders on every live node. The stable-timeout check and the second
hand-over run on the node holding the `completion` singleton; completing is a
conditional transition (receiving -> complete), so whichever node completes a
series is the one node that routes it, and a second hand-over is claimed in
the journal first.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.store.cluster import COMPLETION, Cluster
from dicom_node.store.journal import Journal, SeriesRecord
from dicom_node.logs import series_context
from dicom_node.metrics import NodeMetrics
from dicom_node.states import SeriesState

log = logging.getLogger("dicom_node.pipeline.complete")

SeriesKey = tuple[str, int]  # (Series Instance UID, generation)
# A sending episode: an association's id (int), or a STOW-RS request's ("stow-<n>"), which ends like an
# association released normally once its response is sent.
SessionId = int | str
UNROUTED_AFTER_S = 60.0  # routing reads every header: seconds for a large series, never a minute


class CompletionTracker:
    """Knows which open association is sending which series, and completes series."""

    def __init__(self, journal: Journal, stable_seconds: float, after_release_seconds: float,
                 on_series_complete: Callable[[SeriesRecord], None] | None = None, metrics: NodeMetrics | None = None,
                 cluster: Cluster | None = None):
        self.journal = journal
        self.cluster = cluster  # None: the only node
        self.metrics = metrics or NodeMetrics()
        self.stable_seconds = stable_seconds
        self.after_release_seconds = after_release_seconds
        self.on_series_complete = on_series_complete
        self._lock = threading.Lock()
        self._sending: dict[SessionId, set[SeriesKey]] = defaultdict(set)  # session -> series it sent
        self._handing_over: set[SeriesKey] = set()
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self.listening_since: datetime | None = None  # no stable timeout before senders can reach the node

    def port_opened(self) -> None:
        """The DICOM port accepts associations from now: the stable wait of every series counts from here."""
        self.listening_since = datetime.now(timezone.utc)

    def start(self) -> None:
        interval = max(0.5, min(self.stable_seconds / 4, 5.0))
        self.scheduler.add_job(self.check_stable, "interval", seconds=interval, id="stable-timeout",
                               max_instances=1, coalesce=True)
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)

    def instance_received(self, association: SessionId, series_instance_uid: str, generation: int) -> None:
        """`association` (or a STOW-RS request) delivered an instance of the series generation, new or a re-sent copy."""
        key = (series_instance_uid, generation)
        with self._lock:
            first = key not in self._sending[association]
            self._sending[association].add(key)
        if first and self.cluster is not None:
            try:
                self.cluster.leases.sending_started(str(association), series_instance_uid, generation)
            except Exception as error:  # the instance is stored; only the other nodes' fast path misses it
                log.warning("series %s: could not record its sender for the other nodes: %s", series_instance_uid,
                            error)

    def association_closed(self, association: SessionId, released: bool) -> None:
        with self._lock:
            sent = self._sending.pop(association, set())
            still_open = set().union(*self._sending.values()) if self._sending else set()
        if sent and self.cluster is not None:
            try:
                self.cluster.leases.sending_ended(str(association))
            except Exception as error:  # its rows go with this node's heartbeat, or at its restart
                log.warning("could not clear the senders of association %s: %s", association, error)
        if not released:
            return
        for key in sent - still_open:
            run_at = datetime.now(timezone.utc) + timedelta(seconds=self.after_release_seconds)
            self.scheduler.add_job(self._complete_after_release, "date", run_date=run_at, args=[key, run_at])

    def _complete_after_release(self, key: SeriesKey, due: datetime) -> None:
        with self._lock:
            if any(key in sent for sent in self._sending.values()):
                return  # another association started sending this series during the grace
        if self.cluster is not None and self.cluster.leases.sending_anywhere(*key):
            return  # an association on another node sends it: its release completes the series
        # An instance received during the grace (after release - grace) means more is coming.
        self._complete(key, quiet_since=due - timedelta(seconds=self.after_release_seconds), why="release")

    def check_stable(self) -> None:
        if self.cluster is not None and not self.cluster.runs(COMPLETION):
            return
        now = datetime.now(timezone.utc)
        quiet_since = now - timedelta(seconds=self.stable_seconds)
        if self.listening_since is not None and quiet_since >= self.listening_since:
            for record in self.journal.series_in_state(SeriesState.RECEIVING):
                if record.last_received_at <= quiet_since:
                    self._complete((record.series_instance_uid, record.generation), quiet_since, why="stable timeout")
        self.hand_over_unrouted(complete_before=now - timedelta(seconds=UNROUTED_AFTER_S))

    def hand_over_unrouted(self, complete_before: datetime) -> None:
        """Hand over again every series complete since before `complete_before` that is still `complete`
        and not being handed over right now."""
        if self.on_series_complete is None:
            return
        for record in self.journal.series_in_state(SeriesState.COMPLETE):
            with self._lock:
                busy = (record.series_instance_uid, record.generation) in self._handing_over
            if busy or record.completed_at is None or record.completed_at > complete_before:
                continue
            if self.cluster is not None and not self.cluster.leases.claim_unrouted(
                    record.series_instance_uid, record.generation, record.completed_at):
                continue  # another node routes it
            log.warning("series %s generation %d has been complete since %s UTC and is not routed; handing it over "
                        "again", record.series_instance_uid, record.generation, f"{record.completed_at:%H:%M:%S}")
            self.hand_over(record)

    def _complete(self, key: SeriesKey, quiet_since: datetime, why: str) -> None:
        record = self.journal.complete_series(key[0], key[1], quiet_since=quiet_since)
        if record is None:
            return
        self.metrics.series_completed.labels(trigger=why).inc()
        self.metrics.observe_stage("wait_for_complete", (record.completed_at - record.last_received_at).total_seconds())
        with series_context(record.study_instance_uid, record.series_instance_uid):
            log.info("series complete (%s): study=%s series=%s generation=%d instances=%d modality=%s "
                     "description=%r calling_ae=%s", why, record.study_instance_uid, record.series_instance_uid,
                     record.generation, record.instance_count, record.modality, record.series_description,
                     record.calling_ae)
        self.hand_over(record)

    def hand_over(self, record: SeriesRecord) -> None:
        if self.on_series_complete is None:
            return
        key = (record.series_instance_uid, record.generation)
        with self._lock:
            self._handing_over.add(key)
        with series_context(record.study_instance_uid, record.series_instance_uid):
            try:
                self.on_series_complete(record)
            except Exception:
                log.exception("on_series_complete failed for series %s generation %d; handed over again in %.0f s",
                              record.series_instance_uid, record.generation, UNROUTED_AFTER_S)
            finally:
                with self._lock:
                    self._handing_over.discard(key)
