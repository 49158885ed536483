"""The receiver against dcmtk storescu/echoscu: durability, byte equality, rejections."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
import pytest
import yaml

from dicom_node.store.journal import Journal
from tests.peers import CT_J2K_SERIES, REPO, ManagedProcess, free_port, peer_env, wait_for, wait_for_port
from tests.peers import dcmtk
from tests.reliability.senders import raw_store
from tests.series_factory import write_ct_series

pytestmark = dcmtk.required()

NODE_AE = "DICOMNODE"


class Node:
    """`dicom-node serve` as a subprocess on a free loopback port, with its config and journal."""

    def __init__(self, root: Path, **overrides):
        self.root = root
        self.port = free_port()
        self.http_port = free_port()
        self.storage = root / "var"
        config = {
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": self.port, "storage_dir": "var",
                     "min_free_disk_mb": 1},
            "security": {"calling_aes": [{"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU", "host": "127.0.0.1"}]},
            "completion": {"stable_seconds": 3, "after_release_seconds": 1},
        }
        for section, values in overrides.items():
            config[section] = {**config.get(section, {}), **values}
        self.configured_journal_url = config["node"].get("journal_url")
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = root / "node.log"
        self.process: ManagedProcess | None = None

    def start(self) -> Node:
        self.process = ManagedProcess([REPO / ".venv" / "bin" / "dicom-node", "serve", "--config", self.config_path],
                                      log=self.log)
        wait_for_port(self.port, timeout=30, process=self.process.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def journal(self) -> Journal:
        return Journal(self.configured_journal_url or f"sqlite:///{self.storage / 'journal.sqlite'}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def logs(self, text: str, timeout: float = 10.0) -> bool:
        """Whether `text` is in the log within `timeout` s: a line follows the commit it reports, so a test
        that saw the journal change may read the log a moment before the line is written."""
        return bool(wait_for(lambda: text in self.log_text(), timeout, f"{text!r} in the node's log"))

    def spool_files(self) -> list[Path]:
        return sorted((self.storage / "spool").glob("*/*/*.dcm"))

    def wait_for_completion(self, series_instance_uid: str, generation: int | None = None, timeout: float = 15.0):
        """The series record once it left `receiving` (complete, or already routed/unmatched by the pipeline)."""
        journal = self.journal()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                record = journal.get_series(series_instance_uid, generation)
                if record is not None and record.completed_at is not None:
                    return record
                time.sleep(0.1)
            raise AssertionError(f"series {series_instance_uid} not complete after {timeout} s: "
                                 f"{journal.get_series(series_instance_uid, generation)}\n{self.log_text()}")
        finally:
            journal.close()


@contextmanager
def running_node(root: Path, **overrides) -> Iterator[Node]:
    node = Node(root, **overrides).start()
    try:
        yield node
    finally:
        node.stop()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta group (PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    assert data[132:138] == b"\x02\x00\x00\x00UL", f"{path}: meta group does not start with its length"
    (meta_length,) = struct.unpack("<I", data[140:144])
    return data[144 + meta_length:]


def spool_path(node: Node, sent: Path) -> Path:
    ds = pydicom.dcmread(sent, stop_before_pixels=True)
    return node.storage / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def assert_stored_as_sent(node: Node, sent_files: list[Path]) -> None:
    for sent in sent_files:
        stored = spool_path(node, sent)
        assert stored.exists(), f"{sent.name} not in the spool"
        assert dataset_bytes(stored) == dataset_bytes(sent), f"{sent.name}: dataset bytes differ"
        sent_ds, stored_ds = pydicom.dcmread(sent), pydicom.dcmread(stored)
        assert stored_ds == sent_ds  # every element, pixel data included
        assert stored_ds.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
        assert stored_ds.file_meta.MediaStorageSOPInstanceUID == sent_ds.SOPInstanceUID


def sendable_j2k_copies(out_dir: Path) -> list[Path]:
    """The shared J2K series with the UIDs its anonymisation emptied filled in.

    The shared files carry empty SOP Class/Instance, Study and Series UIDs in
    the dataset (only the file meta keeps the SOP ones): storescu cannot pick
    a presentation context for them, and the node rightly refuses empty UIDs.
    The pixel data stays the original JPEG 2000 codestream (pydicom writes
    encapsulated data as read).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    copies = []
    for path in sorted(CT_J2K_SERIES.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        copy = out_dir / path.name
        ds.save_as(copy, enforce_file_format=True)
        copies.append(copy)
    return copies


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("node")) as running:
        yield running


def test_echo_from_allowed_ae(node):
    result = dcmtk.echoscu(node.port)
    assert result.returncode == 0, result.output


