"""MONAI's own transforms and `sliding_window_inference`: the reference the node's segmentation is held to.

MONAI and PyTorch stay out of the node's dependencies. They live in
`.venv-monai` at the repository root (gitignored), built on first use by
`monai_python` under a file lock and reused by the fidelity tests and
`bench.inference`. This module has both sides:

- node side (`run_reference`): writes each case's voxels and LPS geometry and
  the recipe read from the model's pipeline.yaml to a folder, runs this file
  in the venv, reads the results back;
- venv side (`monai_segment`, `python -m tests.monai_reference`): imports
  only numpy, torch, monai and onnxruntime; the spleen bundle's steps
  (Orientation, Spacing, ScaleIntensityRange, `sliding_window_inference`,
  softmax, inverse transforms as Invertd, argmax,
  KeepLargestConnectedComponent), every one MONAI's own with its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("torch==2.13.0", "monai==1.6.*", "nibabel", "scikit-image", "onnxruntime", "numpy")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes to NIfTI's world, as MONAI's loaders give it


def monai_python() -> Path:
    """The MONAI venv's interpreter, building the venv on first use (a file lock serialises builders).

    `pip install torch==2.13.0` resolves to the CPU build; Orientation needs nibabel,
    KeepLargestConnectedComponent scikit-image on CPU.
    """
    from tests.peers import peer_venv  # node side only: the venv side imports neither pytest nor tests.peers
    return peer_venv("monai", REQUIREMENTS, "monai, torch, nibabel, skimage, onnxruntime")


# --- node side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """MONAI's result for one case: `model_shape` and `model_affine` (LPS, 4x4) describe the grid Spacing
    chose; `model_array` is the model's input on it [x, y, z] (None for a grid-only case)."""

    mask: np.ndarray | None
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_array: np.ndarray | None


def recipe(entry) -> dict:
    """The MONAI parameters of a segmentation entry's pipeline.yaml (what both sides are configured from)."""
    spec = entry.pipeline
    post, window = spec.postprocessing, spec.sliding_window
    if spec.input_layout != "NCXYZ" or spec.output_layout != "NCXYZ" or post.discretize != "argmax" or post.fill_holes:
        raise ValueError(f"the MONAI reference runs NCXYZ argmax models without fill_holes, not {entry.name!r}")
    values = [label.value for label in spec.labels]
    return {
        "orientation": spec.preprocessing.orientation, "spacing": list(spec.preprocessing.spacing),
        "window": list(spec.preprocessing.window), "scale": list(spec.preprocessing.scale),
        "roi_size": list(window.roi_size), "overlap": window.overlap, "batch_size": window.batch_size,
        "mode": window.blending, "sigma_scale": window.sigma_scale,
        "input": spec.input.name, "output": spec.output.name,
        "largest_component": values if post.largest_component is True else list(post.largest_component or ()),
    }


