"""Requeue a finished job: the one retry path of `dicom-node jobs retry` and `POST /v1/jobs/{id}/retry`.

Only the journal is written (and the audit); a running node's pipeline picks
the queued job up on its next pass, a stopped one at start.
"""

from __future__ import annotations

from dicom_node.states import JobState, SeriesState
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import JobRecord


class NotRetryable(ValueError):
    """Only a failed or done job goes back in the queue (a queued or running one is on its way), and only
    while its series is in the spool."""


def requeue(audit: AuditLog, job: JobRecord, via: str, host: str | None = None) -> JobRecord:
    """Put a failed or done job back in the queue and audit it.

    The one retry path for the CLI and the HTTP API; a running node picks the job up.
    """
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
                            detail=f"requeued through {via} ({job.kind} {job.pipeline})"))
    return job
