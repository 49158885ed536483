"""The pipeline stage as the server starts and stops it: router, job runner and export loop in one object.

Where a series goes after it is complete: `router` (`dicom_node.pipeline.router`)
turns it into jobs, `jobs` (`dicom_node.pipeline.runner`) runs them in worker
processes and queues one export per (result, destination), `exports`
(`dicom_node.dispatch.exports`) sends them. Each part hands over through the
journal, so each continues after a restart where it stopped.
"""

from __future__ import annotations

from dicom_node.config import Config
from dicom_node.dispatch.exports import ExportDispatcher
from dicom_node.metrics import NodeMetrics
from dicom_node.pipeline.job import close_inference
from dicom_node.pipeline.router import Router
from dicom_node.pipeline.runner import JobRunner
from dicom_node.store.audit import AuditLog
from dicom_node.store.journal import Journal, SeriesRecord
from dicom_node.store.leases import Leases


class Pipeline:
    """Routing, the bounded inference worker pool and the dispatch loop of one node."""

    def __init__(self, config: Config, journal: Journal, metrics: NodeMetrics | None = None,
                 leases: Leases | None = None) -> None:
        """`leases`: this node's claims on a journal shared with other nodes (dicom_node.store.cluster)."""
        metrics = metrics or NodeMetrics()
        audit = AuditLog(journal)
        self.jobs = JobRunner(config, journal, metrics, audit, leases=leases)
        # The export loop also picks up queued jobs each pass: requeued ones, and interrupted ones.
        self.exports = ExportDispatcher(config, journal, metrics, audit, each_pass=self.jobs.pick_up_queued,
                                        leases=leases)
        self.jobs.on_done = self.exports.wake
        self.router = Router(config, journal, audit, submit=self.jobs.submit)

    def start(self) -> None:
        """Start the job workers, requeue jobs a crash left running, run queued ones, resume pending exports."""
        self.jobs.start()
        self.exports.start()

    def stop(self, timeout: float = 30) -> None:
        self.exports.request_stop()
        self.jobs.stop()
        self.exports.join(timeout)
        close_inference()

    def on_series_complete(self, series: SeriesRecord) -> None:
        self.router.on_series_complete(series)

    def pick_up_queued(self) -> None:
        self.jobs.pick_up_queued()

    def run_infer(self, request, timeout: float | None):
        return self.jobs.run_infer(request, timeout)

    def inference(self):
        return self.jobs.inference()
