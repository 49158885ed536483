"""Crash and restart: kill -9 mid-send, then every acknowledged instance is in spool and journal."""

from __future__ import annotations

import shutil
import subprocess
import time

import pydicom

from dicom_node.store.spool import Spool
from tests.peers import dcmtk, peer_env
from tests.series_factory import write_ct_series
from tests.test_api import samples
from tests.test_receive import Node, dataset_bytes, spool_path

pytestmark = dcmtk.required()


def test_kill_9_mid_send_loses_nothing_acknowledged(tmp_path):
    files = write_ct_series(tmp_path / "ct", 300)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    node = Node(tmp_path / "n", completion={"stable_seconds": 3, "after_release_seconds": 1}).start()
    out = tmp_path / "storescu.log"
    with open(out, "w") as log:
        sender = subprocess.Popen(dcmtk.storescu_args(node.port, files), env=peer_env(), stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(node.spool_files()) < 100:
            assert time.monotonic() < deadline and sender.poll() is None, "send finished before the crash"
            time.sleep(0.01)
        node.process.kill()
        sender.wait(timeout=60)
    finally:
        node.stop()
    acknowledged = dcmtk.StoreResult(sender.returncode, out.read_text()).acknowledged
    assert 50 <= len(acknowledged) < 300, "the crash must land mid-series"

    restarted = node.start()  # same config, storage and port
    try:
        record = restarted.wait_for_completion(uid, timeout=20)
        journal = restarted.journal()
        journaled = {row.sop_instance_uid for row in journal.series_instances(uid, 1)}
        journal.close()
        spooled = restarted.spool_files()
    finally:
        restarted.stop()
    for sent in acknowledged:
        sop = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        assert sop in journaled, f"acknowledged {sent.name} missing from the journal"
        assert dataset_bytes(spool_path(node, sent)) == dataset_bytes(sent)
    assert not list((node.storage / "spool").rglob("*.tmp"))
    assert len(spooled) == len(journaled) == record.instance_count >= len(acknowledged)


def test_restart_reconciles_spool_and_journal(tmp_path):
    files = write_ct_series(tmp_path / "ct", 4, rows=64, columns=64)
    node = Node(tmp_path / "n", completion={"stable_seconds": 2, "after_release_seconds": 30}).start()
    try:
        assert dcmtk.storescu(node.port, files[:3]).returncode == 0
    finally:
        node.stop()
    removed = spool_path(node, files[0])
    removed.unlink()  # row without file
    orphan = spool_path(node, files[3])
    shutil.copyfile(files[3], orphan)  # file without row (crash after rename, before commit)
    temp = removed.parent / f".{removed.stem}.abc123.tmp"
    temp.write_bytes(b"partial")  # a write that never reached its rename
    unreadable = removed.parent / "1.2.3.dcm"
    unreadable.write_bytes(b"not DICOM")  # a file no journal row can be made for
    node.start()
    try:
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        record = node.wait_for_completion(uid, timeout=15)
        journal = node.journal()
        sops = {row.sop_instance_uid for row in journal.series_instances(uid, 1)}
        journal.close()
        quarantined_metric = samples(node)[("dicom_node_quarantined_files", ())]
        log = node.log_text()
    finally:
        node.stop()
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[1:]}
    assert sops == expected and record.instance_count == 3
    assert not temp.exists()
    assert "reconcile: removed temp file" in log
    assert "has no file" in log and "row deleted" in log
    assert "journaled" in log and orphan.name in log
    (quarantined,) = Spool(node.storage).quarantined()
    assert quarantined_metric == 1
    assert quarantined.path.read_bytes() == b"not DICOM" and not unreadable.exists()
    assert quarantined.reason.startswith("reconcile could not journal it: ")
    assert f"reconcile: {unreadable} quarantined to {quarantined.path}" in log


def test_a_series_complete_but_not_routed_when_the_node_stopped_is_routed_at_start(tmp_path):
    """The node stopped between marking a series complete and routing it: the restart routes it."""
    files = write_ct_series(tmp_path / "ct", 3, rows=64, columns=64)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    node = Node(tmp_path / "n", completion={"stable_seconds": 600, "after_release_seconds": 600}).start()
    try:
        assert dcmtk.storescu(node.port, files).returncode == 0
    finally:
        node.stop()
    journal = node.journal()
    assert journal.complete_series(uid, 1) is not None  # what the node did just before it stopped
    journal.close()
    node.start()
    try:
        deadline = time.monotonic() + 15
        journal = node.journal()
        while journal.get_series(uid, 1).state == "complete":
            assert time.monotonic() < deadline, node.log_text()
            time.sleep(0.1)
        record = journal.get_series(uid, 1)
        journal.close()
    finally:
        node.stop()
    assert record.state == "unmatched" and record.reason == "no pipelines configured"
    assert f"series {uid} generation 1 has been complete since" in node.log_text()

def test_kill_9_during_concurrent_associations_answered_only_what_is_journaled(tmp_path):
    """Four associations store one series at once, so their journal rows are committed in shared batches;
    kill -9 mid-send. Before any restart repairs anything, every instance a sender was answered success
    for has its journal row and its file as sent: no answer goes out before its batch is committed."""
    files = write_ct_series(tmp_path / "ct", 240)
    node = Node(tmp_path / "n").start()
    senders, outputs = [], [tmp_path / f"storescu{n}.log" for n in range(4)]
    for n, out in enumerate(outputs):
        with open(out, "w") as log:
            senders.append(subprocess.Popen(dcmtk.storescu_args(node.port, files[n::4]), env=peer_env(), stdout=log,
                                            stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while len(node.spool_files()) < 80:
            assert time.monotonic() < deadline and all(s.poll() is None for s in senders), "sent before the crash"
            time.sleep(0.01)
        node.process.kill()
        for sender in senders:
            sender.wait(timeout=60)
    finally:
        node.stop()
    acknowledged = [sent for sender, out in zip(senders, outputs)
                    for sent in dcmtk.StoreResult(sender.returncode, out.read_text()).acknowledged]
    assert 40 <= len(acknowledged) < 240, "the crash must land mid-series"
    journal = node.journal()
    try:
        journaled = {row.sop_instance_uid: row for row in journal.all_instances()}
    finally:
        journal.close()
    for sent in acknowledged:
        sop = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        assert sop in journaled, f"{sent.name} was answered success but is not in the journal"
        assert dataset_bytes(spool_path(node, sent)) == dataset_bytes(sent)
