"""Pipeline stage: a complete series becomes jobs, jobs become results, results reach every PACS.

Everything that matters survives a crash because it is in the journal first:
a job is a row (queued -> running -> done | failed), each result instance for
each destination is an export row (pending -> sent | dead) with its attempt
count and next_attempt_at, so a restart continues the retry schedule where it
stopped. A series sent again with new instances supersedes its earlier
generations (`dicom_node.store.journal`): their jobs and exports not yet done end
`superseded`, so one result covers the whole series.

Steps fail alone: a job whose steps partly failed (a classifier whose model is
not installed) is `done` and delivers what the other steps gave; the outcome
of every step is in the journal (`job_steps`) and in the job's SR. Only a job
where no step gave a result, or that failed before its steps (an unreadable
series), is `failed`.

At-least-once to a PACS: an export marked `sent` is never sent again, but a
crash between the C-STORE response and the journal update resends the same
object. Since result UIDs are derived from (series, generation, pipeline, kind)
(`dicom_node.results.uids`), the PACS then receives the same SOP Instance UID
again, which it treats as the same instance (PS3.4 B.4.1: the SCP may overwrite
or ignore a duplicate), not as a second result: delivery is at least once, the
result the PACS holds is one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicom_node.dispatch import registry as dispatch

from dicom_node.pipeline import route
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.config import Config, DestinationConfig
from dicom_node.dispatch.destinations import Outcome, OutcomeKind, Refusal
from dicom_node.pipeline.job import JobRequest, close_inference, open_inference
from dicom_node.store.journal import ExportRecord, JobRecord, Journal, SeriesRecord, StepOutcome, utcnow
from dicom_node.logs import series_context
from dicom_node.metrics import NodeMetrics, failure_reason
from dicom_node.states import ExportState, JobKind, JobState, SeriesState, StepState
from dicom_node.pipeline.workers import JobError, JobWorkers, WorkerDied

if TYPE_CHECKING:
    from dicom_node.pipeline.volume import SeriesHeaders

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# A job journaled `running` that no thread of this node runs was interrupted: by a node crash (found at
# start-up), by its worker process dying, or by the journal refusing its outcome. Requeue it, but not
# forever: a job that takes its process down (a native crash in a codec or model runtime) would otherwise
# do so again and again.
MAX_INTERRUPTED_RUNS = 3


class Superseded(Exception):
    """The job's series generation was superseded by a newer one (`Journal.add_exports`)."""


