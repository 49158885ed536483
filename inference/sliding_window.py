"""Sliding-window inference: one routine for every segmentation model.

The volume is tiled by ROI-sized patches that overlap by the configured
fraction (MONAI's `sliding_window_inference` scheme: interval
`int(roi * (1 - overlap))`, the last patch flush with the far edge), patches
go to the model `batch_size` at a time, and overlapping predictions are
blended with a Gaussian importance map (centre voxels of a patch are trusted
more than its borders) or uniformly. A volume smaller than the ROI is tiled
as if padded symmetrically with zeros; the result covers the volume alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from inference.repository import SlidingWindow

Predict = Callable[[np.ndarray], np.ndarray]


def patch_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices along one axis of a (padded) size >= roi."""
    if size <= roi:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    count = math.ceil((size - roi) / interval) + 1
    return sorted({min(n * interval, size - roi) for n in range(count)})


def importance_map(roi: tuple[int, int, int], window: SlidingWindow) -> np.ndarray:
    """Per-voxel weight of a patch's prediction: separable Gaussian (sigma = sigma_scale * roi) or ones.

    As MONAI's compute_importance_map computes it, in float32: the Gaussian is
    not normalised (only ratios of weights matter) and is clamped to at least
    1e-3, so border voxels keep a little weight and no sum comes near zero.
    """
    if window.blending == "constant":
        return np.ones(roi, dtype=np.float32)
    weights = None
    for n in roi:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        x = np.exp(x ** 2 / np.float32(-2 * (n * window.sigma_scale) ** 2), dtype=np.float32)
        weights = x if weights is None else weights[..., None] * x
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window_inference(image: np.ndarray, window: SlidingWindow, predict: Predict) -> np.ndarray:
    """Blend `predict` over ROI patches of `image` [x, y, z]; returns [channel, x, y, z] float32.

    `predict` takes a batch [n, 1, *roi] (NCXYZ) and returns [n, channels, *roi].

    The tiling is over the zero-padded volume, as MONAI's, but neither the
    padded volume nor the blend of the padding is ever held: each patch is
    filled from the part of the image it covers (zeros elsewhere), and only
    the predictions over the image are weighted and summed. The sums are
    those of blending everything and cropping, term for term. A short series
    is mostly padding along z (20 slices 2 mm apart fill 20 of a 96-voxel
    ROI), so this keeps the arrays the size of the image, not of the ROI.
    """
    roi = tuple(int(r) for r in window.roi_size)
    before = [max(r - n, 0) // 2 for n, r in zip(image.shape, roi)]
    padded = [max(n, r) for n, r in zip(image.shape, roi)]
    weights = importance_map(roi, window)
    corners = list(itertools.product(*(patch_starts(n, r, window.overlap) for n, r in zip(padded, roi))))
    # Along an axis the image is shorter than the ROI on, every patch holds the whole image at the same
    # offset, so the buffer's padding is written by no patch and stays zero from batch to batch.
    patches = np.zeros((min(window.batch_size, len(corners)), 1, *roi), dtype=np.float32)
    blended: np.ndarray | None = None
    weighted: np.ndarray | None = None  # one patch's weighted prediction, a buffer reused for every patch
    total = np.zeros(image.shape, dtype=np.float32)
    for first in range(0, len(corners), window.batch_size):
        batch = corners[first:first + window.batch_size]
        overlaps = [_overlap(corner, roi, before, image.shape) for corner in batch]
        for patch, (in_patch, in_image) in zip(patches, overlaps):
            patch[(0, *in_patch)] = image[in_image]
        predictions = predict(patches[:len(batch)])
        if predictions.shape[0] != len(batch) or predictions.shape[2:] != roi:
            raise ValueError(f"the model returned shape {list(predictions.shape)} for {len(batch)} patches of {list(roi)}")
        if blended is None:
            blended = np.zeros((predictions.shape[1], *image.shape), dtype=np.float32)
            weighted = np.empty((predictions.shape[1], *roi), dtype=np.float32)
        for (in_patch, in_image), prediction in zip(overlaps, predictions):
            patch_weights = weights[in_patch]
            part = weighted[(slice(None), *in_patch)]
            np.multiply(prediction[(slice(None), *in_patch)], patch_weights, out=part)
            blended[(slice(None), *in_image)] += part
            total[in_image] += patch_weights
    blended /= total
    return blended


def _overlap(corner: tuple[int, ...], roi: tuple[int, ...], before: list[int],
             shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of the patch at `corner` (padded coordinates) that lies on the image: as slices of the
    patch and of the image."""
    in_patch, in_image = [], []
    for start, size, pad, extent in zip(corner, roi, before, shape):
        first, last = max(start, pad), min(start + size, pad + extent)
        in_patch.append(slice(first - start, last - start))
        in_image.append(slice(first - pad, last - pad))
    return tuple(in_patch), tuple(in_image)
