"""The states and kinds the journal stores, one enum each, below every stage that compares them.

Each member's value is the string the journal has always stored, so a journal
an older version wrote reads unchanged and a member compares equal to its
text (`JobState.DONE == "done"`). Product code names the member; the journal
column holds the value.
"""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    """A series generation: receiving -> complete -> routed | unmatched | quarantined -> purged."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    UNMATCHED = "unmatched"
    QUARANTINED = "quarantined"
    SUPERSEDED = "superseded"  # a re-send with new instances opened a newer generation, which took them over
    PURGED = "purged"


class JobState(StrEnum):
    """A job: queued -> running -> done | failed (an interrupted run goes back to queued)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # its series generation was superseded: it delivers nothing
    DISCARDED = "discarded"  # an admin gave a failed job up (the console): it is not retried or counted as failing


class JobKind(StrEnum):
    """What a job does: run a pipeline's steps and send its results, or forward the original series
    as received (a `forward` rule). A job's `pipeline` column names the pipeline or the rule."""

    PIPELINE = "pipeline"
    FORWARD = "forward"


class ExportState(StrEnum):
    """One instance for one destination: pending -> sent | dead (dead-lettered)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    SUPERSEDED = "superseded"  # not sent: a newer generation's result replaces it
    DISCARDED = "discarded"  # dead-lettered, then given up by an admin (the console): never sent


class StepState(StrEnum):
    """One step of a job's run: ok, failed (its reason recorded), or skipped (a step it needs did not run)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
