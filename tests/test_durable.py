"""Received instances made durable in passes: what is handed over while a pass is on disk goes in the next
one, with one commit, and each instance is answered for its own file and row only."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from dicom_node.receive.durable import DurableWrites, Written
from dicom_node.store.journal import Journal
from dicom_node.store.spool import InstanceKey, Spool, Staged
from tests.test_group_commit import counting_commits
from tests.test_journal import instance
from tests.test_spool import temp_files

SERIES = "1.2.3.4"


class FailingFor(Spool):
    """A disk whose fsync fails (EIO) for the files named in `failing`: no real part fails one file's fsync."""

    failing: frozenset[str] | set[str] = frozenset()

    def sync_content(self, staged: Staged) -> None:
        if staged.final.name in self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().sync_content(staged)


@pytest.fixture()
def parts(tmp_path):
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    spool = FailingFor(tmp_path / "var")
    yield spool, journal, DurableWrites(spool, journal)
    journal.close()


def hand_over(spool: Spool, durable: DurableWrites, numbers: range) -> tuple[dict[int, Written], list[threading.Thread]]:
    """Stage instance n of the series for each n and hand each over on its own (started) thread; returns
    n -> what it got (filled in as they finish) and the threads."""
    outcomes: dict[int, Written] = {}

    def write(n: int) -> None:
        key = InstanceKey("1.2.3", SERIES, f"{SERIES}.{n}")
        staged = spool.stage(key, (f"instance {n}".encode(),))
        outcomes[n] = durable.write(staged, instance(key.sop_instance_uid, series=SERIES,
                                                     path=str(spool.path_for(key))))
    threads = [threading.Thread(target=write, args=(n,)) for n in numbers]
    for thread in threads:
        thread.start()
    return outcomes, threads


def test_instances_handed_over_during_a_pass_are_made_durable_together_in_the_next(parts):
    spool, journal, durable = parts
    commits = counting_commits(journal)
    with journal._write_lock:  # the first pass's commit waits here while five more are handed over
        first, first_threads = hand_over(spool, durable, range(1))
        deadline = time.monotonic() + 30
        while not durable._running and time.monotonic() < deadline:
            time.sleep(0.01)
        rest, rest_threads = hand_over(spool, durable, range(1, 6))
        while len(durable._handed) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(durable._handed) == 5 and not first, "the first pass should be waiting for its commit"
    for thread in first_threads + rest_threads:
        thread.join(30)
    outcomes = {**first, **rest}
    assert sorted(outcomes) == list(range(6))
    assert commits[0] == 2  # the first instance's pass, then one pass for the five that came meanwhile
    for n, written in outcomes.items():
        key = InstanceKey("1.2.3", SERIES, f"{SERIES}.{n}")
        assert written.file_error is None and written.row_error is None
        assert written.path == spool.path_for(key) and written.path.read_bytes() == f"instance {n}".encode()
        record, new = written.row
        assert new and record.sop_instance_uid == key.sop_instance_uid and record.generation == 1
    assert journal.get_series(SERIES, 1).instance_count == 6
    assert temp_files(spool) == [] and not durable._running


def test_a_file_that_fails_in_a_pass_fails_only_its_own_instance(parts):
    spool, journal, durable = parts
    spool.failing = {f"{SERIES}.3.dcm"}
    with journal._write_lock:  # hold the first pass so that the rest share one
        outcomes, threads = hand_over(spool, durable, range(6))
        deadline = time.monotonic() + 30
        while len(durable._handed) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(30)
    failed = outcomes.pop(3)
    assert isinstance(failed.file_error, OSError) and failed.file_error.errno == errno.EIO and failed.path is None
    assert failed.row is not None  # its row was committed beside the fsync: the receiver takes it back
    assert all(w.file_error is None and w.path.exists() and w.row[1] for w in outcomes.values())
    assert sorted(p.name for p in spool.instance_files()) == sorted(f"{SERIES}.{n}.dcm" for n in outcomes)
    assert temp_files(spool) == []
