"""Sliding-window inference: one routine for every segmentation model.

The volume is tiled by ROI-sized patches that overlap by the configured
fraction (MONAI's `sliding_window_inference` scheme: interval
`int(roi * (1 - overlap))`, the last patch flush with the far edge), patches
go to the model `batch_size` at a time, and overlapping predictions are
blended with a Gaussian importance map (centre voxels of a patch are trusted
more than its borders) or uniformly. A volume smaller than the ROI is padded
symmetrically with zeros first and cropped back afterwards.
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
    """
    roi = tuple(int(r) for r in window.roi_size)
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(image.shape, roi)]
    padded = np.pad(image, pads) if any(any(p) for p in pads) else image
    weights = importance_map(roi, window)
    corners = list(itertools.product(*(patch_starts(n, r, window.overlap) for n, r in zip(padded.shape, roi))))
    blended: np.ndarray | None = None
    weighted: np.ndarray | None = None  # one patch's weighted prediction, a buffer reused for every patch
    total = np.zeros(padded.shape, dtype=np.float32)
    for first in range(0, len(corners), window.batch_size):
        batch = corners[first:first + window.batch_size]
        boxes = [tuple(slice(c, c + r) for c, r in zip(corner, roi)) for corner in batch]
        predictions = predict(np.stack([padded[box] for box in boxes])[:, None])
        if predictions.shape[0] != len(boxes) or predictions.shape[2:] != roi:
            raise ValueError(f"the model returned shape {list(predictions.shape)} for {len(boxes)} patches of {list(roi)}")
        if blended is None:
            blended = np.zeros((predictions.shape[1], *padded.shape), dtype=np.float32)
            weighted = np.empty((predictions.shape[1], *roi), dtype=np.float32)
        for box, prediction in zip(boxes, predictions):
            np.multiply(prediction, weights, out=weighted)
            blended[(slice(None), *box)] += weighted
            total[box] += weights
    blended /= total
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, image.shape))
    return blended[(slice(None), *crop)]