def test_real_j2k_series_stored_as_sent_and_completed_on_release(node, tmp_path):
    files = sendable_j2k_copies(tmp_path / "j2k")
    released_at = time.monotonic()
    result = dcmtk.storescu(node.port, files, extra=["-xv"])
    assert result.returncode == 0, result.output
    assert len(result.acknowledged) == 20
    assert_stored_as_sent(node, files)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    record = node.wait_for_completion(series_uid, timeout=8)
    assert time.monotonic() - released_at < 8
    assert record.instance_count == 20 and record.generation == 1
    assert record.calling_ae == "STORESCU" and record.modality == "CT"
    journal = node.journal()
    rows = journal.series_instances(series_uid, 1)
    journal.close()
    assert {row.transfer_syntax for row in rows} == {"1.2.840.10008.1.2.4.90"}
    assert "association released calling_ae=STORESCU" in node.log_text()
    assert node.logs("series complete (release): study=")


def test_300_uncompressed_instances_stored_byte_for_byte(node, tmp_path):
    files = write_ct_series(tmp_path / "ct300", 300)
    result = dcmtk.storescu(node.port, files)
    assert result.returncode == 0, result.output
    assert len(result.acknowledged) == 300
    assert_stored_as_sent(node, files)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    record = node.wait_for_completion(series_uid, timeout=8)
    assert record.instance_count == 300
    assert "instances=300 bytes=" in node.log_text()



def test_concurrent_associations_of_one_series_each_stored_and_counted_once(node, tmp_path):
    """Four associations split one series while a fifth re-sends part of it at the same time: the node
    writes them side by side and commits their rows in shared batches; every instance is acknowledged,
    stored as sent and counted once, and a copy racing its first is a duplicate, not a second row."""
    files = write_ct_series(tmp_path / "ct60", 60, rows=128, columns=128)
    shares = [files[n::4] for n in range(4)] + [files[:10]]
    outputs = [tmp_path / f"storescu{n}.log" for n in range(len(shares))]
    senders = []
    for share, out in zip(shares, outputs):
        with open(out, "w") as log:
            senders.append(subprocess.Popen(dcmtk.storescu_args(node.port, share), env=peer_env(), stdout=log,
                                            stderr=subprocess.STDOUT))
    for sender, share, out in zip(senders, shares, outputs):
        result = dcmtk.StoreResult(sender.wait(timeout=120), out.read_text())
        assert result.returncode == 0 and len(result.acknowledged) == len(share), result.output
    assert_stored_as_sent(node, files)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    record = node.wait_for_completion(series_uid, timeout=15)
    assert record.instance_count == 60 and record.generation == 1
    journal = node.journal()
    try:
        assert len(journal.series_instances(series_uid, 1)) == 60
    finally:
        journal.close()
    assert len(list(spool_path(node, files[0]).parent.glob("*.dcm"))) == 60


def test_serve_on_a_postgresql_journal(tmp_path, postgres_server):
    """node.journal_url names a PostgreSQL database: the same receive, completion and restart reconciliation."""
    url = postgres_server.new_database()
    files = write_ct_series(tmp_path / "series", 5, rows=64, columns=64)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with running_node(tmp_path / "node", node={"journal_url": url}) as node:
        assert len(dcmtk.storescu(node.port, files).acknowledged) == 5
        assert node.wait_for_completion(series_uid).instance_count == 5
    journal = node.journal()
    try:
        stray = journal.series_instances(series_uid, 1)[0]
        Path(stray.path).unlink()  # a file removed behind the node's back while it was down
    finally:
        journal.close()
    (again,) = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == stray.sop_instance_uid]
    with running_node(tmp_path / "node", node={"journal_url": url}) as node:
        assert len(dcmtk.storescu(node.port, [again]).acknowledged) == 1  # the removed one, sent again
        assert node.wait_for_completion(series_uid, generation=2).instance_count == 5  # takes over generation 1
        journal = node.journal()
        try:
            assert journal.engine.dialect.name == "postgresql"
            assert len(journal.series_instances(series_uid, 2)) == 5
            assert journal.get_series(series_uid, 1).state == "superseded"
        finally:
            journal.close()
    assert f"reconcile: instance {stray.sop_instance_uid} of series {series_uid} has no file" in node.log_text()

def test_unknown_calling_ae_rejected_permanently(node):
    result = dcmtk.echoscu(node.port, calling_ae="INTRUDER")
    assert result.returncode != 0
    assert "Rejected Permanent" in result.output and "Calling AE Title Not Recognized" in result.output, result.output
    assert "calling AE 'INTRUDER' from 127.0.0.1 not recognized" in node.log_text()


def test_calling_ae_from_another_host_rejected(tmp_path):
    with running_node(tmp_path, security={"calling_aes": [{"ae_title": "ECHOSCU", "host": "10.9.9.9"}]}) as other:
        result = dcmtk.echoscu(other.port)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.output, result.output


def test_wrong_called_ae_rejected(node):
    result = dcmtk.echoscu(node.port, called_ae="SOMEONEELSE")
    assert result.returncode != 0
    assert "Rejected Permanent" in result.output and "Called AE Title Not Recognized" in result.output, result.output


