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

Last activity is the latest of its last received instance (a re-sent
duplicate counts), completion, job end and delivery. The journal keeps the
series row (state `purged`, with the reason), its jobs, exports and audit
trail, so `dicom-node status`, `/v1/series/...` and the audit log still tell
what happened. A series sent again after its purge is stored and processed
as a new generation.

A purge is journaled (state `purged`) before any file is deleted and its
instance rows are deleted last, so a purge the node stopped in the middle
of is finished by the next sweep, and no instance file is ever left without
a row (which restart reconciliation would take for a new arrival).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from dicom_node.audit import AuditEvent, AuditLog
from dicom_node.config import RetentionConfig
from dicom_node.journal import JobRecord, Journal, SeriesRecord, SettledSeries, jobs, utcnow
from dicom_node.logs import series_context
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import InstanceKey, Spool

log = logging.getLogger("dicom_node.retention")


@dataclass(frozen=True)
class Purged:
    series_instance_uid: str
    generation: int
    instances: int
    bytes: int


class Retention:
    """Sweeps the journal every `sweep_interval_s` (apscheduler in the `serve` process)."""

    def __init__(self, config: RetentionConfig, journal: Journal, spool: Spool, metrics: NodeMetrics | None = None):
        self.config = config
        self.journal = journal
        self.spool = spool
        self.metrics = metrics or NodeMetrics()
        self.audit = AuditLog(journal)
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)

    def start(self) -> None:
        if self.config.keep_days is None and self.config.keep_failed_days is None:
            log.info("retention off: series are kept until removed by hand")
            return
        self.scheduler.add_job(self._sweep_logged, "interval", seconds=self.config.sweep_interval_s,
                               id="retention", max_instances=1, coalesce=True,
                               next_run_time=datetime.now(timezone.utc))
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def _sweep_logged(self) -> None:
        try:
            self.sweep()
        except Exception:
            log.exception("retention sweep failed; the next sweep tries again")

    def sweep(self, now: datetime | None = None) -> list[Purged]:
        """Finish interrupted purges, then purge every settled series older than its keep time."""
        now = now or utcnow()
        purged = [self._delete_files(record) for record in self.journal.purged_with_instances()]
        for settled in self.journal.settled_series():
            keep = self.config.keep_failed_days if settled.failed else self.config.keep_days
            if keep is None or settled.last_activity > now - timedelta(days=keep):
                continue
            record = settled.series
            with self.spool.series_lock(record.series_instance_uid):
                current = self._still_due(settled, keep, now)
                if current is None:
                    continue
                outcome = "failed or quarantined" if settled.failed else "done"
                reason = (f"retention: {outcome}, last activity {current.last_activity:%Y-%m-%d %H:%M} UTC, "
                          f"kept {keep:g} days")
                self.journal.set_series_state(record.series_instance_uid, record.generation, "purged", reason=reason)
                result = self._delete_files(record)
            purged.append(result)
            self.metrics.series_purged.labels(outcome="failed" if settled.failed else "done").inc()
            self.audit.record(AuditEvent("purged", study_instance_uid=record.study_instance_uid,
                                         series_instance_uid=record.series_instance_uid,
                                         instance_count=result.instances, status=outcome, detail=reason))
            with series_context(record.study_instance_uid, record.series_instance_uid):
                log.info("series purged: study=%s series=%s generation=%d instances=%d bytes=%d (%s)",
                         record.study_instance_uid, record.series_instance_uid, record.generation,
                         result.instances, result.bytes, reason)
        return purged

    def _still_due(self, settled: SettledSeries, keep: float, now: datetime) -> SettledSeries | None:
        """The series as the journal has it now that the receiver cannot add to it: a duplicate that
        arrived since the sweep's query is new activity, and a retried job unsettles it."""
        record = settled.series
        current = self.journal.settled_series(record.series_instance_uid, record.generation)
        if not current or current[0].failed != settled.failed or current[0].last_activity > now - timedelta(days=keep):
            return None
        return current[0]

    def _delete_files(self, record: SeriesRecord) -> Purged:
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
