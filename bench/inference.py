"""Spleen segmentation: our embedded path vs the same through KServe gRPC vs MONAI + PyTorch.

    .venv/bin/python -m bench.inference [--threads 2] [--slices 300] [--rounds 3]

(as a module from the repository root: run as a file, this script's name would hide the
`inference` package.)

Inputs: the real 20-slice J2K series (../shared/data/ct) and a 512x512x300
series made from it (its slices repeated back and forth, 2 mm apart). Each
contender runs in its own fresh process so peak RSS is its own:

- embedded: `inference.tasks.segment` with ONNX Runtime on CPU (this project);
- kserve-grpc: the same task through the triton backend to KServe's model
  server (tests/kserve_server.py, own venv), client and server RSS both shown;
- monai: what a user would write instead, in `.venv-monai` (torch==2.13.0 CPU,
  monai; built on first use by tests/monai_reference.py): MONAI
  Orientation/Spacing/ScaleIntensityRange, `sliding_window_inference` with the
  TorchScript model, softmax, inverse transforms, argmax,
  KeepLargestConnectedComponent (the spleen_ct_segmentation bundle's steps,
  with pipeline.yaml's parameters; the same code the fidelity tests hold the
  node to, there with the ONNX model).

Wall time covers model-space transforms, inference and mapping back (not
reading DICOM, not loading the model). Dice is given against TotalSegmentator
(real series) and between contenders, the lowest over the rounds.

Rounds are interleaved (each round runs every contender once, in an order
shuffled per round, the same shuffles every run), so a machine that slows
down for a while slows every contender; the median of the rounds is printed
with their range, and the ratio to MONAI of the medians with the ratio round
by round. A single run of each contender moved its ratio by more than
the code did (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SERIES = SHARED / "data" / "ct" / "abdomen_siemens_20slices_j2k"
TOTALSEGMENTATOR = SHARED / "data" / "ct" / "abdomen_siemens_20slices_spleen_ref_lpsgrid.nii.gz"
TORCHSCRIPT_MODEL = SHARED / "models" / "spleen_ct_demo" / "model.torchscript.pt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_input(folder: Path):
    geometry = json.loads((folder / "geometry.json").read_text())
    return np.load(folder / "volume.npy"), geometry


def write_input(folder: Path, array: np.ndarray, spacing, origin, direction) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "volume.npy", array)
    (folder / "geometry.json").write_text(json.dumps(
        {"spacing": list(spacing), "origin": list(origin), "direction": np.asarray(direction).tolist()}))


# --- contenders (each runs in a child process) -------------------------------------------------


def run_ours(folder: Path, repository: Path, threads: int, url: str | None) -> dict:
    from inference import tasks
    from inference.backends import BackendSettings, open_backend
    from inference.repository import ModelRepository
    from inference.volume import Volume

    array, geometry = load_input(folder)
    volume = Volume(array, tuple(geometry["spacing"]), tuple(geometry["origin"]), np.array(geometry["direction"]))
    repo = ModelRepository(repository)
    settings = (BackendSettings(kind="embedded", cpu_threads=threads) if url is None
                else BackendSettings(kind="triton", url=url, protocol="grpc", timeout_s=600))
    backend = open_backend(settings)
    entry = repo.get("spleen_ct")
    backend.check(entry)
    if url is None:
        backend.load(entry)  # the ONNX Runtime session: not timed (Triton has the model loaded already)
    start = time.perf_counter()
    mask = tasks.segment(volume, entry, backend).volume.array
    seconds = time.perf_counter() - start
    backend.close()
    return {"seconds": seconds, "mask": mask}


def run_monai(folder: Path, recipe_file: Path, threads: int) -> dict:
    import torch

    from tests.monai_reference import monai_segment

    torch.set_num_threads(threads)
    array, geometry = load_input(folder)
    model = torch.jit.load(str(TORCHSCRIPT_MODEL), map_location="cpu").eval()
    start = time.perf_counter()
    mask = monai_segment(array, geometry, json.loads(recipe_file.read_text()), model)["mask"]
    return {"seconds": time.perf_counter() - start, "mask": mask}


def child(args: argparse.Namespace) -> None:
    if args.child == "monai":
        result = run_monai(args.input, args.out / "recipe.json", args.threads)
    else:
        result = run_ours(args.input, args.repository, args.threads, args.url)
    np.save(args.out / f"{args.name}_mask.npy", result.pop("mask"))
    result["peak_rss_mb"] = peak_rss_mb()
    (args.out / f"{args.name}.json").write_text(json.dumps(result))


# --- orchestration ------------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def prepare(work: Path, slices: int) -> dict[str, Path]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES)))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image)
    geometry = (image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()).reshape(3, 3))
    real = work / "real"
    write_input(real, array, *geometry)
    # A long series from the real one: its slices back and forth (0..19, 19..0, ...), same geometry.
    period = 2 * len(array)
    order = [n % period if n % period < len(array) else period - 1 - n % period for n in range(slices)]
    big = work / f"big{slices}"
    write_input(big, np.ascontiguousarray(array[order]), *geometry)
    # Imported here: the MONAI child's venv has neither the test dependencies nor the node's.
    from inference.repository import ModelRepository
    from tests.model_repository import install_spleen_model
    from tests.monai_reference import recipe

    repository = work / "models"
    install_spleen_model(repository)
    # The MONAI contender's parameters: pipeline.yaml's, as the node reads them.
    (work / "recipe.json").write_text(json.dumps(recipe(ModelRepository(repository).get("spleen_ct"))))
    return {"real 512x512x20": real, f"made 512x512x{slices}": big, "repository": repository}


def run_child(python: Path, name: str, kind: str, folder: Path, work: Path, threads: int, url: str | None = None) -> dict:
    command = [str(python), "-m", "bench.inference", "--child", kind, "--name", name, "--input", str(folder),
               "--out", str(work), "--repository", str(work / "models"), "--threads", str(threads)]
    if url:
        command += ["--url", url]
    subprocess.run(command, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    result = json.loads((work / f"{name}.json").read_text())
    result["mask"] = np.load(work / f"{name}_mask.npy")
    return result


def server_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CONTENDERS = ("embedded", "kserve-grpc", "monai")


def run_contender(name: str, folder: Path, work: Path, threads: int, monai_python: Path, grpc_url: str) -> dict:
    os.sync()  # no contender pays for the writeback of the inputs or of another's mask (78 MB for 300 slices)
    if name == "embedded":
        return run_child(Path(sys.executable), "embedded", "embedded", folder, work, threads)
    if name == "kserve-grpc":
        return run_child(Path(sys.executable), "kserve", "kserve", folder, work, threads, grpc_url)
    return run_child(monai_python, "monai", "monai", folder, work, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every contender")
    parser.add_argument("--slices", type=int, default=300, help="slices of the made-up long series")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    parser.add_argument("--child", choices=["embedded", "kserve", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repository", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(REPO))
    import SimpleITK as sitk

    from bench.machine import run_header
    from tests.monai_reference import monai_python
    from tests.peers.kserve import KServeServer

    bench_python = monai_python()
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEGMENTATOR))) == 1
    order = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        inputs = prepare(work, args.slices)
        repository = inputs.pop("repository")
        print(run_header())
        print(f"spleen_ct_demo, {args.threads} CPU threads each, ONNX Runtime vs PyTorch {args.threads} threads, "
              f"median of {args.rounds} interleaved rounds\n")
        print(f"{'input':<18} {'contender':<12} {'wall s':>8} {'(rounds)':<20} {'peak RSS MB':>12} {'vs monai':>9} "
              f"{'(round by round)':<24} {'Dice vs monai':>14} {'Dice vs TotalSeg':>17}")
        with KServeServer(repository, work / "kserve.log") as server:
            for label, folder in inputs.items():
                seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
                rss: dict[str, float] = dict.fromkeys(CONTENDERS, 0.0)
                dice_monai: dict[str, float] = dict.fromkeys(CONTENDERS, 1.0)
                dice_reference: dict[str, float | None] = dict.fromkeys(CONTENDERS)  # None: no reference here
                for _ in range(args.rounds):
                    names = list(CONTENDERS)
                    order.shuffle(names)
                    results = {name: run_contender(name, folder, work, args.threads, bench_python, server.grpc_url)
                               for name in names}
                    for name, result in results.items():  # masks compared within the round, then dropped
                        seconds[name].append(result["seconds"])
                        rss[name] = max(rss[name], result["peak_rss_mb"])
                        dice_monai[name] = min(dice_monai[name], dice(result["mask"], results["monai"]["mask"]))
                        if result["mask"].shape == reference.shape:
                            found = dice(result["mask"], reference)
                            earlier = dice_reference[name]
                            dice_reference[name] = found if earlier is None else min(earlier, found)
                server_rss = server_peak_rss_mb(server.pid)
                monai = statistics.median(seconds["monai"])
                for name in CONTENDERS:
                    memory = f"{rss[name]:.0f}" + (f" +{server_rss:.0f}" if name == "kserve-grpc" else "")
                    rounds = ", ".join(f"{s:.2f}" for s in seconds[name])
                    by_round = ", ".join(f"{s / m:.2f}x" for s, m in zip(seconds[name], seconds["monai"]))
                    against_ref = "-" if dice_reference[name] is None else f"{dice_reference[name]:.3f}"
                    median = statistics.median(seconds[name])
                    print(f"{label:<18} {name:<12} {median:>8.2f} {'(' + rounds + ')':<20} {memory:>12} "
                          f"{median / monai:>8.2f}x {'(' + by_round + ')':<24} {dice_monai[name]:>14.3f} "
                          f"{against_ref:>17}", flush=True)
        print("\nkserve-grpc RSS: client + server (server peak over the whole run); peak RSS: the highest of the "
              "rounds.")


if __name__ == "__main__":
    main()
