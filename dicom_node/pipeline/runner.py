"""Running jobs: each queued job runs in a worker process, its results become exports.

In: queued jobs (from the router, `dicom_node.pipeline.router`, or requeued by
`dicom-node jobs retry`). Out: each job `done` (its result files written and one
export row per (result, destination) queued for the export loop,
`dicom_node.dispatch.exports`), `failed` with the reason, or `superseded`.

Everything that matters survives a crash because it is in the journal first:
a job is a row (queued -> running -> done | failed), so a restart requeues what
was running. On a journal shared by several nodes (`dicom_node.store.cluster`) a job
is claimed through the journal instead (`dicom_node.store.leases`): it becomes
`running` under this node's lease, and a job whose node died is requeued by
another node once its lease has run out. A series sent again with new instances supersedes its earlier
generations (`dicom_node.store.journal`): their jobs not yet done end
`superseded`, so one result covers the whole series.

Steps fail alone: a job whose steps partly failed (a classifier whose model is
not installed) is `done` and delivers what the other steps gave; the outcome
of every step is in the journal (`job_steps`) and in the job's SR. Only a job
where no step gave a result, or that failed before its steps (an unreadable
series), is `failed`.
"""

from __future__ import annotations

import json

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dicom_node.config import Config
from dicom_node.metrics import NodeMetrics
from dicom_node.pipeline.job import JobRequest, open_inference
from dicom_node.pipeline.workers import JobError, JobWorkers, WorkerDied
from dicom_node.states import JobKind, JobState, SeriesState, StepState
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import JobRecord, Journal, StepOutcome, utcnow
from dicom_node.store.leases import Leases

log = logging.getLogger(__name__)

# A job journaled `running` that no thread of this node runs was interrupted: by a node crash (found at
# start-up), by its worker process dying, or by the journal refusing its outcome. Requeue it, but not
# forever: a job that takes its process down (a native crash in a codec or model runtime) would otherwise
# do so again and again.
MAX_INTERRUPTED_RUNS = 3


class NodeStopping(Exception):
    """The node is shutting down: its job workers take no new inference request."""


class Superseded(Exception):
    """The job's series generation was superseded by a newer one (`Journal.add_exports`)."""


