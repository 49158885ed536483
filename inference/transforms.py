"""From the source grid to the model's grid and back (SimpleITK).

A model was trained on volumes in one orientation and spacing with one
intensity window (MONAI's Orientation, Spacing and ScaleIntensityRange
transforms for the spleen recipe). `to_model_space` reproduces that on any
CT: axes permuted/flipped to the model's orientation, resampled linearly to
its spacing, windowed and scaled. `to_source_grid` maps a label array on the
model's grid back onto the source voxels by nearest neighbour, in patient
coordinates, so the result lines up with the DICOM slices it will be
written against (PS3.3 C.7.6.2: positions and orientation in LPS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inference.repository import Preprocessing
from inference.volume import Volume


@dataclass(frozen=True, eq=False)
class ModelSpace:
    """The model's input on its own grid: `array` is float32 indexed [x, y, z] along the model's axes.

    `grid` is an image with that grid's geometry (its pixels are not used)
    to map results back.
    """

    array: np.ndarray
    grid: sitk.Image


def to_model_space(volume: Volume, preprocessing: Preprocessing) -> ModelSpace:
    # Reoriented in the source's own pixel type (int16 for CT: half the memory of float32).
    # DICOMOrient's codes name where each axis points to, as MONAI's axcodes do ("RAS": X to the right).
    image = sitk.DICOMOrient(volume.to_sitk(), preprocessing.orientation)
    if preprocessing.spacing is not None:
        image = resample(image, preprocessing.spacing, sitk.sitkLinear, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # [z, y, x] -> [x, y, z]
    array = scale_intensity(array, preprocessing)
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return ModelSpace(array, grid)


def resample(image: sitk.Image, spacing: tuple[float, float, float], interpolator: int,
             pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """The same field of view at `spacing`: first voxel centre and direction kept, size rounded.

    Edge voxels that fall just outside the source take the nearest source
    value instead of a fill value, so no artificial border enters the model.
    """
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    size = [max(int(round(n)), 1) for n in old_size * old_spacing / np.asarray(spacing, dtype=np.float64)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(),
                         tuple(float(s) for s in spacing), image.GetDirection(), 0.0,
                         pixel_type if pixel_type != sitk.sitkUnknown else image.GetPixelID(), True)


def scale_intensity(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Clip to the window [lo, hi] and map it linearly onto `scale` (MONAI ScaleIntensityRange, clip=True)."""
    if preprocessing.window is None:
        return array.astype(np.float32)  # a copy: the caller's array may be a view of an image buffer
    lo, hi = preprocessing.window
    b_min, b_max = preprocessing.scale
    factor = np.float32((b_max - b_min) / (hi - lo))
    out = np.clip(array, lo, hi).astype(np.float32, copy=False)
    out -= np.float32(lo)
    out *= factor
    out += np.float32(b_min)
    return out


def to_source_grid(labels: np.ndarray, grid: sitk.Image, volume: Volume) -> np.ndarray:
    """Labels indexed [x, y, z] on the model's `grid`, resampled by nearest neighbour to the volume's [k, j, i]."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=np.uint8))
    image.CopyInformation(grid)
    reference = sitk.Image([int(n) for n in volume.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in volume.spacing))
    reference.SetOrigin(tuple(float(o) for o in volume.origin))
    reference.SetDirection(tuple(float(d) for d in np.asarray(volume.direction).ravel()))
    back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The index box holding every True voxel, grown by `margin` voxels per side (clipped); None when empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
