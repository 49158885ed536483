"""Retention: when the node deletes a series' files, so its disk does not fill up over the months.

The node is not an archive: the PACS keeps the images and the results. A
series generation is deleted from the spool (its instance files, and the
result files of its jobs) once nothing will touch it again and it is old
enough:

- `retention.keep_days` after its last activity when every job is done and
  every result (or forwarded instance) reached its destination, or when it
  matched no pipeline;
- `retention.keep_failed_days` after its last activity when it was
  quarantined, a job failed or an export was dead-lettered (time for an admin
  to look, fix and retry);
- never while it is still receiving, waiting for completion, or has a queued
  or running job or a pending export: a PACS that is down for a month keeps
  its series here for that month.

When free space under the storage dir is below `retention.free_disk_target_mb`
(checked every few seconds), done series are purged before their keep time,
oldest last activity first, until it is above again: a node that deletes
results already in the PACS keeps taking new studies, where one that keeps
them refuses every C-STORE once at the disk floor. Failed and quarantined
series are never purged early.

Last activity is the latest of its last received instance (a re-sent
duplicate counts), completion, job end and delivery. The journal keeps the
series row (state `purged`, with the reason), its jobs, exports and audit
trail, so `dicom-node status`, `/v1/series/...` and the audit log still tell
what happened. A series sent again after its purge is stored and processed
as a new generation.

Files that restart reconciliation quarantined (`<storage>/quarantine`, no
series row holds them) are deleted `keep_failed_days` after their
quarantine.

A purge is journaled (state `purged`) before any file is deleted and its
instance rows are deleted last, so a purge the node stopped in the middle
of is finished by the next sweep, and no instance file is ever left without
a row (which restart reconciliation would take for a new arrival).

Nodes sharing a PostgreSQL journal and spool (`dicom_node.store.cluster`) sweep on
one node at a time: the one holding the `retention` singleton.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.config.node import RetentionConfig
from dicom_node.store.journal import JobRecord, Journal, SeriesRecord, SettledSeries, utcnow
from dicom_node.store.schema import jobs
from dicom_node.logs import series_context
from dicom_node.metrics import NodeMetrics
from dicom_node.store.spool import InstanceKey, Spool

log = logging.getLogger("dicom_node.store.retention")

DISK_CHECK_INTERVAL_S = 10


@dataclass(frozen=True)
class Purged:
    series_instance_uid: str
    generation: int
    instances: int
    bytes: int


class Retention:
    """Sweeps the journal every `sweep_interval_s` (apscheduler in the `serve` process)."""

    def __init__(self, config: RetentionConfig, journal: Journal, spool: Spool, metrics: NodeMetrics | None = None,
                 runs_here: Callable[[], bool] = lambda: True):
        """`runs_here`: whether this node sweeps now (the retention singleton, on a shared journal)."""
        self.config = config
        self.runs_here = runs_here
        self.journal = journal
        self.spool = spool
        self.metrics = metrics or NodeMetrics()
        self.audit = AuditLog(journal)
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)

    def start(self) -> None:
        config = self.config
        if config.keep_days is None and config.keep_failed_days is None and config.free_disk_target_mb is None:
            log.info("retention off: series are kept until removed by hand")
            return
        self.scheduler.add_job(self._sweep_logged, "interval", seconds=config.sweep_interval_s, id="retention",
                               max_instances=1, coalesce=True, next_run_time=datetime.now(timezone.utc))
        if config.free_disk_target_mb is not None:  # a disk can fill in minutes; statvfs costs microseconds
            self.scheduler.add_job(self._sweep_if_short_of_space, "interval", seconds=DISK_CHECK_INTERVAL_S,
                                   id="retention-disk", max_instances=1, coalesce=True)
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def _sweep_if_short_of_space(self) -> None:
        if self.spool.free_bytes() < self._target_bytes():
            self._sweep_logged()

    def _sweep_logged(self) -> None:
        if not self.runs_here():
            return
        try:
            self.sweep()
        except Exception:
            log.exception("retention sweep failed; the next sweep tries again")

    def _target_bytes(self) -> float:
        target = self.config.free_disk_target_mb
        return 0 if target is None else target * 1024 * 1024

    def sweep(self, now: datetime | None = None) -> list[Purged]:
        """Finish interrupted purges, purge every settled series older than its keep time, then, while
        free space is below `free_disk_target_mb`, delivered series oldest first."""
        now = now or utcnow()
        purged = []
        for record in self.journal.purged_with_instances():
            with self.spool.purging(record.series_instance_uid):
                purged.append(self._delete_files(record))
        early = []
        for candidate in self.journal.settled_series():
            keep = self.config.keep_failed_days if candidate.failed else self.config.keep_days
            cutoff = None if keep is None else now - timedelta(days=keep)
            if cutoff is not None and candidate.last_activity <= cutoff:
                result = self._purge(
                    candidate, lambda current: current.failed == candidate.failed and current.last_activity <= cutoff,
                    f"last activity {candidate.last_activity:%Y-%m-%d %H:%M} UTC, kept {keep:g} days")
                purged += [result] if result else []
            elif not candidate.failed:
                early.append(candidate)
        for candidate in sorted(early, key=lambda c: c.last_activity):
            free = self.spool.free_bytes()
            if free >= self._target_bytes():
                break
            result = self._purge(candidate, lambda current: not current.failed,
                                 f"purged early: {free // (1024 * 1024)} MB free under {self.spool.storage_dir}, "
                                 f"below retention.free_disk_target_mb ({self.config.free_disk_target_mb:g} MB)",
                                 early=True)
            purged += [result] if result else []
        self._sweep_quarantine(now)
        return purged

    def _sweep_quarantine(self, now: datetime) -> None:
        """Files restart reconciliation quarantined (no series row holds them) go after `keep_failed_days`
        from their quarantine, as a failed series does."""
        keep = self.config.keep_failed_days
        if keep is None:
            return
        for item in self.spool.quarantined():
            if item.quarantined_at <= now - timedelta(days=keep):
                reason = item.reason  # before its note goes with it
                size = self.spool.remove_quarantined(item)
                log.info("quarantined file deleted: %s (%d bytes, quarantined %s UTC, kept %g days; reason: %s)",
                         item.path.name, size, f"{item.quarantined_at:%Y-%m-%d %H:%M}", keep, reason)

    def _purge(self, candidate: SettledSeries, still_due: Callable[[SettledSeries], bool], why: str,
               early: bool = False) -> Purged | None:
        """Purge one series, if it is still settled and `still_due` once the receiver cannot add to it:
        a duplicate that arrived since the sweep's query is new activity, and a retried job unsettles it."""
        record = candidate.series
        outcome = "failed or quarantined" if candidate.failed else "done"
        reason = f"retention: {outcome}, {why}"
        with self.spool.purging(record.series_instance_uid):
            current = self.journal.settled_series(record.series_instance_uid, record.generation)
            if not current or not still_due(current[0]):
                return None
            # A copy re-sent to another node sharing the journal since that check keeps the series.
            if not self.journal.start_purge(record.series_instance_uid, record.generation,
                                            current[0].series.last_received_at, reason):
                return None
            result = self._delete_files(record)
        self.metrics.series_purged.labels(outcome="failed" if candidate.failed else "done").inc()
        self.audit.record(AuditEvent("purged", study_instance_uid=record.study_instance_uid,
                                     series_instance_uid=record.series_instance_uid,
                                     instance_count=result.instances, status=outcome, detail=reason))
        with series_context(record.study_instance_uid, record.series_instance_uid):
            log.log(logging.WARNING if early else logging.INFO,
                    "series purged: study=%s series=%s generation=%d instances=%d bytes=%d (%s)",
                    record.study_instance_uid, record.series_instance_uid, record.generation, result.instances,
                    result.bytes, reason)
        return result

    def _delete_files(self, record: SeriesRecord) -> Purged:
        """Instance files, result folders, empty spool folders, then the instance rows (under the series lock)."""
        instances = self.journal.series_instances(record.series_instance_uid, record.generation)
        size = 0
        for instance in instances:
            path = Path(instance.path)
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue  # deleted by an earlier, interrupted purge
            path.unlink(missing_ok=True)
        series_jobs = self.journal.select(JobRecord, select(jobs).where(
            (jobs.c.series_instance_uid == record.series_instance_uid) & (jobs.c.generation == record.generation)))
        for job in series_jobs:
            if job.output_dir:
                shutil.rmtree(job.output_dir, ignore_errors=True)
        if instances:
            first = instances[0]
            self.spool.remove_empty_folders(InstanceKey(first.study_instance_uid, first.series_instance_uid,
                                                        first.sop_instance_uid))
        self.journal.forget_instances(record.series_instance_uid, record.generation)
        return Purged(record.series_instance_uid, record.generation, len(instances), size)
