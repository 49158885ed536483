"""The spool's two-step write (staged in the page cache, then settled: fsync, link, folder fsync) and what
the receiver does when the second step fails after the journal row is committed."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import Config
from dicom_node.metrics import NodeMetrics
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.receive.ingest import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Delivery, Ingest
from dicom_node.store.audit import AuditLog
from dicom_node.store.journal import Journal
from dicom_node.store.spool import TEMP_SUFFIX, InstanceKey, Spool, Staged, data_set_of
from tests.series_factory import write_ct_series

KEY = InstanceKey("1.2.3", "1.2.3.4", "1.2.3.4.5")


def temp_files(spool: Spool) -> list[Path]:
    return list(spool.root.glob(f"*/*/.*{TEMP_SUFFIX}"))


@pytest.fixture(params=["unnamed", "named"])
def spool(request, tmp_path) -> Spool:
    """Both kinds of temp file: unnamed (O_TMPFILE, where the file system has them, as here) and named (the
    fallback for one that has not, such as NFS)."""
    spool = Spool(tmp_path)
    assert spool.unnamed_temp_files, "this file system should take O_TMPFILE"
    spool.unnamed_temp_files = request.param == "unnamed"
    return spool


def test_a_staged_file_has_no_name_until_it_is_settled(spool):
    staged = spool.stage(KEY, (b"preamble", b" and data set"))
    assert staged is not None and not staged.final.exists()
    assert temp_files(spool) == ([] if spool.unnamed_temp_files else [staged.temp])
    assert spool.settle([staged]) == [staged.final] == [spool.path_for(KEY)]
    assert staged.final.read_bytes() == b"preamble and data set" and temp_files(spool) == []
    assert staged.final.stat().st_mode & 0o777 == 0o600  # patient data: the node's alone
    assert spool.stage(KEY, (b"a re-send",)) is None  # already stored: nothing written
    assert staged.final.read_bytes() == b"preamble and data set" and temp_files(spool) == []


def cached_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mincore(2) on a mapping that faults none in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        try:
            assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(page & 1 for page in pages)


def test_a_settled_file_leaves_the_page_cache_and_reads_back_whole(spool, tmp_path):
    """Once on disk, an instance's pages are dropped: the spool would otherwise grow the page cache by every
    byte received. The control, a file written and fsynced the plain way, shows its pages stay cached here."""
    if subprocess.run(["stat", "-f", "-c", "%T", tmp_path], capture_output=True, text=True).stdout.strip() == "tmpfs":
        pytest.skip("on tmpfs the cached pages are the files themselves")
    content = os.urandom(1 << 20)
    keys = [InstanceKey("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(1, 4)]
    assert spool.write(keys[0], (content[:100], content[100:])) == spool.path_for(keys[0])
    assert spool.settle([spool.stage(key, (content,)) for key in keys[1:]]) == [spool.path_for(k) for k in keys[1:]]
    control = tmp_path / "control"
    with control.open("wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    assert cached_pages(control) == len(content) // mmap.PAGESIZE
    assert [cached_pages(spool.path_for(key)) for key in keys] == [0, 0, 0]
    assert all(spool.path_for(key).read_bytes() == content for key in keys)


def test_of_two_copies_staged_at_once_the_first_settled_stays(spool):
    first, second = spool.stage(KEY, (b"first",)), spool.stage(KEY, (b"second",))
    assert spool.settle([first]) == [spool.path_for(KEY)]
    assert spool.settle([second]) == [None]
    assert spool.path_for(KEY).read_bytes() == b"first" and temp_files(spool) == []


def test_a_batch_settles_across_folders_and_each_file_has_its_own_outcome(spool):
    """Files of two series, one copy twice: each file is named or reported already there, in batch order."""
    keys = [InstanceKey("1.2.3", series, f"{series}.{n}") for series in ("1.2.3.4", "1.2.3.5") for n in (1, 2)]
    staged = [spool.stage(key, (key.sop_instance_uid.encode(),)) for key in keys]
    twice = spool.stage(keys[0], (b"second copy",))
    assert spool.settle([*staged[:2], twice, *staged[2:]]) == [spool.path_for(keys[0]), spool.path_for(keys[1]),
                                                                None, spool.path_for(keys[2]), spool.path_for(keys[3])]
    assert [spool.path_for(key).read_bytes() for key in keys] == [key.sop_instance_uid.encode() for key in keys]
    assert temp_files(spool) == [] and sorted(p.name for p in spool.instance_files()) == sorted(
        f"{key.sop_instance_uid}.dcm" for key in keys)


class FsyncMeeting(Spool):
    """A disk whose fsyncs of `expected` files each wait until all of them have started: they only get
    through when the spool fsyncs a batch's files at the same time."""

    expected = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.meeting = threading.Barrier(self.expected, timeout=10)
        self.failing: set[str] = set()

    def sync_content(self, staged: Staged) -> None:
        self.meeting.wait()
        if staged.final.name in self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().sync_content(staged)


