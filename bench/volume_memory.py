"""Peak memory and time of loading a 512x512x600 CT series, ours against SimpleITK.

The budget: one int16/float32 copy of the volume at a time, well under
2 GB peak RSS for 512x512x600 (the int16 volume itself is 300 MiB).
The series is the shared real CT walked back and forth to 600 slices
(tests/series_factory.py), written uncompressed (Explicit VR Little Endian);
with --j2k also as JPEG 2000 Lossless, with --enhanced also as one Enhanced CT
multi-frame instance (frames read from the file one at a time).

Each loader runs in a fresh Python process and reports its own peak RSS,
VmHWM from /proc/self/status: `getrusage(RUSAGE_SELF).ru_maxrss` is not used
because Linux carries it over from the parent across fork+exec (a child of a
1.6 GB parent reported 1.6 GB before importing anything). `imports` is the
peak before loading, so `peak - imports` is what loading costs. The peer is SimpleITK's `ImageSeriesReader` (GDCM) on
the same files, file order from `GetGDCMSeriesFileNames`.

Run: .venv/bin/python -m bench.volume_memory [--slices 600] [--j2k] [--enhanced] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless

from bench.machine import run_header
from tests.peers import REPO
from tests.series_factory import write_ct_series
from tests.volume_variants import enhanced_ct

_MEASURE = """
import json, re, sys, time
from pathlib import Path
import SimpleITK as sitk
from dicom_node.pipeline.volume import load_series
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
folder, loader = Path(sys.argv[1]), sys.argv[2]
imports = peak_kib()
start = time.perf_counter()
if loader == "ours":
    array = load_series(sorted(folder.iterdir())).volume.array
else:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    array = sitk.GetArrayViewFromImage(reader.Execute())
seconds = time.perf_counter() - start
peak = peak_kib()
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "imports_mib": imports / 1024,
                  "shape": list(array.shape), "dtype": str(array.dtype)}))
"""


def measure(folder: Path, loader: str) -> dict:
    """One load in a fresh interpreter; returns its JSON figures."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), loader], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def to_j2k(source: Path, target: Path) -> None:
    """Re-encode every slice as JPEG 2000 Lossless (what the shared real series uses)."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(target / path.name, enforce_file_format=True)


def to_enhanced(source: Path, target: Path) -> None:
    """The same slices as one Enhanced CT Image instance (tests/volume_variants.py)."""
    target.mkdir()
    datasets = [pydicom.dcmread(path) for path in sorted(source.iterdir())]
    enhanced_ct(datasets, per_frame_rescale=False).save_as(target / "enhanced.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--j2k", action="store_true", help="also measure a JPEG 2000 Lossless copy")
    parser.add_argument("--enhanced", action="store_true", help="also measure an Enhanced CT multi-frame copy")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="volume-memory-") as tmp:
        folders = {"native": Path(tmp) / "native"}
        write_ct_series(folders["native"], args.slices)
        if args.j2k:
            folders["j2k"] = Path(tmp) / "j2k"
            to_j2k(folders["native"], folders["j2k"])
        if args.enhanced:
            folders["enhanced"] = Path(tmp) / "enhanced"
            to_enhanced(folders["native"], folders["enhanced"])
        print(run_header())
        print(f"512x512x{args.slices} CT, peak RSS of a fresh process per load, median of {args.runs} run(s)")
        print(f"{'encoding':8} {'loader':10} {'seconds':>8} {'peak MiB':>9} {'imports MiB':>12} {'load MiB':>9}  array")
        for encoding, folder in folders.items():
            for loader in ("ours", "simpleitk"):
                runs = [measure(folder, loader) for _ in range(args.runs)]
                seconds = statistics.median(r["seconds"] for r in runs)
                peak = statistics.median(r["peak_mib"] for r in runs)
                imports = statistics.median(r["imports_mib"] for r in runs)
                last = runs[-1]
                print(f"{encoding:8} {loader:10} {seconds:8.2f} {peak:9.0f} {imports:12.0f} {peak - imports:9.0f}  "
                      f"{'x'.join(map(str, last['shape']))} {last['dtype']}")


if __name__ == "__main__":
    main()
