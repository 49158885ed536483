"""The node's spleen segmentation against MONAI's own transforms and `sliding_window_inference`.

Both sides run the same ONNX file with the parameters of the same
pipeline.yaml; the MONAI side (tests/monai_reference.py, in `.venv-monai`)
uses MONAI's Orientation, Spacing, ScaleIntensityRange, sliding window
(Gaussian blending), softmax, inverse transforms, argmax and
KeepLargestConnectedComponent. So only the transforms can differ, and the test
holds the node to: the same model grid (shape and affine), the same model
input on it, and masks with Dice >= 0.995. Cases: the real 20-slice series
and volumes made from it with odd sizes, anisotropic spacing, coronal and
oblique storage, and a crop smaller than the ROI; plus the grid alone for
sizes, spacings and orientations seen in real archives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference import tasks, transforms
from inference.backends import BackendSettings, open_backend
from inference.repository import ModelRepository
from inference.volume import Volume
from tests.model_repository import SPLEEN_ONNX, install_spleen_model
from tests.monai_reference import recipe, run_reference
from tests.peers import CT_J2K_SERIES
from tests.volumes import dice, read_series

AIR_HU = -1024


def rotation(degrees_x: float, degrees_y: float, degrees_z: float) -> np.ndarray:
    """Rotation about the patient's x, then y, then z axis (an oblique acquisition's direction matrix)."""
    ax, ay, az = (math.radians(d) for d in (degrees_x, degrees_y, degrees_z))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# Direction matrices (columns: LPS directions of the i, j, k axes) of non-axial storage.
CORONAL = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # rows run inferior, slices step anterior -> posterior
SAGITTAL = np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])  # columns run posterior, rows inferior


def resampled(ct: Volume, size, spacing, direction, origin) -> Volume:
    """The CT re-sampled (linearly, air outside) onto another grid: what another scanner setting would give."""
    reference = sitk.Image([int(n) for n in size], sitk.sitkInt16)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    reference.SetOrigin(tuple(float(o) for o in origin))
    return Volume.from_sitk(sitk.Resample(ct.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, AIR_HU))


def made_cases(ct: Volume) -> dict[str, Volume]:
    """Volumes made from the real series, each keeping the spleen (source [k, j, i] box 0:20, 246:380, 290:392)."""
    def crop(k: slice, j: slice, i: slice) -> Volume:
        origin = ct.index_to_lps(np.array([i.start, j.start, k.start]))
        return Volume(np.ascontiguousarray(ct.array[k, j, i]), ct.spacing, tuple(origin), ct.direction)

    centre = ct.index_to_lps(np.array([341.0, 313.0, 9.5]))  # near the spleen's centre
    odd = crop(slice(0, 20), slice(151, 478), slice(203, 497))
    return {
        "shared series": ct,
        # Odd sizes and a spacing that divides nothing evenly, thick slices.
        "odd anisotropic": resampled(odd, (327, 241, 13), (0.9, 1.3, 3.1), np.eye(3), odd.origin),
        # Stored as coronal images (rows inferior, slices anterior to posterior) at 0.8 mm, 1.7 mm apart.
        "coronal": resampled(ct, (181, 25, 101), (0.8, 1.6, 1.7), CORONAL,
                             centre - CORONAL @ (np.array([90, 12, 50]) * [0.8, 1.6, 1.7])),
        # Oblique: tilted 12 degrees about x and 7 about y, rotated 5 about z; isotropic 1.1 mm.
        "oblique": resampled(ct, (131, 121, 31), (1.1, 1.1, 1.1), rotation(12, 7, 5),
                             centre - rotation(12, 7, 5) @ (np.array([65, 60, 15]) * 1.1)),
        # Smaller than the 96^3 ROI on every axis of the model grid (padded, cropped back).
        "smaller than roi": crop(slice(0, 20), slice(262, 380), slice(290, 395)),
    }


# (size [i, j, k], spacing, direction): the grid alone, no voxels.
GRIDS = {
    "shared series": ((512, 512, 20), (0.9765625, 0.9765625, 2.0), np.eye(3)),
    "thin slices": ((512, 512, 168), (0.703125, 0.703125, 2.5), np.eye(3)),
    "upsampled z": ((512, 512, 41), (0.6, 0.6, 5.0), np.eye(3)),
    "odd flipped": ((301, 333, 97), (0.9, 0.6, 3.0), np.diag([-1.0, 1.0, -1.0])),
    "within tolerance": ((257, 255, 61), (1.5004, 1.4996, 2.0009), np.eye(3)),
    "already there": ((200, 180, 60), (1.5, 1.5, 2.0), np.eye(3)),
    "coronal": ((400, 300, 120), (0.7, 0.8, 1.25), CORONAL),
    "sagittal": ((256, 320, 150), (0.85, 0.85, 1.1), SAGITTAL),
    "oblique": ((480, 470, 90), (0.75, 0.8, 1.9), rotation(15, -8, 20)),
    "single slice": ((64, 64, 1), (0.9, 0.9, 5.0), np.eye(3)),
}


def geometry(volume: Volume) -> dict:
    return {"shape": list(volume.shape), "spacing": list(volume.spacing), "origin": [float(o) for o in volume.origin],
            "direction": np.asarray(volume.direction).tolist()}


def grid_affine(grid: sitk.Image) -> np.ndarray:
    """The LPS affine (index [x, y, z] -> mm) of a SimpleITK grid."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(grid.GetDirection()).reshape(3, 3) * np.array(grid.GetSpacing())
    affine[:3, 3] = grid.GetOrigin()
    return affine



