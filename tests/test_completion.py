"""Series completion with real associations: release fast path across two associations, stable timeout,
late instances opening a new generation (issue 2)."""

from __future__ import annotations

import time

import pydicom

from tests.peers import dcmtk
from tests.series_factory import write_ct_series
from tests.test_receive import running_node

pytestmark = dcmtk.required()


def series_uid(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def test_two_associations_within_the_grace_make_one_generation(tmp_path):
    """The second association starts during the release grace: the series waits for it."""
    files = write_ct_series(tmp_path / "ct", 40, rows=128, columns=128)
    with running_node(tmp_path / "n", completion={"after_release_seconds": 2, "stable_seconds": 60}) as node:
        assert dcmtk.storescu(node.port, files[:20]).returncode == 0
        time.sleep(0.5)
        assert dcmtk.storescu(node.port, files[20:]).returncode == 0
        record = node.wait_for_completion(series_uid(files[0]), timeout=10)
    assert record.generation == 1 and record.instance_count == 40


def test_stable_timeout_completes_a_series_sent_over_two_associations(tmp_path):
    """With the fast path out of reach (long grace), the series completes stable_seconds after its last instance."""
    files = write_ct_series(tmp_path / "ct", 30, rows=128, columns=128)
    uid = series_uid(files[0])
    with running_node(tmp_path / "n", completion={"after_release_seconds": 120, "stable_seconds": 3}) as node:
        assert dcmtk.storescu(node.port, files[:15]).returncode == 0
        time.sleep(1.5)
        assert dcmtk.storescu(node.port, files[15:]).returncode == 0
        last_sent = time.monotonic()
        journal = node.journal()
        assert journal.get_series(uid).state == "receiving"
        journal.close()
        record = node.wait_for_completion(uid, timeout=15)
        waited = time.monotonic() - last_sent
        log = node.log_text()
    assert record.generation == 1 and record.instance_count == 30
    assert waited >= 2.0  # not before the stable timeout (3 s, checked every 0.75 s)
    assert "series complete (stable timeout)" in log and f"series={uid}" in log


def test_late_instances_open_a_new_generation(tmp_path):
    files = write_ct_series(tmp_path / "ct", 12, rows=64, columns=64)
    uid = series_uid(files[0])
    with running_node(tmp_path / "n", completion={"after_release_seconds": 0.5, "stable_seconds": 30}) as node:
        assert dcmtk.storescu(node.port, files[:10]).returncode == 0
        first = node.wait_for_completion(uid)
        assert dcmtk.storescu(node.port, files[10:]).returncode == 0
        second = node.wait_for_completion(uid, generation=2, timeout=10)
        journal = node.journal()
        first_again = journal.get_series(uid, 1)
        late = journal.series_instances(uid, 2)
        journal.close()
    assert first.instance_count == 10 and first_again.instance_count == 10 and first_again.completed_at == first.completed_at
    assert second.instance_count == 2
    assert {row.sop_instance_uid for row in late} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[10:]}