@pytest.mark.parametrize(("attribute", "bad_uid"), [
    ("SeriesInstanceUID", "1.2.abc"), ("SeriesInstanceUID", "1.2.3/../x"), ("StudyInstanceUID", "1." + "2" * 70),
    ("SOPInstanceUID", "1.2.3/../x"), ("SOPInstanceUID", "1.2.abc"),
])
def test_invalid_uid_refused_without_a_file(node, tmp_path, attribute, bad_uid):
    (sent,) = write_ct_series(tmp_path / "bad", 1, rows=64, columns=64)
    ds = pydicom.dcmread(sent)
    setattr(ds, attribute, bad_uid)
    if attribute == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    ds.save_as(sent, enforce_file_format=True)
    result = dcmtk.storescu(node.port, [sent])
    assert result.acknowledged == []
    assert any("Error" in status or "Failed" in status for status in result.statuses()), result.output
    assert not list((node.storage / "spool").rglob("*x*"))
    assert f"{attribute} {bad_uid!r} is not a valid UID" in node.log_text()



def test_data_set_not_the_instance_the_request_names_is_refused(node, tmp_path):
    """A C-STORE whose command names another SOP Instance (or Class) UID than its data set gets 0xA900, as
    from dcmtk's storescp, and nothing is stored: the sender would otherwise believe it stored another instance."""
    files = write_ct_series(tmp_path / "mismatch", 3, rows=64, columns=64)
    named_instead = {files[0]: ("MediaStorageSOPInstanceUID", generate_uid()),
                     files[1]: ("MediaStorageSOPClassUID", MRImageStorage)}
    for path, (element, value) in named_instead.items():  # pynetdicom's request names what the file meta says
        ds = pydicom.dcmread(path)
        setattr(ds.file_meta, element, value)
        ds.save_as(path)
    deliveries = raw_store(node.port, files)
    assert [d.status for d in deliveries] == [0xA900, 0xA900, 0x0000], deliveries
    assert [p.name for p in spool_path(node, files[2]).parent.iterdir()] == [spool_path(node, files[2]).name]
    log = node.log_text()
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (f"C-STORE refused (0xA900) from STORESCU: the request's Affected SOP Instance UID "
            f"{named_instead[files[0]][1]!r} is not the data set's SOP Instance UID {first.SOPInstanceUID!r}") in log
    assert (f"the request's Affected SOP Class UID {MRImageStorage!r} is not the data set's SOP Class UID "
            f"{CTImageStorage!r}") in log

def test_duplicate_instance_acknowledged_stored_once(node, tmp_path):
    files = write_ct_series(tmp_path / "dup", 2, rows=64, columns=64)
    first = dcmtk.storescu(node.port, files)
    second = dcmtk.storescu(node.port, files[:1])
    assert first.returncode == 0 and second.returncode == 0, second.output
    assert len(second.acknowledged) == 1
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    journal = node.journal()
    series_records = [journal.get_series(ds.SeriesInstanceUID, g) for g in (1, 2)]
    journal.close()
    assert series_records[0].instance_count == 2
    assert series_records[1] is None  # not a late instance: nothing new was stored
    assert len(list(spool_path(node, files[0]).parent.iterdir())) == 2
    assert f"duplicate instance {ds.SOPInstanceUID}" in node.log_text()


def test_same_sop_instance_uid_under_another_series_keeps_the_first_copy(node, tmp_path):
    (original,) = write_ct_series(tmp_path / "first", 1, rows=64, columns=64)
    ds = pydicom.dcmread(original)
    ds.SeriesInstanceUID = generate_uid()
    clash = tmp_path / "clash.dcm"
    ds.save_as(clash)
    assert dcmtk.storescu(node.port, [original]).returncode == 0
    second = dcmtk.storescu(node.port, [clash])
    assert len(second.acknowledged) == 1, second.output
    journal = node.journal()
    try:
        assert journal.find_instance(ds.SOPInstanceUID).path == str(spool_path(node, original))
        assert journal.get_series(ds.SeriesInstanceUID) is None
    finally:
        journal.close()
    assert not (spool_path(node, original).parent.parent / ds.SeriesInstanceUID).exists() or \
        not any((spool_path(node, original).parent.parent / ds.SeriesInstanceUID).iterdir())
    # Other content (another Series Instance UID) under the same SOP Instance UID: kept in the quarantine.
    log = node.log_text()
    assert "conflicting duplicate acknowledged and quarantined" in log and ds.SOPInstanceUID in log
    quarantined = node.storage / "quarantine" / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(quarantined).SeriesInstanceUID == ds.SeriesInstanceUID


def test_disk_floor_refuses_with_out_of_resources(tmp_path):
    with running_node(tmp_path, node={"min_free_disk_mb": 1 << 40}) as full:
        files = write_ct_series(tmp_path / "floor", 1, rows=64, columns=64)
        result = dcmtk.storescu(full.port, files)
        spool = full.spool_files()
        log = full.log_text()
    assert result.acknowledged == []
    assert "Refused: OutOfResources" in result.output, result.output
    assert spool == []
    assert "C-STORE refused (0xA700)" in log and "floor is" in log