@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_series(CT_J2K_SERIES)


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    install_spleen_model(root)
    return ModelRepository(root).get("spleen_ct")


@pytest.fixture(scope="module")
def cases(ct) -> dict[str, Volume]:
    return made_cases(ct)


@pytest.fixture(scope="module")
def grid_volumes() -> dict[str, Volume]:
    """Empty volumes (uint8 zeros) with the GRIDS' geometry: what the node side needs of them is the grid."""
    return {name: Volume(np.zeros(size[::-1], np.uint8), spacing, (-120.5, 80.25, -300.0), direction)
            for name, (size, spacing, direction) in GRIDS.items()}


@pytest.fixture(scope="module")
def monai(cases, grid_volumes, entry, tmp_path_factory):
    """MONAI's results for every case and grid, from one run of the MONAI venv."""
    inputs = {f"case {name}": (geometry(volume), volume.array) for name, volume in cases.items()}
    inputs.update({f"grid {name}": (geometry(volume), None) for name, volume in grid_volumes.items()})
    return run_reference(inputs, recipe(entry), SPLEEN_ONNX, tmp_path_factory.mktemp("monai"))


@pytest.mark.parametrize("name", list(GRIDS))
def test_model_grid_is_monai_spacing_grid(name, grid_volumes, monai, entry):
    preprocessing = entry.pipeline.preprocessing
    oriented = sitk.DICOMOrient(grid_volumes[name].to_sitk(), preprocessing.orientation)
    grid = transforms.model_grid(oriented, preprocessing.spacing)
    reference = monai[f"grid {name}"]
    assert grid.GetSize() == reference.model_shape
    np.testing.assert_allclose(grid_affine(grid), reference.model_affine, atol=1e-4)


@pytest.mark.parametrize("name", ["shared series", "odd anisotropic", "coronal", "oblique", "smaller than roi"])
def test_spleen_mask_matches_monai(name, cases, monai, entry, monkeypatch):
    volume, reference = cases[name], monai[f"case {name}"]
    if name != "shared series":  # made cases map back a few source slices at a time: block seams must not show
        monkeypatch.setattr(transforms, "SOURCE_BLOCK_VOXELS", 4096)
    space = transforms.to_model_space(volume, entry.pipeline.preprocessing)
    assert space.array.shape == reference.model_shape
    np.testing.assert_allclose(grid_affine(space.grid), reference.model_affine, atol=1e-4)
    # The model's input on that grid: resampling and windowing agree to float32 rounding.
    np.testing.assert_allclose(space.array, reference.model_array, atol=1e-5)
    if name == "smaller than roi":
        assert all(n < r for n, r in zip(space.array.shape, entry.pipeline.sliding_window.roi_size))

    backend = open_backend(BackendSettings(kind="embedded", cpu_threads=2))
    backend.check(entry)
    mask = tasks.segment(volume, entry, backend).volume.array
    assert mask.shape == reference.mask.shape == volume.shape
    assert (reference.mask > 0).sum() > 2000, "the case must show a spleen for the Dice to mean something"
    assert dice(mask > 0, reference.mask > 0) >= 0.995
