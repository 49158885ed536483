"""Group commit: writes that arrive together share one transaction and one commit.

A C-STORE is answered only once its journal row is committed, and on a disk
that honours fsync a commit costs a disk flush whatever it holds. With
one commit per instance the journal's single writer makes every association
wait its turn for a full fsync, so receiving over several associations at once
was no faster than over one. Here a caller queues its write and waits for the
journal's write lock; whoever holds the lock commits everything queued by
then (its own write and those of the callers waiting behind it) in one
transaction, and each of them returns once that transaction is committed.
While one batch's commit is in fsync (the GIL released), the next batch queues
up, so batches grow by themselves with the load and no caller waits on a timer.

A batch that fails is rolled back and its writes retried one transaction
each, so one write that cannot be committed (a constraint, a value the
database refuses) fails only its own caller, never the others sharing its
batch. A caller is told success only after the commit returned: a crash
before that leaves it unanswered, never answered for a row not on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiting(Generic[Item, Result]):
    """One caller's write, and what became of it once its batch was committed or failed."""

    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: Item):
        self.item = item
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """Batches `submit`ted items into one transaction under `write_lock`.

    `apply(conn, items)` writes the items in order in the transaction and returns one result each;
    `committed(item, result)` runs for each once its transaction is committed (log lines that must not
    claim a write that was rolled back)."""

    def __init__(self, engine: Engine, write_lock: threading.Lock,
                 apply: Callable[[Connection, list[Item]], list[Result]],
                 committed: Callable[[Item, Result], None] = lambda item, result: None):
        self._engine = engine
        self._write_lock = write_lock
        self._apply = apply
        self._committed = committed
        self._queue_lock = threading.Lock()
        self._queued: list[_Waiting[Item, Result]] = []

    def submit(self, item: Item) -> Result:
        """Write `item`; returns its result once committed, or raises what failed it."""
        outcome = self.submit_all([item])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit_all(self, items: list[Item]) -> list[Result | BaseException]:
        """Write `items` in this order; once they are committed, each one's result, or the error that failed
        it (the others still committed)."""
        waiting = [_Waiting(item) for item in items]
        with self._queue_lock:
            self._queued.extend(waiting)
        with self._write_lock:
            if not all(w.done for w in waiting):  # no batch took them while this caller waited: it leads the next
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit(batch)
        return [w.result if w.error is None else w.error for w in waiting]

    def _commit(self, batch: list[_Waiting[Item, Result]]) -> None:
        """Commit the batch as one transaction; if that fails, each of its writes in its own."""
        try:
            self._transaction(batch)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
            else:
                for waiting in batch:
                    try:
                        self._transaction([waiting])
                    except Exception as own_error:
                        waiting.error = own_error
        except BaseException as error:  # the leading thread is being stopped: nobody in the batch hears success
            for waiting in batch:
                waiting.error = error
            raise
        finally:
            for waiting in batch:
                waiting.done = True
        for waiting in batch:
            if waiting.error is None:
                self._committed(waiting.item, waiting.result)

    def _transaction(self, batch: list[_Waiting[Item, Result]]) -> None:
        with self._engine.begin() as conn:
            results = self._apply(conn, [waiting.item for waiting in batch])
        for waiting, result in zip(batch, results, strict=True):
            waiting.result = result
