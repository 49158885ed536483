"""SEG (and overlay) encoding speed and size for a 512x512x300 CT.

The budget: one organ < 1 s, lungs (2 segments) < 2 s, build + write.
The series is the shared real CT walked back and forth to 300 slices
(tests/series_factory.py); the organ is the real spleen reference mask walked
the same way; the lungs are two ellipsoids filling most of each hemithorax.

Compared in the same run:
- `floor`: bit-packing the same frames and writing them with fsync, no DICOM
  object at all: what any SEG writer must at least spend;
- highdicom's defaults (omit_empty_frames=True, native);
- ours, native and JPEG 2000 Lossless.
The first build in a process also loads highdicom's standard tables (~0.3 s):
shown in brackets as the first run; a job worker pays it when it starts, before
its first job (dicom_node.pipeline.job.preload).

Run: .venv/bin/python -m bench.encode [--runs 3] [--overlay]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from bench.machine import run_header
from dicom_node.results import OutputSeries, source_headers
from dicom_node.results.overlay import OverlayOptions, write_overlay
from dicom_node.results.seg import SegOptions, segment_descriptions, write_seg
from dicom_node.results.segread import source_grid
from dicom_node.results.uids import UidSeed
from inference.results import Algorithm, Code, LabelMap, SegmentLabel
from tests.peers import SHARED_DATA
from tests.series_factory import ct_datasets, real_slices, walk

N_SLICES = 300
ORGAN = Code("123037004", "SCT", "Anatomical Structure")
SPLEEN = SegmentLabel(1, "spleen", ORGAN, Code("78961009", "SCT", "Spleen"))
LUNGS = (
    SegmentLabel(1, "right lung", ORGAN, Code("3341006", "SCT", "Right lung")),
    SegmentLabel(2, "left lung", ORGAN, Code("44029006", "SCT", "Left lung")),
)
ALGORITHM = Algorithm("bench", "1")


def sources_and_pixels():
    datasets = list(ct_datasets(N_SLICES))
    hu = np.stack([ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + int(ds.RescaleIntercept) for ds in datasets])
    for ds in datasets:
        del ds.PixelData
    headers = source_headers(datasets)
    return headers, source_grid(headers).with_array(hu)


def spleen_array() -> np.ndarray:
    reference = sitk.ReadImage(str(SHARED_DATA / "ct" / "abdomen_siemens_20slices_spleen_ref_lpsgrid.nii.gz"))
    slices = (sitk.GetArrayFromImage(reference) == 1).astype(np.uint8)  # the file holds all TotalSegmentator labels
    assert slices.shape[0] == len(real_slices())
    return np.stack([slices[index] for index in walk(N_SLICES, len(slices))])


def lungs_array() -> np.ndarray:
    k, j, i = np.ogrid[:N_SLICES, :512, :512]
    taper = np.clip(np.sin(np.pi * (k + 10) / (N_SLICES + 20)), 0, None)
    array = np.zeros((N_SLICES, 512, 512), np.uint8)
    for value, centre in ((1, 150), (2, 362)):
        inside = ((i - centre) / (90 * taper + 1e-6)) ** 2 + ((j - 250) / (140 * taper + 1e-6)) ** 2 < 1
        array[inside] = value
    return array


def timed(action: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    """(first run, the following runs) in seconds."""
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def floor_write(array: np.ndarray, numbers: list[int], path: Path) -> None:
    with open(path, "wb") as handle:
        for number in numbers:
            handle.write(np.packbits(array == number, bitorder="little").tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def highdicom_defaults(label_map: LabelMap, headers, path: Path) -> None:
    seg = hd.seg.Segmentation(
        headers, label_map.volume.array, "BINARY", segment_descriptions(label_map), hd.UID(), 1, hd.UID(), 1,
        "m", "m", "1", "1",
    )
    seg.save_as(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--overlay", action="store_true", help="also time the 300-instance overlay series")
    args = parser.parse_args()

    headers, hu = sources_and_pixels()
    grid = hu
    cases = {
        "organ (spleen)": LabelMap(grid.with_array(spleen_array()), (SPLEEN,), ALGORITHM),
        "lungs (2 segments)": LabelMap(grid.with_array(lungs_array()), LUNGS, ALGORITHM),
    }
    print(run_header())
    print(f"512x512x{N_SLICES}, median of {args.runs} warm runs (first run in brackets)")
    print(f"{'case':20} {'writer':34} {'time s':>14} {'size MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, label_map in cases.items():
            numbers = [s.value for s in label_map.segments]
            writers: dict[str, Callable[[], Path]] = {
                "floor: packbits + fsync": lambda: (floor_write(label_map.volume.array, numbers, out / "raw"), out / "raw")[1],
                "highdicom defaults (omit, native)": lambda: (highdicom_defaults(label_map, headers, out / "hd.dcm"), out / "hd.dcm")[1],
            }
            for compress in (False, True):
                options = SegOptions(OutputSeries(UidSeed("1.2.3", 1, "bench"), 9901, "AI bench"), compress=compress)
                label = f"write_seg {'JPEG 2000 lossless' if compress else 'native (Explicit LE)'}"
                folder = out / ("compressed" if compress else "native")
                writers[label] = lambda options=options, folder=folder: write_seg(label_map, headers, folder, options)
            for label, action in writers.items():
                first, warm = timed(action, args.runs)
                size = action().stat().st_size / 1e6
                print(f"{name:20} {label:34} {statistics.median(warm):6.3f} ({first:5.3f}) {size:8.2f}")
        if args.overlay:
            options = OverlayOptions(OutputSeries(UidSeed("1.2.3", 1, "bench"), 9903, "AI overlay"))
            start = time.perf_counter()
            paths = write_overlay(cases["lungs (2 segments)"], headers, hu, out / "overlay", options)
            elapsed = time.perf_counter() - start
            size = sum(p.stat().st_size for p in paths) / 1e6
            print(f"overlay, lungs, RLE: {len(paths)} instances in {elapsed:.2f} s, {size:.1f} MB")


if __name__ == "__main__":
    main()
