"""Decode while receiving (dicom_node.pipeline.prepare): the prepared pixels give the very volume the spool gives.

One decoder process per module (it is the node's real one, started the same way); each test feeds it
instance notifications as `Ingest` does and waits for the files it writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage

from dicom_node.pipeline.prepare import PreparedStore, Preparer, decode_instance
from dicom_node.pipeline.volume import load_series
from tests import volume_variants as variants
from tests.peers import wait_for
from tests.series_factory import write_ct_series
from tests.test_pipeline import real_series

CAP_FRAMES = 5


@pytest.fixture(scope="module")
def preparer(tmp_path_factory):
    preparer = Preparer(PreparedStore(tmp_path_factory.mktemp("prepared")), 1 << 30, 8)
    preparer.start()
    yield preparer
    preparer.stop()


def feed(preparer: Preparer, series: str, files: list[Path]) -> None:
    """Queue the files for the decoder, whatever their encoding (the decoder is tested here, not the choice
    of what `Ingest`'s notifications queue)."""
    for path in files:
        preparer.queue(series, str(path))


def stored(path: Path, series: str, sop_class_uid: str | None = None) -> SimpleNamespace:
    """The journal's record of `path` as `Ingest` hands it to the preparer."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return SimpleNamespace(series_instance_uid=series, path=str(path), transfer_syntax=str(meta.TransferSyntaxUID),
                           sop_class_uid=sop_class_uid or str(meta.MediaStorageSOPClassUID))


def prepared(store: PreparedStore, files: list[Path]) -> list[Path]:
    return [entry for entry in (store.entry_for(f) for f in files) if entry is not None and entry.exists()]


def wait_prepared(store: PreparedStore, files: list[Path], count: int | None = None) -> None:
    count = len(files) if count is None else count
    wait_for(lambda: len(prepared(store, files)) >= count, 120, f"{count} prepared instances")


@pytest.mark.parametrize("kind", ["j2k", "native"])
def test_the_prepared_volume_equals_the_volume_loaded_from_the_spool(preparer, tmp_path, kind):
    files = real_series(tmp_path / "s") if kind == "j2k" else write_ct_series(tmp_path / "s", 12)
    feed(preparer, f"series-{kind}", files)
    wait_prepared(preparer.store, files)

    from_spool = load_series(files)
    from_prepared = load_series(files, prepared=preparer.store)

    assert from_spool.prepared_frames == 0
    assert from_prepared.prepared_frames == len(files)
    assert from_prepared.volume.array.dtype == from_spool.volume.array.dtype
    np.testing.assert_array_equal(from_prepared.volume.array, from_spool.volume.array)
    assert from_prepared.slices == from_spool.slices
    assert from_prepared.warnings == from_spool.warnings


def test_only_instances_whose_pixels_need_decoding_are_prepared(preparer, tmp_path):
    """Compressed and deflated CT are queued; native CT (read straight from the spool) and a key object
    (no pixels) are not."""
    native = write_ct_series(tmp_path / "native", 3)
    deflated = variants.write(variants.small_series()[:3], tmp_path / "deflated", DeflatedExplicitVRLittleEndian)
    j2k = real_series(tmp_path / "j2k", count=3)
    key_object = stored(native[0], "series-choice", sop_class_uid=KeyObjectSelectionDocumentStorage)
    for record in [key_object, *(stored(path, "series-choice") for path in [*native, *deflated, *j2k])]:
        preparer.instance_stored(record)
    wait_prepared(preparer.store, [*deflated, *j2k])  # queued last: the decoder has passed the others

    assert prepared(preparer.store, native) == []
    loaded = load_series(j2k, prepared=preparer.store)
    assert loaded.prepared_frames == len(j2k)
    np.testing.assert_array_equal(loaded.volume.array, load_series(j2k).volume.array)


def test_instances_added_or_replaced_after_preparation_are_decoded_from_the_spool(preparer, tmp_path):
    files = write_ct_series(tmp_path / "s", 12)
    feed(preparer, "series-changed", files[:-1])  # the last instance arrives after preparation
    wait_prepared(preparer.store, files[:-1])
    # A prepared instance replaced by a copy with other pixels (a new file, as the spool writes one).
    replaced = files[3]
    ds = pydicom.dcmread(replaced)
    pixels = ds.pixel_array.copy()
    pixels[:100] = pixels.min()
    ds.PixelData = pixels.tobytes()
    ds.save_as(replaced.with_suffix(".new"), enforce_file_format=True)
    os.replace(replaced.with_suffix(".new"), replaced)
    assert preparer.store.entry_for(replaced) not in prepared(preparer.store, files)

    loaded = load_series(files, prepared=preparer.store)

    assert loaded.prepared_frames == len(files) - 2  # neither the late nor the replaced instance
    from_spool = load_series(files)
    np.testing.assert_array_equal(loaded.volume.array, from_spool.volume.array)
    k = [s.path for s in from_spool.slices].index(replaced)
    assert (loaded.volume.array[k][:100] == loaded.volume.array[k].min()).all()  # the new pixels, not the old


def test_a_stale_prepared_file_of_another_shape_is_not_used(preparer, tmp_path):
    files = write_ct_series(tmp_path / "s", 3)
    entry = preparer.store.entry_for(files[0])
    np.save(entry, np.zeros((1, 4, 4), dtype=np.int16))  # what a bug or a stray file could leave

    loaded = load_series(files, prepared=preparer.store)

    assert loaded.prepared_frames == 0
    np.testing.assert_array_equal(loaded.volume.array, load_series(files).volume.array)
    entry.unlink()


def test_an_undecodable_instance_is_left_to_the_loader_and_the_decoder_goes_on(preparer, tmp_path):
    files = write_ct_series(tmp_path / "s", 2)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(files[0].read_bytes()[:2000])  # cut inside the header
    feed(preparer, "series-broken", [broken, *files])
    wait_prepared(preparer.store, files)
    assert prepared(preparer.store, [broken]) == []


def test_the_memory_cap_bounds_what_is_kept_and_the_rest_is_decoded_from_the_spool(tmp_path):
    first = write_ct_series(tmp_path / "a", 12)
    second = write_ct_series(tmp_path / "b", 12)
    frame_bytes = decode_instance(first[0]).nbytes
    store = PreparedStore(tmp_path / "prepared")
    capped = Preparer(store, CAP_FRAMES * frame_bytes, max_series=1)
    capped.start()
    try:
        feed(capped, "a", first)
        wait_prepared(store, first, CAP_FRAMES)
        feed(capped, "b", second)  # a second series over max_series 1: the first one is dropped
        wait_prepared(store, second, CAP_FRAMES)
        assert prepared(store, first) == []
        kept = list(store.folder.glob("*.npy"))
        assert len(kept) == CAP_FRAMES
        assert sum(np.load(path, mmap_mode="r").nbytes for path in kept) <= CAP_FRAMES * frame_bytes

        loaded = load_series(second, prepared=store)
        assert loaded.prepared_frames == CAP_FRAMES
        np.testing.assert_array_equal(loaded.volume.array, load_series(second).volume.array)
    finally:
        capped.stop()


def test_start_empties_what_a_previous_run_left_and_spares_live_writers(tmp_path):
    """Nodes sharing storage_dir: this node's folder (its previous run's) and a dead node's go, a live
    node's stays, and so does nothing else of an older layout."""
    store = PreparedStore(tmp_path / "prepared", "node-a")
    for writer in ("node-a", "node-b", "node-c"):
        (store.root / writer).mkdir(parents=True)
        (store.root / writer / "left-over.npy").write_bytes(b"x")
    (store.root / "loose.npy").write_bytes(b"x")
    again = Preparer(store, 1 << 20, 1)
    again.start(live_writers=frozenset({"node-a", "node-b"}))  # node-a: this node, listed as it is alive
    try:
        assert sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")) == [
            "node-a", "node-b", "node-b/left-over.npy"]
    finally:
        again.stop()


def test_a_job_reads_what_another_nodes_decoder_prepared(preparer, tmp_path):
    """A series received by one node and run by another: the loader finds the pixels in the first
    node's folder."""
    files = write_ct_series(tmp_path / "s", 6)
    feed(preparer, "series-elsewhere", files)
    wait_prepared(preparer.store, files)
    elsewhere = PreparedStore(preparer.store.root, "another-node")
    assert not elsewhere.folder.exists()

    loaded = load_series(files, prepared=elsewhere)

    assert loaded.prepared_frames == len(files)
    np.testing.assert_array_equal(loaded.volume.array, load_series(files).volume.array)