def test_a_batchs_files_are_fsynced_at_the_same_time_and_one_failing_keeps_only_itself_out(tmp_path):
    """With a journal the file system then commits them together, where one fsync after another each
    waited for a commit or cache flush of its own."""
    spool = FsyncMeeting(tmp_path)
    assert spool.settle([]) == []
    keys = [InstanceKey("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(FsyncMeeting.expected)]
    spool.failing = {f"{keys[2].sop_instance_uid}.dcm"}  # fsynced on a helper thread, not the caller's
    outcomes = spool.settle([spool.stage(key, (key.sop_instance_uid.encode(),)) for key in keys])
    assert [outcome for n, outcome in enumerate(outcomes) if n != 2] == [spool.path_for(keys[n]) for n in (0, 1, 3)]
    assert isinstance(outcomes[2], OSError) and outcomes[2].errno == errno.EIO
    assert sorted(p.name for p in spool.instance_files()) == sorted(
        f"{keys[n].sop_instance_uid}.dcm" for n in (0, 1, 3))
    assert spool.path_for(keys[1]).read_bytes() == keys[1].sop_instance_uid.encode()


class FsyncFailing(Spool):
    """A disk that fails the fsync (EIO) while `failing`: no real part here can make fsync fail on demand."""

    failing = True

    def sync_content(self, staged: Staged) -> None:
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().sync_content(staged)


def test_a_file_that_cannot_be_made_durable_takes_its_row_back_and_is_refused(tmp_path):
    """The file's fsyncs run beside the journal commit: when they fail after the row is committed, the
    C-STORE is refused 0xA700, the row and its count are taken back, no file is left, and a re-send of the
    instance is then stored as new."""
    path = write_ct_series(tmp_path / "series", 2, rows=32, columns=32)[0]
    part10 = path.read_bytes()
    header = pydicom.dcmread(path, stop_before_pixels=True)
    config = Config.model_validate({"node": {"storage_dir": str(tmp_path / "var"), "min_free_disk_mb": 0}})
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    spool = FsyncFailing(tmp_path / "var")
    ingest = Ingest(config, spool, journal, CompletionTracker(journal, 3600, 1), NodeMetrics(), AuditLog(journal))
    try:
        delivery = Delivery("dimse", 1, "STORESCU", "DICOMNODE", "127.0.0.1", str(header.SOPClassUID),
                            str(header.SOPInstanceUID), str(header.file_meta.TransferSyntaxUID), data_set_of(part10))
        refused = ingest.store(delivery)
        assert refused.status == STATUS_OUT_OF_RESOURCES and "Input/output error" in refused.reason
        assert journal.find_instance(str(header.SOPInstanceUID)) is None
        assert journal.get_series(str(header.SeriesInstanceUID), 1) is None  # the generation it opened, gone too
        assert list(spool.instance_files()) == [] and temp_files(spool) == []
        spool.failing = False
        stored = ingest.store(delivery)
        assert (stored.status, stored.new) == (STATUS_SUCCESS, True)
        assert journal.get_series(str(header.SeriesInstanceUID), 1).instance_count == 1
        assert [p.name for p in spool.instance_files()] == [f"{header.SOPInstanceUID}.dcm"]
    finally:
        journal.close()
