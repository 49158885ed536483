"""Decode while receiving: a series' pixels are decoded as its instances arrive, so its job starts with them.

Decoding is most of a compressed series' load (the real 20-slice JPEG 2000
series of docs/performance.md: 0.65-0.69 s from the spool, 0.11-0.12 s with
its pixels decoded ahead), and it used to start only once the series was
complete and its job had begun. Now `Ingest` tells the `Preparer` of every
new instance once it is stored and journaled. The preparer queues the file of
an instance whose pixels need decoding (`worth_preparing`: compressed, or a
deflated data set) for one decoder child process, never waiting, so no
C-STORE response waits for a decode. The decoder writes the
instance's decoded frames, exactly as the loader's decoder gives them, to
`<storage_dir>/prepared` as a .npy file, and the job's loader
(`dicom_node.pipeline.volume.load_series`) memory-maps it instead of
decoding the file again.

Nothing is trusted blindly: a prepared file is named after the instance
file's path, inode, size and modification time, so the loader uses it only
for the very file it came from (a re-stored or replaced instance has a new
inode, an instance added to the series has none and is decoded from the
spool), and only when its frame count, rows and columns are the header's.
The loader still reads every header and runs every check
(`dicom_node.pipeline.checks`) on the instance set the journal gives the
job; only the pixel decode is taken from here.

Bounded: the decoder keeps at most `inference.prepare.max_mb` of decoded
pixels and `inference.prepare.max_series` series, evicting the series it
touched least recently; an instance that would not fit even then is not
prepared, and the job decodes it from the spool as before. Each node's
decoder has its own folder under `prepared` (named by its spool tag when
nodes share `storage_dir`, dicom_node.store.cluster), which it empties when
the node starts, with those of nodes no longer alive; a job reads the
prepared pixels of any node's folder, so a series received by one node and
run by another still starts with them. The decoder runs in its own process, so it
never holds the receiving threads' interpreter lock, at a lower CPU priority
(nice +5: the receiving threads and the jobs come first when the cores are
short; +10 left it almost no CPU beside other busy processes of a shared
host, 7 of 20 slices ready at completion). A job that starts before the
decoder is done decodes what is left itself, from the other end; a full
queue or a dead decoder only means the job decodes from the spool.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import queue
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node import logs, sop_classes

log = logging.getLogger(__name__)

_CONTEXT = multiprocessing.get_context("spawn")
QUEUE_LIMIT = 100_000  # instance notifications waiting for the decoder; beyond it they are dropped
STOP_TIMEOUT_S = 10
LOCAL_WRITER = "local"  # the decoder's folder on a node that shares its storage_dir with none


@dataclass(frozen=True)
class PreparedStore:
    """The folders of decoded instances under `root`, one per decoder: `writer`'s is where this node's
    decoder writes; the loader reads from any of them."""

    root: Path
    writer: str = LOCAL_WRITER

    @property
    def folder(self) -> Path:
        return self.root / self.writer

    def entry_for(self, path: Path) -> Path | None:
        """Where this writer keeps the decoded frames of the instance file `path` as it is now; None when the
        file is gone."""
        name = _entry_name(path)
        return None if name is None else self.folder / name

    def frames(self, path: Path, frames: int, rows: int, columns: int) -> np.ndarray | None:
        """The decoded frames [frame, row, column(, sample)] of `path`, memory-mapped, from this writer's
        folder or another's, or None when none were prepared for the file as it is now or they do not have
        the header's shape."""
        name = _entry_name(path)
        if name is None:
            return None
        for folder in self._folders():
            try:
                array = np.load(folder / name, mmap_mode="r")
            except (OSError, ValueError):  # not prepared there (or evicted meanwhile)
                continue
            if array.shape[:3] == (frames, rows, columns):
                return array
        return None  # the job decodes it from the spool

    def clear(self, spare: frozenset[str] = frozenset()) -> None:
        """Remove this writer's folder (a previous run's, not in the new decoder's account) and everything
        else under the root but the folders of the writers in `spare` (other nodes, alive and writing)."""
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for child in children:
            if child.name in spare and child.name != self.writer:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def _folders(self) -> list[Path]:
        try:
            others = sorted(child for child in self.root.iterdir() if child.is_dir() and child != self.folder)
        except FileNotFoundError:
            return []
        return [self.folder, *others]


