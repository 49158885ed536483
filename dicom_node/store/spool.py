"""Durable instance files: `<storage>/spool/<study>/<series>/<sop>.dcm`, built only from validated UIDs.

A UID is digits separated by single dots, at most 64 characters (PS3.5 9.1);
anything else is refused, so no attribute value can reach the file system as
a path component (no `..`, no `/`, no empty component).

A write is durable before it returns: the bytes go to a temp file in the
target folder, the file is fsynced (its pages then leave the page cache,
`_release_cached_pages`), hard-linked to the final name (atomic on POSIX, and
it never replaces a file already there) and the folder is fsynced so the new
name survives a power cut. The temp file has no name at all
(O_TMPFILE) where the file system allows it, so a crash leaves nothing behind;
elsewhere (NFS) it is named `.<sop>.<random>.tmp`, or `.<sop>.<writer>.<random>.tmp`
when nodes share the spool, recognisable for clean-up after a crash. The storage dir must be on a file system with
hard links (ext4, XFS, btrfs, NFS all have them). `write` does all of it
for one file; `stage` (into the page cache) and `settle` (the fsyncs and the
links) are its two halves, for the receiver (dicom_node.receive.durable),
which settles the files of every instance received at the same time in one
pass, their contents fsynced side by side and each folder fsynced once for
all of its new names, beside the journal commit of their rows.

Staging holds no lock another association's instance would wait for: a
series' instances arriving over several associations are written side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: 16 characters, no backslash or control
TEMP_SUFFIX = ".tmp"
REASON_SUFFIX = ".reason.txt"
LOCK_STRIPES = 64
FSYNC_THREADS = 8  # files of one pass fsynced at once beside the caller's own; more wait for a thread


class InvalidUID(ValueError):
    """A UID that cannot name a spool path (PS3.5 9.1: digits and dots, <= 64 characters)."""

    def __init__(self, attribute: str, value: object):
        self.attribute = attribute
        self.value = value
        super().__init__(f"{attribute} {value!r} is not a valid UID (PS3.5 9.1: digits and dots, <= 64 chars)")


def validate_uid(attribute: str, value: object) -> str:
    text = str(value) if value is not None else ""
    if len(text) > 64 or not _UID.match(text):
        raise InvalidUID(attribute, value)
    return text


@dataclass(frozen=True)
class InstanceKey:
    """The three UIDs that place an instance in the spool, validated."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, study: object, series: object, sop: object) -> InstanceKey:
        return cls(validate_uid("StudyInstanceUID", study), validate_uid("SeriesInstanceUID", series),
                   validate_uid("SOPInstanceUID", sop))


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian (PS3.10 7.1), padded to even length."""
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ascii(text: str) -> bytes:
    return text.encode("ascii", errors="replace")


def data_set_of(part10: bytes) -> bytes:
    """The data set of a Part 10 file the node wrote, without preamble and File Meta Information: what was
    received, for comparison with a re-sent copy. Reads the meta group's length ((0002,0000), PS3.10 7.1)."""
    if part10[128:132] != b"DICM" or part10[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ValueError("not a Part 10 file starting with a File Meta Information group length")
    return part10[144 + struct.unpack_from("<I", part10, 140)[0]:]


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, implementation_class_uid: str,
                  implementation_version_name: str, source_ae: str, sending_ae: str | None) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) for a data set received over the network.

    Written by hand because pydicom's meta writer costs ~0.7 ms, a third of an
    instance's budget at line rate; tests check it reads back with pydicom.
    (0002,0016) is this node, (0002,0017) the AE that sent it to us; a calling
    AE title that is not a valid AE value (PS3.5 6.2) is left out.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _meta_element(0x0002, b"UI", _ascii(sop_class_uid), b"\x00"),
        _meta_element(0x0003, b"UI", _ascii(sop_instance_uid), b"\x00"),
        _meta_element(0x0010, b"UI", _ascii(transfer_syntax), b"\x00"),
        _meta_element(0x0012, b"UI", _ascii(implementation_class_uid), b"\x00"),
        _meta_element(0x0013, b"SH", _ascii(implementation_version_name), b" "),
        _meta_element(0x0016, b"AE", _ascii(source_ae), b" "),
    ]
    if sending_ae and _AE_TITLE.match(sending_ae):
        elements.append(_meta_element(0x0017, b"AE", sending_ae.encode("ascii"), b" "))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


@dataclass(frozen=True)
class Staged:
    """An instance's bytes in a temp file beside its final name, written but not yet durable (`Spool.settle`
    fsyncs and names it, and closes `fd`). `temp` is None for a file without a name (O_TMPFILE)."""

    fd: int
    temp: Path | None
    final: Path
    new_folder: bool  # its series folder was created for it