class Pipeline:
    """Routing, the bounded inference worker pool and the dispatch loop of one node."""

    def __init__(self, config: Config, journal: Journal, metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.journal = journal
        self.metrics = metrics or NodeMetrics()
        self.audit = AuditLog(journal)
        self.results_dir = Path(config.node.storage_dir) / "results"
        # One thread per worker slot waits on its job's worker process (dicom_node.pipeline.workers).
        self._threads = ThreadPoolExecutor(max_workers=max(1, config.inference.workers), thread_name_prefix="job")
        self._job_workers = JobWorkers(config)
        self._stopping = threading.Event()
        self._dispatch_wakeup = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._inference_lock = threading.Lock()
        self._rng = random.Random()
        self._submitted: set[int] = set()
        self._submitted_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the job workers (when a pipeline may need them), requeue jobs a crash left running, run
        queued ones, resume pending exports."""
        if any(pipeline.enabled for pipeline in self.config.pipelines.values()):
            self._job_workers.start()
        self.pick_up_queued(interrupted_by="the node stopped while running it")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatch", daemon=True)
        self._dispatcher.start()

    def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        self._dispatch_wakeup.set()
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._job_workers.close()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        close_inference()

    # --- routing -----------------------------------------------------------------------------

    def on_series_complete(self, series: SeriesRecord) -> None:
        """Route a complete series to jobs; the work itself runs on the worker pool."""
        paths = [Path(i.path) for i in self.journal.series_instances(series.series_instance_uid, series.generation)]
        from dicom_node.pipeline.volume import SeriesHeaders
        try:
            headers = SeriesHeaders.read(paths)
            summary = headers.summary()
        except Exception as error:  # unreadable headers: keep the series, say why
            self.journal.set_series_state(series.series_instance_uid, series.generation, SeriesState.QUARANTINED,
                                          reason=f"summary failed: {error}")
            log.error("series %s quarantined: %s", series.series_instance_uid, error)
            return
        matches = route.match_pipelines(self.config, summary, series.calling_ae, series.called_ae)
        if not matches:
            why = route.unmatched_reasons(self.config, summary, series.calling_ae, series.called_ae)
            reason = "; ".join(f"{name}: {text}" for name, text in why.items()) or "no pipelines configured"
            self.journal.set_series_state(series.series_instance_uid, series.generation, SeriesState.UNMATCHED,
                                          reason=reason)
            log.info("series %s generation %d matched no pipeline (kept in the spool): %s",
                     series.series_instance_uid, series.generation, reason)
            return
        refusal = self._refusal(series, headers, matches)
        if refusal is not None:
            matches = [m for m in matches if m.kind == JobKind.FORWARD]
        # Jobs first (add_job is idempotent), then `routed`: a hand-over the journal cut short leaves the
        # series `complete`, handed over again, never `routed` with a job missing.
        added = [(match, self.journal.add_job(series.series_instance_uid, series.generation, match.pipeline,
                                              match.kind)) for match in matches]
        if refusal is not None:
            self.journal.set_series_state(series.series_instance_uid, series.generation, SeriesState.QUARANTINED,
                                          reason=refusal)
        else:
            self.journal.set_series_state(series.series_instance_uid, series.generation, SeriesState.ROUTED,
                                          reason=", ".join(m.pipeline for m in matches))
        for match, job in added:
            with series_context(series.study_instance_uid, series.series_instance_uid, job.id):
                log.info("series %s -> %s %s (job %d): %s", series.series_instance_uid, match.kind, match.pipeline,
                         job.id, "; ".join(match.reasons))
            if job.state == JobState.QUEUED:
                self.submit(job)

    def _refusal(self, series: SeriesRecord, headers: SeriesHeaders, matches: list[route.RouteMatch]) -> str | None:
        """Why no model may run on this series, from its headers (`volume.SeriesHeaders.check`), or None.

        Checked before a job exists, so a series that could only give a wrong
        volume or an unencodable result (colour pixels, two Frames of Reference,
        a missing slice, ...) is quarantined with the reason at once, with no
        worker time spent on it. Forward rules still send the originals on.
        """
        pipelines = [m.pipeline for m in matches if m.kind != JobKind.FORWARD]
        if not pipelines:
            return None
        try:
            headers.check()
        except Exception as error:  # SeriesGeometryError, or a header no check foresaw: never a job either way
            reason = f"refused before inference ({', '.join(pipelines)}): {type(error).__name__}: {error}"
            with series_context(series.study_instance_uid, series.series_instance_uid, None):
                log.error("series %s generation %d quarantined: %s", series.series_instance_uid, series.generation,
                          reason)
            self.audit.record(AuditEvent("produced", study_instance_uid=series.study_instance_uid,
                                         series_instance_uid=series.series_instance_uid, instance_count=0,
                                         status="refused", detail=reason))
            return reason
        return None

    def submit(self, job: JobRecord) -> None:
        with self._submitted_lock:
            if job.id in self._submitted:
                return
            self._submitted.add(job.id)
        self._threads.submit(self._run_guarded, job.id)

    def pick_up_queued(self, interrupted_by: str = "its run ended without its outcome in the journal") -> None:
        """Requeue jobs journaled `running` that no thread here runs (`interrupted_by` says why), then put
        queued jobs not yet on the pool there: after a restart, or requeued by `dicom-node jobs retry`."""
        for job in self.journal.jobs_in_state(JobState.RUNNING):
            with self._submitted_lock:  # a run journals its outcome before it leaves `_submitted`
                orphan = job.id not in self._submitted and self.journal.get_job(job.id).state == JobState.RUNNING
            if orphan:
                self._interrupted(job, interrupted_by)
        for job in self.journal.jobs_in_state(JobState.QUEUED):
            self.submit(job)

    # --- jobs --------------------------------------------------------------------------------

    def _job_context(self, job_id: int):
        """Log context of a job: its id and its series' Study/Series Instance UIDs."""
        job = self.journal.get_job(job_id)
        series = self.journal.get_series(job.series_instance_uid, job.generation) if job else None
        return series_context(series.study_instance_uid if series else None,
                              job.series_instance_uid if job else None, job_id)

    def _run_guarded(self, job_id: int) -> None:
        try:
            with self._job_context(job_id):
                self._run(job_id)
        except Exception:  # the journal refused a write: the dispatch loop's pick_up_queued requeues the job
            log.exception("job %d: its outcome could not be journaled", job_id)
        finally:
            with self._submitted_lock:
                self._submitted.discard(job_id)

    def _run(self, job_id: int) -> None:
        job = self.journal.get_job(job_id)
        if job is None or job.state != JobState.QUEUED or self._stopping.is_set():
            return
        job = self.journal.update_job(job_id, state=JobState.RUNNING, started_at=utcnow(), attempts=job.attempts + 1,
                                      error=None)
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
        self._dispatch_wakeup.set()

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
        if not self.journal.add_exports(job, [(destination, uid, path) for path, uid in zip(
                output.exported, output.sop_instance_uids) for destination in pipeline.destinations]):
            raise Superseded()
        log.info("job %d (%s) done: load %.2f s, inference %.2f s, encode %.2f s, %d result files",
                 job.id, job.pipeline, output.seconds["load"], output.seconds["inference"],
                 output.seconds["encode"], len(output.exported))
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

    def inference(self):
        """The model repository and backend for the readiness checks (/readyz, `dicom-node status`),
        opened once on first use; jobs use their worker process's own."""
        with self._inference_lock:
            return open_inference(self.config)

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.pick_up_queued()
                self.dispatch_due()
            except Exception:
                log.exception("dispatch pass failed")
            self._dispatch_wakeup.wait(1.0)
            self._dispatch_wakeup.clear()

    def dispatch_due(self) -> None:
        """Send every pending export whose time has come, one association per destination."""
        due = self.journal.exports_in_state(ExportState.PENDING, due_before=utcnow())
        by_destination = defaultdict(list)
        for export in due:
            by_destination[export.destination].append(export)
        for name, exports in by_destination.items():
            destination = self.config.destinations[name]
            calling = destination.calling_ae_title or self.config.node.ae_title
            started = time.monotonic()
            report = dispatch.send(destination, [Path(e.path) for e in exports], calling)
            self.metrics.observe_stage("dispatch", time.monotonic() - started)
            outcomes = {o.sop_instance_uid: o for o in report.outcomes}
            by_job = defaultdict(list)
            for export in exports:
                by_job[export.job_id].append(export)
            for job_id, job_exports in by_job.items():
                with self._job_context(job_id):
                    self._settle(job_id, destination, job_exports, outcomes)

    def _settle(self, job_id: int, destination: DestinationConfig, exports: list[ExportRecord],
                outcomes: dict[str, Outcome]) -> None:
        """Journal each export's outcome, count failures, audit one line per (job, destination) pass."""
        name = exports[0].destination
        statuses: dict[str, int] = defaultdict(int)
        sent = 0
        for export in exports:
            outcome = outcomes.get(export.sop_instance_uid) or Outcome(
                export.sop_instance_uid, None, OutcomeKind.TRANSIENT, "no outcome reported")
            statuses[outcome.reason] += 1
            if outcome.kind.stored:
                if outcome.kind == OutcomeKind.WARNING:
                    log.warning("export %d to %s stored with warning 0x%04X: %s", export.id, name,
                                outcome.status or 0, outcome.reason)
                sent += 1
                self.metrics.exports_sent.labels(destination=name).inc()
                self.journal.update_export(export.id, state=ExportState.SENT, sent_at=utcnow(), reason=outcome.reason,
                                           last_status=outcome.status, attempts=export.attempts + 1)
                continue
            self.metrics.dispatch_failures.labels(destination=name,
                                                  reason=failure_reason(outcome.kind, outcome.status)).inc()
            if outcome.kind == OutcomeKind.TRANSIENT:
                self._transient(export, destination, outcome)
            else:
                self._dead(export, outcome, outcome.reason)
        job = self.journal.get_job(job_id)
        self.audit.record(AuditEvent(
            "sent" if sent == len(exports) else "failed", series_instance_uid=job.series_instance_uid if job else None,
            job_id=job_id, destination=name, instance_count=sent,
            status=f"{sent}/{len(exports)} stored",
            detail="; ".join(f"{reason} x{count}" for reason, count in sorted(statuses.items()))))

    def _transient(self, export: ExportRecord, destination: DestinationConfig, outcome: Outcome) -> None:
        """Try again when the destination's retry policy says, or dead-letter once it is exhausted."""
        attempts = export.attempts + 1
        if destination.retry.is_exhausted(attempts):
            self._dead(export, outcome, f"{outcome.reason} (gave up after {attempts} attempts)")
            return
        delay = destination.retry.next_delay_s(attempts, self._rng)
        self.journal.update_export(export.id, attempts=attempts, last_status=outcome.status, reason=outcome.reason,
                                   next_attempt_at=utcnow() + timedelta(seconds=delay))
        log.warning("export %d to %s: transient failure (%s); attempt %d, next in %.1f s", export.id,
                    export.destination, outcome.reason, attempts, delay)

    def _dead(self, export: ExportRecord, outcome: Outcome, reason: str) -> None:
        self.journal.update_export(export.id, state=ExportState.DEAD, last_status=outcome.status, reason=reason,
                                   attempts=export.attempts + 1)
        log.error("export %d to %s dead-lettered: %s", export.id, export.destination, reason)
        if outcome.refusal == Refusal.SOP_CLASS_NOT_SUPPORTED:
            self._overlay_fallback(export)

    def _overlay_fallback(self, export: ExportRecord) -> None:
        """A destination that refuses SEG's SOP class (0x0122, PS3.4 Table B.2-1, or no accepted
        presentation context) gets the overlay series, if the pipeline makes one."""
        job = self.journal.get_job(export.job_id)
        pipeline = self.config.pipelines.get(job.pipeline) if job and job.kind == JobKind.PIPELINE else None
        if pipeline is None or "overlay" not in pipeline.outputs:
            return
        if pydicom.dcmread(export.path, stop_before_pixels=True).SOPClassUID != SEG_STORAGE:
            return
        overlay_dir = Path(job.output_dir or self.results_dir / str(job.id)) / "overlay"
        for path in sorted(overlay_dir.glob("*.dcm")):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            self.journal.add_export(job.id, export.destination, uid, str(path))
        log.info("job %d: %s refuses SEG; overlay series queued instead", job.id, export.destination)
