"""The export loop: pending exports in the journal reach their destinations, or are retried, or dead-lettered.

In: export rows (`pending`, with their attempt count and next_attempt_at) that a
job queued for each (result, destination). Out: each row `sent`, or rescheduled
under the destination's retry policy (`config.RetryPolicy`, the same for every
destination kind), or `dead` once the policy gives up or the destination refuses
for good. A destination that refuses SEG's SOP class gets the overlay series
instead, when the pipeline makes one.

At-least-once to a PACS: an export marked `sent` is never sent again, but a
crash between the C-STORE response and the journal update resends the same
object, with the same SOP Instance UID (`dicom_node.results.uids`), which the
PACS treats as the same instance (PS3.4 B.4.1).

On a journal shared by several nodes (`dicom_node.store.cluster`) each pass claims
the due exports under this node's lease (`dicom_node.store.leases`), so no
two nodes send one export at once; a node that dies mid-send leaves its
exports to another node once the lease has run out (the same at-least-once).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydicom

from dicom_node.config import Config
from dicom_node.config.destinations import DestinationConfig
from dicom_node.dispatch import registry as dispatch
from dicom_node.dispatch.destinations import Outcome, OutcomeKind, Refusal
from dicom_node.metrics import NodeMetrics, failure_reason
from dicom_node.states import ExportState, JobKind
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import ExportRecord, Journal, utcnow
from dicom_node.store.leases import Leases

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class ExportDispatcher:
    """The dispatch thread: once a second, or when woken, `each_pass` (the job runner picks up queued
    jobs there) and then every export whose time has come."""

    def __init__(self, config: Config, journal: Journal, metrics: NodeMetrics, audit: AuditLog,
                 each_pass: Callable[[], None] = lambda: None, leases: Leases | None = None) -> None:
        self.config = config
        self.leases = leases  # None: the only node, which sends every export due
        self.journal = journal
        self.metrics = metrics
        self.audit = audit
        self.results_dir = Path(config.node.storage_dir) / "results"
        self._each_pass = each_pass
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a pass now rather than within the second (a job just queued exports)."""
        self._wakeup.set()

    def request_stop(self) -> None:
        """No pass after the one running now; `join` waits for it."""
        self._stopping.set()
        self._wakeup.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._each_pass()
                self.dispatch_due()
            except Exception:
                log.exception("dispatch pass failed")
            self._wakeup.wait(1.0)
            self._wakeup.clear()

    def dispatch_due(self) -> None:
        """Send every pending export whose time has come, one association per destination."""
        if self.leases is None:
            self._dispatch(self.journal.exports_in_state(ExportState.PENDING, due_before=utcnow()))
            return
        due = self.leases.claim_exports(due_before=utcnow())
        try:
            self._dispatch(due)
        finally:
            self.leases.release_exports([export.id for export in due])

    def _dispatch(self, due: list[ExportRecord]) -> None:
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
                with self.journal.job_log_context(job_id):
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
            detail=f"{destination.kind}: "
                   + "; ".join(f"{reason} x{count}" for reason, count in sorted(statuses.items()))))

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
