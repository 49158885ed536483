"""What an admin does with a finished job or a dead-lettered export: retry it or discard it.

The one path of `dicom-node jobs retry|dead-letter`, `POST /v1/jobs/{id}/retry` and the console's
buttons, so each action is checked and audited (with who did it) the same way whatever asked.
Only the journal is written (and the audit); a running node's pipeline picks a
queued job or a pending export up on its next pass, a stopped one at start.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.states import ExportState, JobState, SeriesState
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import ExportRecord, JobRecord, utcnow


class NotRetryable(ValueError):
    """Only a failed or done job goes back in the queue (a queued or running one is on its way), and only
    while its series is in the spool; only a dead-lettered export whose file is still there is sent again."""


def requeue(audit: AuditLog, job: JobRecord, via: str, host: str | None = None, actor: str | None = None
            ) -> JobRecord:
    """Put a failed or done job back in the queue and audit it."""
    journal = audit.journal
    if job.state not in (JobState.FAILED, JobState.DONE):
        raise NotRetryable(f"job {job.id} is {job.state}; only failed or done jobs are retried")
    series = journal.get_series(job.series_instance_uid, job.generation)
    if series is not None and series.state == SeriesState.PURGED:
        raise NotRetryable(f"job {job.id}: series {job.series_instance_uid} generation {job.generation} is no longer "
                           f"in the spool ({series.reason}); send it again to process it again")
    if series is not None and series.state == SeriesState.SUPERSEDED:
        raise NotRetryable(f"job {job.id}: series {job.series_instance_uid} generation {job.generation} was "
                           f"{series.reason}; retry that generation's job instead")
    job = journal.update_job(job.id, state=JobState.QUEUED, error=None, finished_at=None)
    audit.record(AuditEvent("retry", host=host, series_instance_uid=job.series_instance_uid, job_id=job.id,
                            detail=f"requeued through {via} ({job.kind} {job.pipeline})", actor=actor))
    return job


def discard_job(audit: AuditLog, job: JobRecord, via: str, host: str | None = None, actor: str | None = None
                ) -> JobRecord:
    """Give a failed job up: it stays in the journal as `discarded` (no longer counted as failing)."""
    if job.state != JobState.FAILED:
        raise NotRetryable(f"job {job.id} is {job.state}; only a failed job is discarded")
    job = audit.journal.update_job(job.id, state=JobState.DISCARDED)
    audit.record(AuditEvent("discard", host=host, series_instance_uid=job.series_instance_uid, job_id=job.id,
                            detail=f"failed job discarded through {via} ({job.kind} {job.pipeline})", actor=actor))
    return job


def requeue_export(audit: AuditLog, export: ExportRecord, via: str, host: str | None = None,
                   actor: str | None = None) -> ExportRecord:
    """Send a dead-lettered export again from its first attempt (the destination's retry policy anew)."""
    _dead_letter(export)
    if not Path(export.path).exists():
        raise NotRetryable(f"export {export.id}: {export.path} is no longer on disk (deleted by retention?)")
    export = audit.journal.update_export(export.id, state=ExportState.PENDING, attempts=0, reason=None,
                                         next_attempt_at=utcnow())
    _audit_export(audit, "retry", export, f"dead letter requeued through {via}", host, actor)
    return export


def discard_export(audit: AuditLog, export: ExportRecord, via: str, host: str | None = None,
                   actor: str | None = None) -> ExportRecord:
    """Give a dead-lettered export up: it stays in the journal as `discarded`, never sent."""
    _dead_letter(export)
    export = audit.journal.update_export(export.id, state=ExportState.DISCARDED)
    _audit_export(audit, "discard", export, f"dead letter discarded through {via}", host, actor)
    return export


def _dead_letter(export: ExportRecord) -> None:
    if export.state != ExportState.DEAD:
        raise NotRetryable(f"export {export.id} is {export.state}, not dead-lettered")


def _audit_export(audit: AuditLog, event: str, export: ExportRecord, detail: str, host: str | None,
                  actor: str | None) -> None:
    job = audit.journal.get_job(export.job_id)
    audit.record(AuditEvent(event, host=host, series_instance_uid=job.series_instance_uid if job else None,
                            job_id=export.job_id, destination=export.destination, instance_count=1,
                            detail=f"{detail} (SOP Instance UID {export.sop_instance_uid})", actor=actor))
