"""Bad input corpus: every hostile series is refused or quarantined with a reason, odd but valid
data goes through, nothing acknowledged is lost, and a good sender in parallel is served throughout."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicom_node.store.spool import validate_uid
from tests.peers import dcmtk, free_port, wait_for
from tests.reliability.corpus import CASES, Case, write_case
from tests.reliability.node import node_with_pipeline, settled, with_journal
from tests.reliability.senders import SUCCESS, Delivery, raw_store, storescu_store
from tests.reliability.summary import CaseResult
from tests.series_factory import write_ct_series

pytestmark = dcmtk.required()

GOOD_SERIES = 4


@dataclass(frozen=True)
class Outcome:
    case: Case
    deliveries: list[Delivery]
    state: str  # refused | quarantined | unmatched | processed | job failed | ...
    reason: str
    lost: int


def _journaled(journal, deliveries: list[Delivery]) -> dict[str, object]:
    """Acknowledged instances by SOP Instance UID -> journal row (None when missing: lost)."""
    rows = {}
    for delivery in deliveries:
        if delivery.acknowledged:
            sop = str(pydicom.dcmread(delivery.path, force=True, stop_before_pixels=True).get("SOPInstanceUID", ""))
            rows[sop] = journal.find_instance(sop)
    return rows


def _run_case(node, case: Case, out_dir: Path) -> Outcome:
    files = write_case(case, out_dir)
    deliveries = (raw_store if case.raw else storescu_store)(node.port, files)
    rows = with_journal(node, lambda journal: _journaled(journal, deliveries))
    lost = sum(1 for row in rows.values() if row is None or not Path(row.path).exists())
    present = [row for row in rows.values() if row is not None]
    if not present:
        details = "; ".join(sorted({d.detail for d in deliveries}))
        return Outcome(case, deliveries, "refused", details, lost)
    series_uids = {row.series_instance_uid for row in present}
    states = []
    for uid in sorted(series_uids):
        record, jobs = wait_for(lambda: settled(node, uid), 120, f"{case.name}: series {uid} settled")
        if any(j.state == "failed" for j in jobs):  # the pipeline marks the job failed, then quarantines
            time.sleep(2)
            record, jobs = settled(node, uid)
        if record.state == "routed":
            failed = [j.error for j in jobs if j.state == "failed"]
            states.append(("job failed", failed[0]) if failed else ("processed", record.reason or ""))
        else:
            states.append((record.state, record.reason or ""))
    state = "+".join(sorted({s for s, _ in states}))
    if any(not d.acknowledged for d in deliveries):
        state = f"partly refused+{state}"
    return Outcome(case, deliveries, state, " | ".join(r for _, r in states), lost)


def _good_sender(port: int, root: Path, stop: threading.Event, sent: list) -> None:
    """A well-behaved modality sending whole series while the corpus runs."""
    for index in range(GOOD_SERIES):
        if stop.is_set() and index >= 1:
            break
        files = write_ct_series(root / f"good{index}", 20, rows=64, columns=64)
        sent.append((files, storescu_store(port, files)))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    pacs_port = free_port()
    with dcmtk.storescp(pacs_port, root / "pacs") as pacs:
        node = node_with_pipeline(root / "node", pacs_port).start()
        try:
            stop, good = threading.Event(), []
            sender = threading.Thread(target=_good_sender, args=(node.port, root, stop, good))
            sender.start()
            with ThreadPoolExecutor(max_workers=3) as pool:
                outcomes = list(pool.map(lambda item: _run_case(node, item[1], root / f"case{item[0]:02d}"),
                                         enumerate(CASES)))
            stop.set()
            sender.join(timeout=600)
            good_series = [pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID for files, _ in good]
            good_settled = [wait_for(lambda uid=uid: settled(node, uid), 120, f"good series {uid}")
                            for uid in good_series]
            yield {o.case.name: o for o in outcomes}, good, good_settled, node, pacs
        finally:
            node.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_or_quarantined_with_a_reason(corpus_run, case, ledger):
    outcomes, _, _, node, _ = corpus_run
    outcome = outcomes[case.name]
    final = outcome.state.removeprefix("partly refused+") if "quarantined" in case.expected else outcome.state
    correct = final in case.expected and outcome.lost == 0
    if final in ("quarantined", "unmatched"):
        correct &= bool(outcome.reason)
    ledger.record(CaseResult("bad input", case.name, "|".join(sorted(case.expected)),
                             f"{outcome.state}: {outcome.reason}"[:200], correct, outcome.lost))
    assert outcome.lost == 0, f"{case.name}: {outcome.lost} acknowledged instance(s) lost"
    assert final in case.expected, f"{case.name}: expected {sorted(case.expected)}, got {outcome.state}: " \
                                   f"{outcome.reason}\n{[d.detail for d in outcome.deliveries]}"
    if final in ("quarantined", "unmatched"):
        assert outcome.reason, f"{case.name}: {final} without a reason"


def test_refusals_and_quarantines_are_in_the_log(corpus_run):
    """An admin reading the log finds each refusal's status and each quarantine's reason."""
    outcomes, _, _, node, _ = corpus_run
    log = node.log_text()
    for outcome in outcomes.values():
        for delivery in outcome.deliveries:
            if delivery.status not in (None, SUCCESS):
                assert f"C-STORE refused (0x{delivery.status:04X})" in log, outcome.case.name
        if outcome.state.endswith("quarantined"):
            for reason in outcome.reason.split(" | "):
                assert reason.removeprefix("summary failed: ")[:100] in log, f"{outcome.case.name}: {reason}"


def test_no_spool_path_outside_valid_uids(corpus_run):
    """Path-traversal UIDs never reached the file system: every spool component is a valid UID."""
    *_, node, _ = corpus_run
    for path in (node.storage / "spool").rglob("*"):
        relative = path.relative_to(node.storage / "spool")
        for part in relative.parts:
            validate_uid("spool component", re.sub(r"\.dcm$", "", part))
        assert path.resolve().is_relative_to((node.storage / "spool").resolve())


def test_good_sender_in_parallel_is_served(corpus_run, ledger):
    _, good, good_settled, node, pacs = corpus_run
    acknowledged = sum(d.acknowledged for _, deliveries in good for d in deliveries)
    total = sum(len(files) for files, _ in good)
    processed = [record for record, jobs in good_settled
                 if record.state == "routed" and jobs and all(j.state == "done" for j in jobs)]
    ledger.record(CaseResult("bad input", "good sender in parallel", "all stored and processed",
                             f"{acknowledged}/{total} acknowledged, {len(processed)}/{len(good)} processed",
                             acknowledged == total and len(processed) == len(good)))
    assert acknowledged == total
    assert len(processed) == len(good), good_settled
    assert pacs.alive() and node.process.alive()
