"""Feeding a volume classifier from a mask: crop, resize, window, lay out, softmax.

Clara's COVID-19 classifier took the CT cropped to the lung bounding box and
resized to 192x192x64; any classifier an admin installs is fed the same way,
from the `classification:` section of its pipeline.yaml (crop margin, input
size, intensity window, tensor layout). `inference.tasks.classify` chains
these helpers with a backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from inference.results import LabelMap
from inference.volume import Volume

AXES = "NCXYZ"


def crop_to_mask(volume: Volume, mask: LabelMap, labels: Sequence[int] | None, margin_mm: float) -> Volume:
    """The part of `volume` inside the bounding box of `labels` (None: every nonzero label) plus a margin.

    The margin is in mm on every side, turned into whole voxels per axis, and
    the box is clipped to the volume. The crop keeps the spacing and direction;
    its origin is the LPS centre of its first voxel.
    """
    if not mask.volume.same_grid(volume):
        raise ValueError("the mask is not on the volume's grid")
    selected = mask.volume.array > 0 if labels is None else np.isin(mask.volume.array, list(labels))
    if not selected.any():
        wanted = "any label" if labels is None else f"labels {list(labels)}"
        raise ValueError(f"the mask holds no voxel of {wanted}: nothing to crop the classifier's input to")
    margin = [int(np.ceil(margin_mm / s)) for s in volume.spacing[::-1]]  # k, j, i
    box = []
    for axis, n in enumerate(volume.shape):
        hits = np.flatnonzero(selected.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin[axis], 0), min(int(hits[-1]) + 1 + margin[axis], n)))
    start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    origin = volume.index_to_lps(start)
    return Volume(volume.array[tuple(box)], volume.spacing, tuple(float(v) for v in origin), volume.direction)


def resize(volume: Volume, size: Sequence[int]) -> Volume:
    """Resample to `size` voxels (i, j, k) over the same field of view, linearly (SimpleITK).

    The new voxels tile the old extent exactly: spacing scales by old/new
    count and the first centre moves by half the change of spacing.
    """
    old_size = np.array(volume.shape[::-1], dtype=np.float64)
    new_size = np.array([int(s) for s in size])
    spacing = np.asarray(volume.spacing) * old_size / new_size
    origin = volume.index_to_lps(np.zeros(3)) + np.asarray(volume.direction) @ ((spacing - np.asarray(volume.spacing)) / 2)
    source = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    resampled = sitk.Resample(
        source, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear,
        tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
        tuple(float(v) for v in np.asarray(volume.direction).ravel()), 0.0, sitk.sitkFloat32,
    )
    return Volume.from_sitk(resampled)


def classifier_input(cropped: Volume, input_size: Sequence[int], window: Sequence[float],
                     layout: str = "NCXYZ") -> np.ndarray:
    """The float32 tensor a classifier takes: resized to `input_size` [X, Y, Z], windowed to [0, 1].

    `window` [lo, hi] in HU is clipped and scaled linearly to [0, 1]. `layout`
    names the tensor's axes with N (batch), C (channel), X, Y, Z (the volume's
    i, j, k), e.g. "NCXYZ" for MONAI/Clara models or "NZYXC" channels-last.
    """
    if sorted(layout) != sorted(AXES):
        raise ValueError(f"layout {layout!r} must order the axes {AXES} (batch, channel, X, Y, Z)")
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window {list(window)} must be [low, high] with high > low")
    array = resize(cropped, input_size).array  # [Z, Y, X]
    scaled = (np.clip(array, lo, hi) - lo) / (hi - lo)
    tensor = scaled.transpose(2, 1, 0)[None, None]  # N, C, X, Y, Z
    return np.ascontiguousarray(tensor.transpose([AXES.index(axis) for axis in layout]), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum so large logits do not overflow."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
