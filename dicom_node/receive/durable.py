"""Received instances made durable together: files fsynced and named, rows committed, then each answered.

An instance is answered success only once its file's content, its file's name
and its journal row are on disk. When each association's thread waited for its
own instance (its file fsynced on a helper thread, beside the journal's group
commit), an instance cost 33–45 thread switches at 8 associations: sixteen
threads took the GIL in turn around every system call, on the two cores a
storage node is often given (docs/performance.md). Here the receiving thread
writes its file to the page cache (`Spool.stage`) and hands the instance to
`DurableWrites`, which makes every instance handed over by then durable in one
pass: their rows are committed in one transaction on a helper thread
(`Journal.record_instances`) while their files are fsynced, linked to their
names and each of their folders fsynced once (`Spool.settle`); then each
waiting association is woken with its own outcome. A pass holds whatever
arrived while the previous one was on disk, so passes grow with the load and
nobody waits on a timer.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.store.journal import InstanceRecord, Journal, NewInstance
from dicom_node.store.spool import Spool, Staged

log = logging.getLogger("dicom_node.receive.durable")


@dataclass
class Written:
    """What became of one instance's file and row; either can fail without the other.

    `path` is None when a file was already under the instance's name (another node sharing the spool
    stored the same instance at the same time); `row` is (record, new) as `Journal.record_instance` gives."""

    path: Path | None = None
    file_error: OSError | None = None
    row: tuple[InstanceRecord, bool] | None = None
    row_error: BaseException | None = None


@dataclass
class _Handed:
    staged: Staged
    instance: NewInstance
    written: Written = field(default_factory=Written)
    finished: bool = False  # `written` is final
    woken: threading.Event = field(default_factory=threading.Event)  # finished, or asked to lead the next pass


class DurableWrites:
    """Settles staged files and records their rows in passes; `write` blocks its caller until its own
    instance is done.

    A pass is run by one of the receiving threads, not by a thread of its own: whoever hands over an
    instance while no pass is running leads the next, taking every instance handed over by then, and
    when its pass is done, asks the first of those that arrived meanwhile to lead the following one. An
    association sending alone so costs no more thread switches than the commit beside its fsyncs."""

    def __init__(self, spool: Spool, journal: Journal):
        self.spool = spool
        self.journal = journal
        self._lock = threading.Lock()
        self._handed: list[_Handed] = []
        self._running = False
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-commit")

    def write(self, staged: Staged, instance: NewInstance) -> Written:
        """Settle the staged file and record its row; returns once both are on disk or have failed."""
        handed = _Handed(staged, instance)
        with self._lock:
            self._handed.append(handed)
            lead = not self._running
            self._running = True
        if not lead:
            handed.woken.wait()
            if handed.finished:
                return handed.written
        with self._lock:
            batch, self._handed = self._handed, []
        try:
            self._pass(batch)
        finally:
            with self._lock:
                if self._handed:
                    self._handed[0].woken.set()  # the next pass is theirs
                else:
                    self._running = False
        return handed.written

    def _pass(self, batch: list[_Handed]) -> None:
        try:
            self._write(batch)
        except Exception as error:  # never tell an association success for what may not be on disk
            log.exception("writing %d received instances failed", len(batch))
            for handed in batch:
                written = handed.written
                if written.path is not None:
                    written.path.unlink(missing_ok=True)
                handed.written = Written(file_error=written.file_error or OSError(f"not written: {error}"),
                                         row_error=written.row_error or error)
        finally:
            for handed in batch:
                handed.finished = True
                handed.woken.set()

    def _write(self, batch: list[_Handed]) -> None:
        committing = self._commits.submit(self.journal.record_instances, [h.instance for h in batch])
        for handed, outcome in zip(batch, self.spool.settle([h.staged for h in batch]), strict=True):
            if isinstance(outcome, OSError):
                handed.written.file_error = outcome
            else:
                handed.written.path = outcome
        for handed, row in zip(batch, committing.result(), strict=True):
            if isinstance(row, BaseException):
                handed.written.row_error = row
            else:
                handed.written.row = row