def write_case(folder: Path, geometry: dict, array: np.ndarray | None = None) -> None:
    """A case folder: `geometry.json` (spacing, origin, direction in LPS; `shape` [k, j, i]) and `volume.npy`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "geometry.json").write_text(json.dumps(geometry))
    if array is not None:
        np.save(folder / "volume.npy", array)


def run_reference(cases: dict[str, tuple[dict, np.ndarray | None]], recipe_: dict, model: Path, work: Path,
                  threads: int = 2) -> dict[str, Reference]:
    """MONAI's results for `cases` (name -> (geometry, voxels [k, j, i] or None for the grid alone)).

    One venv process runs every case, so torch and the ONNX session load once.
    """
    folders = []
    for name, (geometry, array) in cases.items():
        write_case(work / name, geometry, array)
        folders.append(str(work / name))
    (work / "recipe.json").write_text(json.dumps(recipe_))
    subprocess.run([str(monai_python()), "-m", "tests.monai_reference", "--recipe", str(work / "recipe.json"),
                    "--model", str(model), "--threads", str(threads), *folders],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    results = {}
    for name in cases:
        folder = work / name
        grid = json.loads((folder / "model_grid.json").read_text())
        results[name] = Reference(
            np.load(folder / "mask.npy") if (folder / "mask.npy").exists() else None,
            tuple(grid["shape"]), np.array(grid["affine"]),
            np.load(folder / "model.npy") if (folder / "model.npy").exists() else None)
    return results


# --- venv side -----------------------------------------------------------------------------------


def meta_image(geometry: dict, array: np.ndarray | None):
    """A channel-first MetaTensor [1, i, j, k] with the RAS-world affine MONAI's loaders would give.

    Without voxels it is a zero-stride tensor of the geometry's shape: enough for lazy transforms.
    """
    import torch
    from monai.data import MetaTensor

    affine = np.eye(4)
    affine[:3, :3] = np.array(geometry["direction"]) * np.array(geometry["spacing"])
    affine[:3, 3] = geometry["origin"]
    if array is None:
        data = torch.zeros((), dtype=torch.float32).expand(1, *geometry["shape"][::-1])
    else:
        data = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.tensor(LPS_TO_RAS @ affine))


def preprocessing(recipe_: dict):
    from monai.transforms import Compose, ScaleIntensityRange

    (a_min, a_max), (b_min, b_max) = recipe_["window"], recipe_["scale"]
    return Compose([*resampling(recipe_), ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max,
                                                              clip=True)])


def resampling(recipe_: dict, lazy: bool = False) -> list:
    from monai.transforms import Orientation, Spacing

    return [Orientation(axcodes=recipe_["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=lazy),
            Spacing(pixdim=recipe_["spacing"], mode="bilinear", lazy=lazy)]


def model_grid(image) -> dict:
    """Shape and LPS affine of the model grid of a (possibly lazily) transformed MetaTensor."""
    affine = image.peek_pending_affine() if image.has_pending_operations else image.affine
    shape = image.peek_pending_shape() if image.has_pending_operations else image.shape[1:]
    return {"shape": [int(n) for n in shape], "affine": (LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)).tolist()}


def monai_segment(array: np.ndarray, geometry: dict, recipe_: dict, predictor) -> dict:
    """The recipe on voxels [k, j, i]: the mask [k, j, i] uint8, the model grid and the model's input on it."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscrete, KeepLargestConnectedComponent

    transform = preprocessing(recipe_)
    x = transform(meta_image(geometry, array))
    with torch.inference_mode():
        logits = sliding_window_inference(x.as_tensor()[None], recipe_["roi_size"], recipe_["batch_size"], predictor,
                                          overlap=recipe_["overlap"], mode=recipe_["mode"],
                                          sigma_scale=recipe_["sigma_scale"])
    probabilities = MetaTensor(torch.softmax(logits[0], dim=0), affine=x.affine,
                               applied_operations=x.applied_operations)
    back = transform.inverse(probabilities)  # bilinear back to the source grid, as the bundle's Invertd
    label = AsDiscrete(argmax=True)(back)
    if recipe_["largest_component"]:
        label = KeepLargestConnectedComponent(applied_labels=recipe_["largest_component"])(label)
    return {"mask": np.asarray(label[0]).astype(np.uint8).transpose(2, 1, 0), "grid": model_grid(x),
            "model": np.asarray(x[0], dtype=np.float32)}


def onnx_predictor(model: Path, recipe_: dict, threads: int):
    """A torch callable running the ONNX model (the node's very file) on a batch [n, 1, *roi]."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def predict(batch):
        feed = {recipe_["input"]: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
        return torch.from_numpy(session.run([recipe_["output"]], feed)[0])

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description="MONAI reference for case folders (run in .venv-monai)")
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("cases", type=Path, nargs="+")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    recipe_ = json.loads(args.recipe.read_text())
    predictor = None
    for folder in args.cases:
        geometry = json.loads((folder / "geometry.json").read_text())
        if not (folder / "volume.npy").exists():
            image = meta_image(geometry, None)
            for transform in resampling(recipe_, lazy=True):  # the grid only: nothing is resampled
                image = transform(image)
            grid = model_grid(image)
        else:
            predictor = predictor or onnx_predictor(args.model, recipe_, args.threads)
            result = monai_segment(np.load(folder / "volume.npy"), geometry, recipe_, predictor)
            np.save(folder / "mask.npy", result["mask"])
            np.save(folder / "model.npy", result["model"])
            grid = result["grid"]
        (folder / "model_grid.json").write_text(json.dumps(grid))


if __name__ == "__main__":
    main()
