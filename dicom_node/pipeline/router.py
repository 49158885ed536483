"""Where a complete series goes: into jobs, one per matching pipeline or forward rule.

In: a series the completion tracker found complete (`dicom_node.pipeline.complete`).
Out: its jobs in the journal, queued ones handed to the job runner
(`dicom_node.pipeline.runner`), and the series `routed`, `unmatched` (no rule
matched, kept in the spool) or `quarantined` (its headers could only give a wrong
volume, so no model runs on it; forward rules still send the originals on). The
rules themselves are matched in `dicom_node.pipeline.route`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dicom_node.config import Config
from dicom_node.logs import series_context
from dicom_node.pipeline import route
from dicom_node.pipeline.volume import SeriesHeaders
from dicom_node.states import JobKind, JobState, SeriesState
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import JobRecord, Journal, SeriesRecord

log = logging.getLogger(__name__)


class Router:
    """Turns a complete series into jobs and hands each queued one to `submit`."""

    def __init__(self, config: Config, journal: Journal, audit: AuditLog, submit: Callable[[JobRecord], None]) -> None:
        self.config = config
        self.journal = journal
        self.audit = audit
        self.submit = submit

    def on_series_complete(self, series: SeriesRecord) -> None:
        """Route a complete series to jobs; the work itself runs on the worker pool."""
        paths = [Path(i.path) for i in self.journal.series_instances(series.series_instance_uid, series.generation)]
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
