"""Group commit of recorded instances, on SQLite and PostgreSQL: concurrent callers share commits, each
is answered for its own write only, and one write that fails fails no one else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from sqlalchemy import event

from dicom_node.states import SeriesState
from dicom_node.store.journal import Journal
from tests.test_journal import instance


@pytest.fixture()
def journal(journal_url):
    j = Journal(journal_url)
    yield j
    j.close()


def counting_commits(journal: Journal) -> list[int]:
    commits = [0]

    def count(_conn) -> None:
        commits[0] += 1
    event.listen(journal.engine, "commit", count)
    return commits


def run_all(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Each call on its own thread at once; name -> what it returned or raised."""
    outcomes: dict[str, object] = {}
    start = threading.Barrier(len(calls))

    def run(name: str, call: Callable[[], object]) -> None:
        start.wait()
        try:
            outcomes[name] = call()
        except Exception as error:  # the outcome under test
            outcomes[name] = error
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == len(calls), "a recording thread did not finish"
    return outcomes


def queued_behind_the_lock(journal: Journal, calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run `calls` while the journal's writer is busy (its lock held here) until every one has queued its
    write, then let them go: the first to take the lock commits them all, deterministically one batch."""
    outcomes: dict[str, object] = {}
    with journal._write_lock:
        runner = threading.Thread(target=lambda: outcomes.update(run_all(calls)))
        runner.start()
        deadline = time.monotonic() + 30
        while len(journal._recorder._queued) < len(calls):
            assert time.monotonic() < deadline, "the writes never queued"
            time.sleep(0.01)
    runner.join(60)
    return outcomes


def test_concurrent_records_all_land_once(journal):
    """8 threads x 20 instances over two series: every one journaled and counted once, none lost to a batch."""
    calls = {f"t{t}": (lambda t=t: [journal.record_instance(instance(f"1.{t}.{n}", series=f"1.2.{t % 2}"))
                                    for n in range(20)]) for t in range(8)}
    outcomes = run_all(calls)
    for name, results in outcomes.items():
        assert not isinstance(results, Exception), f"{name}: {results!r}"
        assert all(new for _, new in results)
    assert len(journal.all_instances()) == 160
    assert journal.get_series("1.2.0", 1).instance_count == journal.get_series("1.2.1", 1).instance_count == 80


def test_writes_waiting_together_share_one_commit_and_a_duplicate_is_counted_once(journal):
    commits = counting_commits(journal)
    calls = {f"sop{n}": (lambda n=n: journal.record_instance(instance(f"1.{n}"))) for n in range(5)}
    calls["again"] = lambda: journal.record_instance(instance("1.0", path="/elsewhere/1.0.dcm"))
    outcomes = queued_behind_the_lock(journal, calls)
    assert commits[0] == 1
    first, again = outcomes["sop0"], outcomes["again"]
    assert sorted([first[1], again[1]]) == [False, True], "one copy of 1.0 is new, the other its duplicate"
    assert first[0] == again[0]  # the duplicate is answered with the row the first copy wrote
    assert all(outcomes[f"sop{n}"][1] for n in range(1, 5))
    assert journal.get_series("1.2.3", 1).instance_count == 5
    assert sorted(r.sop_instance_uid for r in journal.all_instances()) == [f"1.{n}" for n in range(5)]


def test_a_write_the_database_refuses_fails_only_its_own_caller(journal):
    """A row the database refuses (here a NOT NULL column left empty) rolls its batch back; the batch's
    other writes are committed one by one and answered as recorded, the bad one gets its own error."""
    calls = {f"sop{n}": (lambda n=n: journal.record_instance(instance(f"1.{n}"))) for n in range(5)}
    calls["bad"] = lambda: journal.record_instance(replace(instance("1.9"), calling_ae=None))
    outcomes = queued_behind_the_lock(journal, calls)
    assert isinstance(outcomes["bad"], journal.engine.dialect.dbapi.IntegrityError), outcomes["bad"]
    for n in range(5):
        record, new = outcomes[f"sop{n}"]
        assert new and journal.find_instance(f"1.{n}") == record
    assert journal.find_instance("1.9") is None
    assert journal.get_series("1.2.3", 1).instance_count == 5


def test_one_batch_opens_a_new_generation_and_a_new_series_and_counts_each(journal):
    """A batch holding three new instances of a series already complete and two of a series never seen:
    the first opens generation 2, which takes over generation 1's instances, the second opens its
    generation 1; one commit, each generation counted for exactly what it holds."""
    for n in range(2):
        journal.record_instance(instance(f"1.7.{n}", series="1.2.7"))
    assert journal.complete_series("1.2.7", 1) is not None
    commits = counting_commits(journal)
    calls = {f"again{n}": (lambda n=n: journal.record_instance(instance(f"1.7.{n + 2}", series="1.2.7")))
             for n in range(3)}
    calls.update({f"new{n}": (lambda n=n: journal.record_instance(instance(f"1.8.{n}", series="1.2.8")))
                  for n in range(2)})
    outcomes = queued_behind_the_lock(journal, calls)
    assert commits[0] == 1
    assert all(outcomes[f"again{n}"][1] and outcomes[f"again{n}"][0].generation == 2 for n in range(3))
    assert all(outcomes[f"new{n}"][1] and outcomes[f"new{n}"][0].generation == 1 for n in range(2))
    reopened = journal.get_series("1.2.7", 2)
    assert (reopened.state, reopened.instance_count) == (SeriesState.RECEIVING, 5)
    assert journal.get_series("1.2.7", 1).state == SeriesState.SUPERSEDED
    assert journal.get_series("1.2.8", 1).instance_count == 2
