"""Disk full: the node's storage on a small tmpfs fills mid-series; the node answers 0xA700
(Refused: Out of Resources), keeps every instance it acknowledged, and takes the rest once space returns.

Mounting needs CAP_SYS_ADMIN (root in a container); without it the test is skipped, and the disk-floor
test in tests/test_receive.py still covers 0xA700.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.peers import dcmtk
from tests.reliability.node import with_journal
from tests.reliability.senders import storescu_store
from tests.reliability.summary import CaseResult
from tests.series_factory import write_ct_series
from tests.test_receive import Node
from tests.tmpfs import resize, small_tmpfs

pytestmark = dcmtk.required()

SMALL_MB = 3  # about 250 instances of 64 x 64 with the journal: a 400-instance series cannot fit
INSTANCES = 400


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", SMALL_MB) as disk:
        yield disk


def test_disk_full_mid_series_refuses_keeps_and_recovers(small_disk, tmp_path, ledger):
    files = write_ct_series(tmp_path / "ct", INSTANCES, rows=64, columns=64)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    node = Node(tmp_path / "node", node={"storage_dir": str(small_disk), "min_free_disk_mb": 0},
                completion={"stable_seconds": 30, "after_release_seconds": 2})
    node.storage = small_disk
    node.start()
    try:
        first = storescu_store(node.port, files)
        acknowledged = [d.path for d in first if d.acknowledged]
        refused = [d for d in first if not d.acknowledged]
        kept = with_journal(node, lambda journal: {r.sop_instance_uid: r for r in journal.series_instances(uid, 1)})
        alive_when_full = node.process.alive()

        resize(small_disk, 64)  # space returns
        second = storescu_store(node.port, [d.path for d in refused])
        record = node.wait_for_completion(uid, timeout=60)
        final = with_journal(node, lambda journal: journal.series_instances(uid, record.generation))
        log = node.log_text()
    finally:
        node.stop()

    sop = {path: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    lost = [path for path in acknowledged if sop[path] not in kept or not Path(kept[sop[path]].path).exists()]
    statuses = {d.detail for d in refused}
    recovered = all(d.acknowledged for d in second)
    ok = bool(acknowledged) and bool(refused) and statuses == {"Refused: OutOfResources"} and alive_when_full \
        and recovered and record.instance_count == len(final) == INSTANCES and not lost
    ledger.record(CaseResult("disk full", f"{SMALL_MB} MB tmpfs, {INSTANCES}-instance series",
                             "0xA700 when full, acknowledged kept, rest taken when space returns",
                             f"{len(acknowledged)} stored, {len(refused)} refused {sorted(statuses)}, resent "
                             f"{sum(d.acknowledged for d in second)}, series {record.instance_count}", ok, len(lost)))
    assert acknowledged and refused, "the disk must fill mid-series"
    assert statuses == {"Refused: OutOfResources"}, statuses
    assert alive_when_full and lost == []
    assert recovered, [d.detail for d in second if not d.acknowledged]
    assert record.instance_count == len(final) == INSTANCES and record.generation == 1
    assert "C-STORE refused (0xA700)" in log
