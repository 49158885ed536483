"""From the source grid to the model's grid and back (SimpleITK), as MONAI's transforms do it.

A model was trained on volumes in one orientation and spacing with one
intensity window (MONAI's Orientation, Spacing and ScaleIntensityRange
transforms for the spleen recipe). `to_model_space` reproduces that on any
CT: axes permuted/flipped to the model's orientation, resampled linearly onto
the grid MONAI's `Spacing` would choose, windowed and scaled.
`to_source_grid` maps per-channel model outputs back onto the source voxels
linearly, in patient coordinates, as MONAI's inverse `Spacing` (Invertd) does,
so the result lines up with the DICOM slices it will be written against
(PS3.3 C.7.6.2: positions and orientation in LPS).

Both directions sample like torch `grid_sample` with `padding_mode="border"`,
`align_corners=False` (MONAI's defaults): a point past the outermost voxel
centres takes the value at the clamped position, never a fill value.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inference.repository import Preprocessing
from inference.volume import Volume

SPACING_TOLERANCE_MM = 1e-3
"""A source spacing this close to the target is kept as it is (MONAI Spacing's AFFINE_TOL)."""
SOURCE_BLOCK_VOXELS = 1 << 22
"""Source voxels `to_source_grid` resamples at a time (16 MiB per float32 channel)."""


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
        image = resample(image, model_grid(image, preprocessing.spacing), sitk.sitkLinear, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # [z, y, x] -> [x, y, z]
    array = scale_intensity(array, preprocessing)
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return ModelSpace(array, grid)


def model_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """The grid MONAI's `Spacing` resamples `image` onto (its pixels are not used).

    First voxel centre and axis directions are kept. Along each axis the
    spacing becomes the target one unless the source's is within 1e-3 mm of
    it, and the voxel count is the span from the first to the last source
    voxel centre in target voxels, plus one, rounded half to even
    (monai.data.utils.compute_shape_offset, scale_extent=False). So the last
    target voxel centre may lie up to half a target voxel past the last source
    one; `resample` clamps it onto the source's edge.
    """
    old = np.asarray(image.GetSpacing(), dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    new = np.where(np.abs(old - new) <= SPACING_TOLERANCE_MM, old, new)
    span = (np.asarray(image.GetSize(), dtype=np.float64) - 1) * old / new
    grid = sitk.Image([int(n) for n in np.round(span + 1.0)], sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing(tuple(float(s) for s in new))
    return grid


def resample(image: sitk.Image, grid: sitk.Image, interpolator: int,
             pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """`image` sampled at the voxel centres of `grid`, points past its outermost voxel centres clamped.

    ITK's linear interpolation already clamps within half a voxel of the
    edge; a grid reaching further (a coarser target's last voxel) gets the
    edge voxels replicated first (zero-flux Neumann padding), which is the
    same clamp: what torch's grid_sample gives with padding_mode="border".
    """
    size = np.asarray(image.GetSize())
    reach = np.array([image.TransformPhysicalPointToContinuousIndex(grid.TransformIndexToPhysicalPoint(corner))
                      for corner in itertools.product(*((0, n - 1) for n in grid.GetSize()))])
    # ITK treats [-0.5, n - 0.5) as inside; the 1e-3 voxel guard errs on the side of one more replicated layer.
    lower = [max(math.ceil(-0.5 - low + 1e-3), 0) for low in reach.min(axis=0)]
    upper = [max(math.ceil(high - (n - 0.5) + 1e-3), 0) for high, n in zip(reach.max(axis=0), size)]
    if any(lower) or any(upper):
        image = sitk.ZeroFluxNeumannPad(image, lower, upper)
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0,
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


def to_source_grid(channels: np.ndarray, grid: sitk.Image, volume: Volume, needed: np.ndarray | None = None,
                   convert: Callable[[np.ndarray], np.ndarray] | None = None,
                   ) -> Iterator[tuple[np.ndarray, tuple[slice, ...]]]:
    """Per-channel values [c, x, y, z] on the model's `grid`, resampled linearly onto the volume's voxels.

    Works in blocks of whole source slices, a few million voxels per channel
    at a time whatever the series' length, and yields each block's values
    [c, k, j, i] with where it lies in the volume's [k, j, i] array. With
    `needed` (bool [x, y, z]), only the source voxels whose interpolation
    neighbours include a needed model voxel are mapped, each block narrowed to
    the box around the needed voxels it reaches: a caller whose result is
    background wherever all neighbours are background passes its labels and
    skips the rest of the CT. `convert` turns each block's model voxels into
    the values to resample (logits into probabilities), so that only the
    voxels mapped back are computed.
    """
    boxes = [tuple(slice(0, n) for n in channels.shape[1:])] if needed is None else [bounding_box(needed)]
    if boxes[0] is None:
        return
    first, last = _source_reach(grid, boxes[0], volume)
    step = max(SOURCE_BLOCK_VOXELS // int((last[0] - first[0] + 1) * (last[1] - first[1] + 1)), 1)
    for k in range(int(first[2]), int(last[2]) + 1, step):
        block_first = np.array([first[0], first[1], k])
        block_last = np.array([last[0], last[1], min(k + step - 1, last[2])])
        low, high = _model_reach(volume, block_first, block_last, grid)
        if needed is not None:
            box = bounding_box(needed[tuple(slice(a, b + 1) for a, b in zip(low, high))])
            if box is None:
                continue  # nothing needed within reach of this block
            near = tuple(slice(a + s.start, a + s.stop) for a, s in zip(low, box))
            reach_first, reach_last = _source_reach(grid, near, volume)
            block_first, block_last = np.maximum(block_first, reach_first), np.minimum(block_last, reach_last)
            if np.any(block_last < block_first):
                continue
            low, high = _model_reach(volume, block_first, block_last, grid)
        crop = channels[(slice(None), *(slice(a, b + 1) for a, b in zip(low, high)))]
        if convert is not None:
            crop = convert(crop)
        image = sitk.GetImageFromArray(np.ascontiguousarray(crop.transpose(3, 2, 1, 0)), isVector=True)
        image.SetSpacing(grid.GetSpacing())
        image.SetDirection(grid.GetDirection())
        image.SetOrigin(grid.TransformIndexToPhysicalPoint([int(a) for a in low]))
        reference = _index_grid(volume, block_first, block_last - block_first + 1)
        values = sitk.GetArrayFromImage(resample(image, reference, sitk.sitkLinear, sitk.sitkVectorFloat32))
        where = tuple(slice(int(a), int(b) + 1) for a, b in zip(block_first[::-1], block_last[::-1]))
        yield np.moveaxis(values.reshape(*values.shape[:3], -1), -1, 0), where


def _source_reach(grid: sitk.Image, box: tuple[slice, ...], volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """First and last source index (i, j, k) within one model voxel of the model-grid `box`, clipped to the volume."""
    low, high = _reach(grid, [(s.start - 1.0, s.stop + 0.0) for s in box], _index_grid(volume))
    size = np.asarray(volume.shape[::-1])
    return np.clip(low, 0, size - 1).astype(int), np.clip(high, 0, size - 1).astype(int)


def _model_reach(volume: Volume, first: np.ndarray, last: np.ndarray,
                 grid: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """First and last model-grid index that linear interpolation at source voxels `first`..`last` can touch."""
    low, high = _reach(_index_grid(volume), [(a - 0.5, b + 0.5) for a, b in zip(first, last)], grid)
    return (np.maximum(low - 1, 0).astype(int),
            np.minimum(high + 1, np.asarray(grid.GetSize()) - 1).astype(int))


def _index_grid(volume: Volume, first=(0, 0, 0), size=(1, 1, 1)) -> sitk.Image:
    """A grid of the volume's voxels from index `first` (i, j, k) on, `size` voxels: the geometry for index
    arithmetic (one voxel will do) or a resampling reference (its pixels are never read)."""
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in volume.spacing))
    grid.SetDirection(tuple(float(d) for d in np.asarray(volume.direction).ravel()))
    grid.SetOrigin(tuple(float(x) for x in volume.index_to_lps(np.asarray(first))))
    return grid


def _reach(source: sitk.Image, extent: list[tuple[float, float]], target: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Floor and ceiling of the `target` indices that the corners of `extent` (continuous `source` indices) map to."""
    points = [target.TransformPhysicalPointToContinuousIndex(source.TransformContinuousIndexToPhysicalPoint(corner))
              for corner in itertools.product(*extent)]
    return np.floor(np.min(points, axis=0)), np.ceil(np.max(points, axis=0))


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The index box holding every True voxel, grown by `margin` voxels per side (clipped); None when empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