@dataclass(frozen=True)
class QuarantinedFile:
    """A file restart reconciliation moved to `<storage>/quarantine`; its note says why."""
    path: Path
    quarantined_at: datetime

    @property
    def reason(self) -> str:
        return _reason_note(self.path).read_text().strip()


def _reason_note(path: Path) -> Path:
    return path.with_name(path.name + REASON_SUFFIX)


class SharedLock:
    """Held shared by any number of threads or exclusively by one. A thread waiting for it exclusively
    keeps new shared holders out, so a series that keeps arriving does not starve its purge."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._exclusive or self._exclusive_waiting:
                self._changed.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._changed:
                self._shared -= 1
                if not self._shared:
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._exclusive_waiting += 1
            while self._exclusive or self._shared:
                self._changed.wait()
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()


def _discard(staged: Staged) -> None:
    """Close a staged file and remove its temp name (the file lives on under its final name if linked)."""
    try:
        os.close(staged.fd)
    finally:
        if staged.temp is not None:
            staged.temp.unlink(missing_ok=True)


def _unnamed_files_work(root: Path) -> bool:
    """Whether files without a name (O_TMPFILE) can be created in `root` and linked to a name later
    through /proc: Linux 3.11+ on ext4, XFS, btrfs, tmpfs; not NFS or a container without /proc."""
    probe = f".probe.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
    folder_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(root, os.O_WRONLY | os.O_TMPFILE, 0o600)
    except (OSError, AttributeError):  # AttributeError: a platform without O_TMPFILE
        os.close(folder_fd)
        return False
    try:
        _link_unnamed(fd, probe, folder_fd)
        os.unlink(probe, dir_fd=folder_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(folder_fd)


def _link_unnamed(fd: int, name: str, folder_fd: int) -> None:
    """Give the unnamed file open as `fd` the name `name` in the folder open as `folder_fd` (linkat through
    /proc with AT_SYMLINK_FOLLOW, which needs no privilege, unlike AT_EMPTY_PATH)."""
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd, follow_symlinks=True)


def _dont_need(fd: int) -> None:
    """POSIX_FADV_DONTNEED on a whole file: on Linux it starts the writeback of the file's dirty pages without
    waiting for it and drops its clean ones. Only a hint: a platform without the call, or a file system that
    takes no advice, ignores it, and the fsync decides what is on disk either way."""
    if not hasattr(os, "posix_fadvise"):  # not on every platform
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _start_writeback(batch: Sequence[Staged]) -> None:
    """Start writing every staged file to the disk at once, before their fsyncs: when those ran one after
    the other, they then waited for writes already under way together, not for each in turn (a pass of
    4-5 files settled in 5-6 ms instead of 8-11 ms, docs/performance.md); they now run side by side
    (`Spool._sync_contents`), timed with this kept. Every page of a file just written is dirty, so none
    is dropped here."""
    for staged in batch:
        _dont_need(staged.fd)


def _release_cached_pages(fd: int) -> None:
    """Drop a file's pages from the page cache once the fsync has put them on disk (they are clean then). The
    spool is written once and read once, by the job, seconds to minutes later. Kept cached, it would grow
    the page cache by every byte received, each new page taken from free memory; on a VM that gives its
    free memory back to the host, such a page can cost far more than one just dropped and taken again (on
    the 2-core VM of docs/performance.md, 2.0-3.1 ms of system CPU per 0.5 MB file at such times, against
    0.2-0.3 ms while each file's pages were dropped and used again). The job then reads the files from the
    disk: for 300 slices there, within the run-to-run spread of its load."""
    _dont_need(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_file_writer(path: Path) -> str | None:
    """The writer tag of a temp file `.<sop>.<writer>.<random>.tmp`, None for one without (a writer tag
    starts with a letter, a SOP Instance UID component never does)."""
    parts = path.name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)
    return parts[1] if len(parts) == 3 and parts[1][:1].isalpha() else None


class Spool:
    """The spool and quarantine folders under the storage dir."""

    def __init__(self, storage_dir: Path, writer_tag: str = ""):
        """`writer_tag` names this process's temp files when several nodes share the spool
        (dicom_node.store.cluster), so only those of a node that died are cleaned up."""
        self.storage_dir = Path(storage_dir)
        self.writer_tag = writer_tag
        self.root = self.storage_dir / "spool"
        self.quarantine_root = self.storage_dir / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_root.mkdir(parents=True, exist_ok=True)
        self._series_locks = tuple(SharedLock() for _ in range(LOCK_STRIPES))
        self._instance_locks = tuple(threading.Lock() for _ in range(LOCK_STRIPES))
        self.unnamed_temp_files = _unnamed_files_work(self.root)
        self._fsyncs = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="spool-fsync")

    @contextmanager
    def receiving(self, key: InstanceKey) -> Iterator[None]:
        """Held by the receiver from writing an instance until its journal row (or its duplicate note) is
        committed. Its series is held shared: instances of one series arriving over several associations
        are written side by side, while a purge of the series (`purging`) waits for them, so a re-sent
        instance is either a duplicate of a series that stays, or stored anew after the purge, never
        acknowledged and then deleted. The instance is held exclusively: a second copy arriving at the same
        time waits until the first is journaled, so it is never acknowledged as a duplicate of a first copy
        whose journaling then fails. Both are striped (one of LOCK_STRIPES locks by UID hash)."""
        with self._series_locks[hash(key.series_instance_uid) % LOCK_STRIPES].shared(), \
                self._instance_locks[hash(key.sop_instance_uid) % LOCK_STRIPES]:
            yield

    def purging(self, series_instance_uid: str):
        """Held by retention while it deletes a series: no instance of it is being received meanwhile."""
        return self._series_locks[hash(series_instance_uid) % LOCK_STRIPES].exclusive()

    def path_for(self, key: InstanceKey) -> Path:
        return self.root / key.study_instance_uid / key.series_instance_uid / f"{key.sop_instance_uid}.dcm"

    def write(self, key: InstanceKey, chunks: tuple[bytes | memoryview, ...]) -> Path | None:
        """Write `chunks` durably to the instance's path (`stage`, then `settle`); returns it, or None
        when a file is already there. Raises OSError on any failure."""
        staged = self.stage(key, chunks)
        if staged is None:
            return None
        outcome = self.settle([staged])[0]
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def stage(self, key: InstanceKey, chunks: tuple[bytes | memoryview, ...]) -> Staged | None:
        """Write `chunks` to a temp file beside the instance's path, not yet fsynced: the page-cache half of
        a write, for a caller that runs `settle` (the disk waits) beside other work. None when the instance's
        file is already there (a re-send). Raises OSError (the temp file removed)."""
        final = self.path_for(key)
        if final.exists():
            return None
        folder = final.parent
        created = False
        while True:
            try:
                fd, temp = self._temp_file(folder, key)
                break
            except FileNotFoundError:  # the series' first instance
                if created:
                    raise
                folder.mkdir(parents=True, exist_ok=True)
                created = True
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            if temp is not None:
                os.unlink(temp)
            raise
        return Staged(fd, temp, final, created)

    def _temp_file(self, folder: Path, key: InstanceKey) -> tuple[int, Path | None]:
        """A file open for writing in `folder`: without a name where the file system has them (a crash
        leaves nothing behind, and no name is created and removed per instance), else a named temp file."""
        if self.unnamed_temp_files:
            return os.open(folder, os.O_WRONLY | os.O_TMPFILE, 0o600), None  # mkstemp's mode: the node's alone
        writer = f"{self.writer_tag}." if self.writer_tag else ""
        fd, temp = tempfile.mkstemp(prefix=f".{key.sop_instance_uid}.{writer}", suffix=TEMP_SUFFIX, dir=folder)
        return fd, Path(temp)

    def settle(self, batch: Sequence[Staged]) -> list[Path | None | OSError]:
        """Make staged files durable under their final names, together; for each, its path, None when a
        file was already there, or the OSError that kept it out (the others are still stored).

        Every file is fsynced (all at once, `_sync_contents`), then hard-linked to its name (atomic, and it
        never replaces a file already there: the first copy stays, even when two writers deliver the same
        instance at once), so a name never shows a torn file. Then each folder that got a name is fsynced
        once for all of them, so the names survive a power cut (and the study and spool folders when the
        series folder is new). A folder whose fsync fails loses the names linked into it here: none of them
        is reported stored."""
        outcomes: list[Path | None | OSError] = [None] * len(batch)
        synced = self._sync_contents(batch)
        by_folder: dict[Path, list[int]] = {}
        for index, staged in enumerate(batch):
            by_folder.setdefault(staged.final.parent, []).append(index)
        for folder, indexes in by_folder.items():
            try:
                folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as error:
                for index in indexes:
                    _discard(batch[index])
                    outcomes[index] = error
                continue
            try:
                for index in indexes:
                    outcomes[index] = self._name(batch[index], folder_fd, synced[index])
                linked = [index for index in indexes if isinstance(outcomes[index], Path)]
                if not linked:
                    continue
                try:
                    os.fsync(folder_fd)
                    if any(batch[index].new_folder for index in indexes):
                        _fsync_dir(folder.parent)
                        _fsync_dir(folder.parent.parent)
                except OSError as error:
                    for index in linked:
                        batch[index].final.unlink(missing_ok=True)
                        outcomes[index] = error
            finally:
                os.close(folder_fd)
        return outcomes

    def _sync_contents(self, batch: Sequence[Staged]) -> list[OSError | None]:
        """fsync every staged file's content, side by side: the caller's thread takes the first file, threads
        of a pool the others; for each file, the OSError its fsync raised, or None.

        With the disk's work for a pass's files in flight together, a file system with a journal commits
        them in one transaction, where one fsync after another each waited for a commit or a cache flush
        of its own (on a journalled ext4 at 4 associations, 515 against 480 instances/s, ahead in 8 of 8
        interleaved rounds; on ext4 without a journal within the spread: docs/performance.md)."""
        if not batch:
            return []
        if len(batch) > 1:
            _start_writeback(batch)
        others = [self._fsyncs.submit(self._synced, staged) for staged in batch[1:]]
        try:
            first = self._synced(batch[0])
        finally:
            wait(others)  # no file is named or closed while a thread may still be fsyncing it
        return [first, *(future.result() for future in others)]

    def _synced(self, staged: Staged) -> OSError | None:
        try:
            self.sync_content(staged)
        except OSError as error:
            return error
        return None

    def _name(self, staged: Staged, folder_fd: int, sync_error: OSError | None) -> Path | None | OSError:
        """Link a staged file whose content is fsynced to its name in its folder, open as `folder_fd`, and
        close it; a file whose fsync failed (`sync_error`) is only closed."""
        try:
            try:
                if sync_error is not None:
                    raise sync_error
                _release_cached_pages(staged.fd)
                if staged.temp is None:
                    _link_unnamed(staged.fd, staged.final.name, folder_fd)
                else:
                    os.link(staged.temp.name, staged.final.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            finally:
                _discard(staged)
        except FileExistsError:
            return None
        except OSError as error:
            return error
        return staged.final

    def sync_content(self, staged: Staged) -> None:
        """fsync a staged file's content."""
        os.fsync(staged.fd)

    def remove_empty_folders(self, key: InstanceKey) -> None:
        """The series folder of `key`, then its study folder, if nothing is left in them."""
        series_folder = self.path_for(key).parent
        for folder in (series_folder, series_folder.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty (another generation, another series of the study) or already gone
                return

    def instance_files(self) -> Iterator[Path]:
        """Every completed instance file (`*.dcm`, temp files excluded)."""
        yield from self.root.glob("*/*/*.dcm")

    def remove_temp_files(self, live_writers: frozenset[str] | None = None) -> list[Path]:
        """Delete temp files a crash left behind; returns what was removed. With `live_writers`, the
        spool is shared: the temp files of those writers (nodes alive now, writing) are spared."""
        removed = [p for p in self.root.glob(f"*/*/.*{TEMP_SUFFIX}")
                   if live_writers is None or temp_file_writer(p) not in live_writers]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a file that cannot be journaled out of the spool, with a note saying why. A file already
        quarantined under the same name (the same SOP Instance UID found twice) is never replaced: the
        newcomer gets a numbered name."""
        target = self._quarantine_target(path.name)
        shutil.move(str(path), target)
        _reason_note(target).write_text(reason + "\n")
        return target

    def keep_in_quarantine(self, name: str, chunks: tuple[bytes | memoryview, ...], reason: str) -> Path:
        """Write received bytes the spool must not hold (another payload under a stored SOP Instance UID)
        durably into the quarantine, note first; raises OSError on any failure."""
        target = self._quarantine_target(name)
        note = _reason_note(target)
        note.write_text(reason + "\n")
        try:
            with open(target, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.quarantine_root)
        except OSError:
            target.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
            raise
        return target

    def _quarantine_target(self, name: str) -> Path:
        target = self.quarantine_root / name
        number = 1
        while target.exists() or _reason_note(target).exists():
            number += 1
            target = self.quarantine_root / f"{Path(name).stem}.{number}{Path(name).suffix}"
        return target

    def quarantined(self) -> list[QuarantinedFile]:
        """The files `quarantine` moved here (their notes are read only when asked for the reason)."""
        found = []
        for note in self.quarantine_root.glob(f"*{REASON_SUFFIX}"):
            try:
                moved = note.stat().st_mtime
            except FileNotFoundError:  # removed meanwhile
                continue
            found.append(QuarantinedFile(note.with_name(note.name.removesuffix(REASON_SUFFIX)),
                                         datetime.fromtimestamp(moved, timezone.utc)))
        return found

    def remove_quarantined(self, item: QuarantinedFile) -> int:
        """Delete a quarantined file and its note (the note last, so an interrupted removal is seen
        again); returns the bytes freed."""
        try:
            size = item.path.stat().st_size
        except FileNotFoundError:
            size = 0
        item.path.unlink(missing_ok=True)
        _reason_note(item.path).unlink(missing_ok=True)
        return size

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