def _entry_name(path: Path) -> str | None:
    """The name of the decoded frames of the instance file `path` as it is now (None when it is gone): it
    holds the file's identity, so a replaced file never meets stale pixels."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:24]
    return f"{digest}-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}.npy"


def prepared_store(config, writer: str = LOCAL_WRITER) -> PreparedStore | None:
    """The store `config` (a `dicom_node.config.Config`) has the decoder fill, or None when it is off:
    decoding while receiving is on when `inference.prepare.max_mb` is above 0 and a pipeline is enabled
    (a node that only forwards never loads a volume)."""
    if config.inference.prepare.max_mb <= 0 or not any(p.enabled for p in config.pipelines.values()):
        return None
    return PreparedStore(Path(config.node.storage_dir) / "prepared", writer)


def worth_preparing(sop_class_uid: str, transfer_syntax: str) -> bool:
    """Whether decoding an instance ahead saves its job time: image pixel data that is compressed
    (encapsulated, PS3.5 A.4) or in a deflated data set, which loading would otherwise decode. Native
    pixels are read straight from the spool file, so preparing them would only write a second copy
    of every instance while its series arrives, with CPU and disk the receiving threads need (with it,
    539 against 594 inst/s of native CT at 4 associations, docs/performance.md); a dose report, key
    object or PDF has no pixels to decode."""
    if not sop_classes.is_image_class(sop_class_uid):
        return False
    return sop_classes.is_encapsulated(transfer_syntax) or transfer_syntax in sop_classes.DEFLATED_DATA_SET_SYNTAXES


def decode_instance(path: Path) -> np.ndarray:
    """Every frame of the instance file, stacked, as the loader's decoder gives them (pydicom's pixel
    plugins; a deflated file is inflated whole first, PS3.5 A.5)."""
    import pydicom
    from pydicom.pixels import iter_pixels
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    header = pydicom.dcmread(path, stop_before_pixels=True)
    deflated = header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    source = pydicom.dcmread(path) if deflated else path
    return np.stack(list(iter_pixels(source)))


class _Budget:
    """The decoder's account of what it keeps: series in least-recently-touched order, each with its files."""

    def __init__(self, store: PreparedStore, max_bytes: int, max_series: int):
        self.store = store
        self.max_bytes = max_bytes
        self.max_series = max_series
        self.series: OrderedDict[str, list[tuple[Path, int]]] = OrderedDict()
        self.total = 0

    def make_room(self, series: str, size: int) -> bool:
        """Evict other series until `size` more bytes of `series` fit; False when they cannot."""
        def over() -> bool:
            new_series = series not in self.series
            return self.total + size > self.max_bytes or (new_series and len(self.series) >= self.max_series)

        while over():
            victim = next((uid for uid in self.series if uid != series), None)
            if victim is None:
                return False
            for entry, nbytes in self.series.pop(victim):
                entry.unlink(missing_ok=True)
                self.total -= nbytes
        return True

    def add(self, series: str, entry: Path, size: int) -> None:
        self.series.setdefault(series, []).append((entry, size))
        self.series.move_to_end(series)
        self.total += size


def _decoder_main(jobs, stopping, parent_pid: int, store: PreparedStore, max_bytes: int, max_series: int,
                  log_format: str) -> None:
    """The decoder process: decode each queued instance file into the store until told to stop, or until
    the node is gone (killed with -9, it cannot tell)."""
    os.nice(5)
    logs.configure(log_format)
    import pydicom.pixels  # noqa: F401  imported now, not on the first instance of the first series
    budget = _Budget(store, max_bytes, max_series)
    refused: set[str] = set()
    while not stopping.is_set() and os.getppid() == parent_pid:
        try:
            series, path = jobs.get(timeout=1.0)
        except queue.Empty:
            continue
        except (EOFError, OSError):  # the node's end of the queue is gone: so is the node
            break
        entry = store.entry_for(Path(path))
        if entry is None or entry.exists():
            continue
        try:
            frames = decode_instance(Path(path))
        except Exception as error:  # the job's loader decodes it again and reports what is wrong
            log.debug("not prepared: %s: %s: %s", path, type(error).__name__, error)
            continue
        if not budget.make_room(series, frames.nbytes):
            if series not in refused:
                refused.add(series)
                log.info("series %s: over the prepared-pixel cap (%d MB, %d series); its job decodes the rest "
                         "from the spool", series, max_bytes // (1 << 20), max_series)
            continue
        partial = entry.with_suffix(".part")
        with open(partial, "wb") as out:
            np.save(out, frames)
        os.replace(partial, entry)
        budget.add(series, entry, frames.nbytes)


class Preparer:
    """The node's side: queues each stored instance for the decoder process, started with the node."""

    def __init__(self, store: PreparedStore, max_bytes: int, max_series: int):
        self.store = store
        self.max_bytes = max_bytes
        self.max_series = max_series
        self._jobs = None
        self._stopping = None
        self._process = None

    def start(self, live_writers: frozenset[str] = frozenset()) -> None:
        """Empty this node's folder and those of writers not in `live_writers` (`PreparedStore.clear`), then
        start decoding."""
        self.store.clear(spare=live_writers)
        self.store.folder.mkdir(parents=True, exist_ok=True)
        self._jobs = _CONTEXT.Queue(QUEUE_LIMIT)
        self._stopping = _CONTEXT.Event()
        self._process = _CONTEXT.Process(target=_decoder_main, name="prepare-decoder", daemon=True,
                                         args=(self._jobs, self._stopping, os.getpid(), self.store, self.max_bytes, self.max_series,
                                               logs.current_format()))
        self._process.start()
        log.info("decoding while receiving: up to %d MB of decoded pixels, %d series, in %s (pid %d)",
                 self.max_bytes // (1 << 20), self.max_series, self.store.folder, self._process.pid)

    def instance_stored(self, record) -> None:
        """`Ingest`'s notification of a new instance (`store.journal.InstanceRecord`): queue it if
        `worth_preparing`, never wait."""
        if worth_preparing(record.sop_class_uid, record.transfer_syntax):
            self.queue(record.series_instance_uid, record.path)

    def queue(self, series_instance_uid: str, path: str) -> None:
        """Have the decoder prepare the instance file at `path`, unless its queue is full or closed."""
        if self._jobs is None:
            return
        try:
            self._jobs.put_nowait((series_instance_uid, path))
        except (queue.Full, ValueError, OSError):  # full, or the queue closed by stop(): the job decodes it
            pass

    def stop(self) -> None:
        if self._process is None:
            return
        jobs, process = self._jobs, self._process
        self._jobs = self._process = None
        self._stopping.set()  # what is still queued is not decoded: no job needs it from this run
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_S)
        jobs.cancel_join_thread()
        jobs.close()