class JobRunner:
    """The bounded inference worker pool: one thread per worker slot waits on its job's worker process
    (`dicom_node.pipeline.workers`); `on_done` is called when a job queued exports."""

    def __init__(self, config: Config, journal: Journal, metrics: NodeMetrics, audit: AuditLog,
                 on_done: Callable[[], None] = lambda: None, leases: Leases | None = None) -> None:
        self.config = config
        self.leases = leases  # None: the only node, which runs every job queued
        self.journal = journal
        self.metrics = metrics
        self.audit = audit
        self.on_done = on_done
        self.results_dir = Path(config.node.storage_dir) / "results"
        self._threads = ThreadPoolExecutor(max_workers=max(1, config.inference.workers), thread_name_prefix="job")
        self._job_workers = JobWorkers(config)
        self._stopping = threading.Event()
        self._inference_lock = threading.Lock()
        self._submitted: set[int] = set()
        self._submitted_lock = threading.Lock()
        self._slots = max(1, config.inference.workers)
        self._claim_lock = threading.Lock()  # one claim pass at a time: its claims are on the pool before the next

    def start(self) -> None:
        """Start the job workers (when a pipeline may need them), requeue jobs a crash left running, run
        queued ones."""
        if any(pipeline.enabled for pipeline in self.config.pipelines.values()):
            self._job_workers.start()
        self.pick_up_queued(interrupted_by="the node stopped while running it")

    def stop(self) -> None:
        """Start no job; wait for the running ones (queued jobs stay queued in the journal)."""
        self._stopping.set()
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._job_workers.close()

    def submit(self, job: JobRecord) -> None:
        """Run a queued job (on a shared journal: claim queued jobs for the free worker slots, this one
        among them unless another node claims it first)."""
        if self.leases is not None:
            self.pick_up_queued()
            return
        self._put_on_pool(job, claimed=False)

    def _put_on_pool(self, job: JobRecord, claimed: bool) -> None:
        with self._submitted_lock:
            if job.id in self._submitted:
                return
            self._submitted.add(job.id)
        self._threads.submit(self._run_guarded, job.id, claimed)

    def pick_up_queued(self, interrupted_by: str = "its run ended without its outcome in the journal") -> None:
        """Requeue jobs journaled `running` that no thread here runs (`interrupted_by` says why), then put
        queued jobs not yet on the pool there: after a restart, or requeued by `dicom-node jobs retry`."""
        if self.leases is not None:
            self._claim(interrupted_by)
            return
        for job in self.journal.jobs_in_state(JobState.RUNNING):
            with self._submitted_lock:  # a run journals its outcome before it leaves `_submitted`
                orphan = job.id not in self._submitted and self.journal.get_job(job.id).state == JobState.RUNNING
            if orphan:
                self._interrupted(job, interrupted_by)
        for job in self.journal.jobs_in_state(JobState.QUEUED):
            self.submit(job)

    def _claim(self, interrupted_by: str) -> None:
        """On a shared journal: requeue (or fail, see MAX_INTERRUPTED_RUNS) the running jobs whose lease
        ran out, then claim queued jobs for the worker slots free here."""
        with self._claim_lock:
            for job in self.leases.abandoned_jobs():
                with self._submitted_lock:
                    if job.id in self._submitted:  # this node runs it: its lease is renewed
                        continue
                if self.leases.take_over_job(job):
                    self._interrupted(job, interrupted_by if job.lease_owner == self.leases.owner else
                                      f"its node {job.lease_owner or '(unnamed)'} stopped renewing its lease")
            if self._stopping.is_set():
                return
            with self._submitted_lock:
                free = self._slots - len(self._submitted)
            for job in self.leases.claim_jobs(free):
                log.info("job %d (%s) claimed by node %s (run %d)", job.id, job.pipeline, self.leases.owner,
                         job.attempts)
                self._put_on_pool(job, claimed=True)

    def _run_guarded(self, job_id: int, claimed: bool) -> None:
        try:
            with self.journal.job_log_context(job_id):
                self._run(job_id, claimed)
        except Exception:  # the journal refused a write: the dispatch loop's pick_up_queued requeues the job
            log.exception("job %d: its outcome could not be journaled", job_id)
        finally:
            with self._submitted_lock:
                self._submitted.discard(job_id)

    def _run(self, job_id: int, claimed: bool) -> None:
        job = self._start(job_id, claimed)
        if job is None:
            return
        try:
            written, steps = self.run_job(job)
        except Superseded:
            self._superseded(job)
            return
        except WorkerDied as died:
            self._interrupted(job, str(died))
            return
        except Exception as error:
            if self._series_superseded(job):  # its instances moved to the newer generation mid-run
                self._superseded(job)
                return
            kind = error.kind if isinstance(error, JobError) else type(error).__name__
            text = f"{kind}: {error}"
            self.journal.record_steps(job_id, ())  # what an earlier run recorded is not this run's
            if isinstance(error, JobError) and error.series_unusable:  # before the job fails: whoever sees it
                self.journal.set_series_state(job.series_instance_uid, job.generation,  # failed sees why
                                              SeriesState.QUARANTINED, reason=text)
            self.journal.update_job(job_id, state=JobState.FAILED, error=text, finished_at=utcnow())
            self.audit.record(AuditEvent("produced", series_instance_uid=job.series_instance_uid, job_id=job_id,
                                         instance_count=0, status=JobState.FAILED, detail=f"{job.pipeline}: {text}"))
            if isinstance(error, JobError):
                log.error("job %d (%s) failed; the series stays in the spool\n%s", job_id, job.pipeline,
                          error.details.rstrip())
            else:
                log.exception("job %d (%s) failed; the series stays in the spool", job_id, job.pipeline)
            return
        self.journal.record_steps(job_id, steps)
        not_run = "; ".join(str(step) for step in steps if step.state != StepState.OK)
        if steps and not any(step.state == StepState.OK for step in steps):
            text = f"no step gave a result: {not_run}"
            self.journal.update_job(job_id, state=JobState.FAILED, error=text, finished_at=utcnow())
            self.audit.record(AuditEvent("produced", series_instance_uid=job.series_instance_uid, job_id=job_id,
                                         instance_count=0, status=JobState.FAILED, detail=f"{job.pipeline}: {text}"))
            log.error("job %d (%s) failed: %s; the series stays in the spool", job_id, job.pipeline, text)
            return
        self.journal.update_job(job_id, state=JobState.DONE, finished_at=utcnow(), error=None)
        detail = f"{job.pipeline}: {', '.join(sorted({p.parent.name for p in written}))}"
        self.audit.record(AuditEvent("produced", series_instance_uid=job.series_instance_uid, job_id=job_id,
                                     instance_count=len(written), status=JobState.DONE,
                                     detail=f"{detail}; steps not run: {not_run}" if not_run else detail))
        self.on_done()

    def _start(self, job_id: int, claimed: bool) -> JobRecord | None:
        """The job, now `running` here; None when it is not to run (no longer queued, or the node stops).
        A claimed job is `running` under this node's lease already; one claimed as the node stops goes
        back to the queue."""
        job = self.journal.get_job(job_id)
        if claimed:
            if self._stopping.is_set():
                self.leases.release_job(job_id)
                return None
            return job if job is not None and job.state == JobState.RUNNING and \
                job.lease_owner == self.leases.owner else None
        if job is None or job.state != JobState.QUEUED or self._stopping.is_set():
            return None
        return self.journal.update_job(job_id, state=JobState.RUNNING, started_at=utcnow(), attempts=job.attempts + 1,
                                       error=None)

    def _series_superseded(self, job: JobRecord) -> bool:
        series = self.journal.get_series(job.series_instance_uid, job.generation)
        return series is not None and series.state == SeriesState.SUPERSEDED

    def _superseded(self, job: JobRecord) -> None:
        """The series was sent again with new instances while this job ran: the newer generation's job
        makes the one result for the whole series, so this one delivers nothing."""
        series = self.journal.get_series(job.series_instance_uid, job.generation)
        reason = series.reason if series is not None else "superseded"
        self.journal.update_job(job.id, state=JobState.SUPERSEDED, error=reason, finished_at=utcnow())
        self.audit.record(AuditEvent("produced", series_instance_uid=job.series_instance_uid, job_id=job.id,
                                     instance_count=0, status=JobState.SUPERSEDED, detail=f"{job.pipeline}: {reason}"))
        log.info("job %d (%s) delivers nothing: series %s generation %d %s", job.id, job.pipeline,
                 job.series_instance_uid, job.generation, reason)

    def _interrupted(self, job: JobRecord, reason: str) -> None:
        """An interrupted job (see MAX_INTERRUPTED_RUNS) is run again, in a fresh worker if its worker
        died, up to MAX_INTERRUPTED_RUNS runs (the OOM killer may have picked it for another job's
        memory); then it is failed."""
        if job.attempts < MAX_INTERRUPTED_RUNS:
            log.error("job %d (%s): %s; run %d of %d, queued again", job.id, job.pipeline, reason, job.attempts,
                      MAX_INTERRUPTED_RUNS)
            self.journal.update_job(job.id, state=JobState.QUEUED, error=reason)
            return  # the dispatch loop's pick_up_queued submits it again within a second
        error = (f"{reason}, in each of its {job.attempts} runs; not started again automatically: "
                 f"`dicom-node jobs retry {job.id}`")
        log.error("job %d (%s) failed: %s", job.id, job.pipeline, error)
        self.journal.update_job(job.id, state=JobState.FAILED, error=error, finished_at=utcnow())
        self.audit.record(AuditEvent("produced", series_instance_uid=job.series_instance_uid, job_id=job.id,
                                     instance_count=0, status=JobState.FAILED, detail=f"{job.pipeline}: {error}"))

    def run_job(self, job: JobRecord) -> tuple[list[Path], tuple[StepOutcome, ...]]:
        """Produce the results in a worker process, queue one export per (result, destination); returns
        the result files and each step's outcome (none for a forward rule, which has no steps)."""
        if job.kind == JobKind.FORWARD:
            return self._forward(job), ()
        pipeline = self.config.pipelines[job.pipeline]
        instances = self.journal.series_instances(job.series_instance_uid, job.generation)
        if self._series_superseded(job):  # queued by a router that finished after the series was taken over
            raise Superseded()
        series = self.journal.get_series(job.series_instance_uid, job.generation)
        out_dir = self.results_dir / str(job.id)
        self.journal.update_job(job.id, output_dir=str(out_dir))
        output = self._job_workers.run(JobRequest(
            config=self.config, job=job, study_instance_uid=series.study_instance_uid if series else "",
            instance_paths=tuple(i.path for i in instances), out_dir=str(out_dir)))
        for stage, seconds in output.seconds.items():
            self.metrics.observe_stage(stage, seconds)
        for server, outcome, count in output.inference_requests:
            self.metrics.inference_requests.labels(server=server, outcome=outcome).inc(count)
        _write_timings(out_dir, output.seconds)
        if not self.journal.add_exports(job, [(destination, uid, path) for path, uid in zip(
                output.exported, output.sop_instance_uids) for destination in pipeline.destinations]):
            raise Superseded()
        log.info("job %d (%s) done: load %.2f s, inference %.2f s, encode %.2f s, %d result files; %d of %d "
                 "slices decoded while the series arrived (only compressed pixels are)", job.id, job.pipeline,
                 output.seconds["load"], output.seconds["inference"], output.seconds["encode"],
                 len(output.exported), output.prepared_frames, output.frames)
        return [Path(p) for p in output.exported], output.steps

    def _forward(self, job: JobRecord) -> list[Path]:
        """Plain auto-routing: queue the spooled originals themselves, which hold the sender's data set
        bytes, so the destination gets them byte-identical through the same retry and dead letter."""
        rule = self.config.forward[job.pipeline]
        instances = self.journal.series_instances(job.series_instance_uid, job.generation)
        if not self.journal.add_exports(job, [(destination, instance.sop_instance_uid, instance.path)
                                              for instance in instances for destination in rule.destinations]):
            raise Superseded()
        log.info("job %d (%s): %d original instances queued for %s", job.id, job.pipeline, len(instances),
                 ", ".join(rule.destinations))
        return [Path(i.path) for i in instances]

    def run_infer(self, request, timeout: float | None):
        """An inference request of the HTTP API (dicom_node.pipeline.infer), in the job workers: it takes the
        next free slot in turn with the jobs (dicom_node.pipeline.workers)."""
        if self._stopping.is_set():  # the workers are closing: a request must not start a fresh one
            raise NodeStopping()
        return self._job_workers.run(request, timeout)

    def inference(self):
        """The model repository and backend for the readiness checks (/readyz, `dicom-node status`),
        opened once on first use; jobs use their worker process's own."""
        with self._inference_lock:
            return open_inference(self.config)


def _write_timings(out_dir: Path, seconds: dict[str, float]) -> None:
    """The stage times of the job's run beside its results (`timings.json`), for the console's series page;
    a job whose folder cannot be written still delivers."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "timings.json").write_text(json.dumps({k: round(v, 3) for k, v in seconds.items()}))
    except OSError as error:
        log.warning("job timings not written to %s: %s", out_dir, error)
