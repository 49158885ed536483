"""The two model tasks the node runs: segment a volume, classify a masked region.

Both read how to feed the model from its pipeline.yaml and talk to it only
through a `Backend`, so the same code runs a model in-process or on Triton.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from inference import transforms
from inference.backends import Backend
from inference.classify import classifier_input, crop_to_mask, softmax
from inference.repository import AXES, ModelEntry, Postprocessing
from inference.results import ClassProbabilities, LabelMap
from inference.sliding_window import sliding_window_inference
from inference.volume import Volume


def segment(volume: Volume, entry: ModelEntry, backend: Backend) -> LabelMap:
    """Label map of `volume` on its own grid: model space, sliding window, labels, back, post-processing."""
    spec = entry.pipeline
    if spec.task != "segmentation" or spec.sliding_window is None:
        raise ValueError(f"model {entry.name!r} is a {spec.task} model, not a segmentation model")
    to_model = [AXES.index(axis) for axis in spec.input_layout]
    from_model = [spec.output_layout.index(axis) for axis in AXES]

    def predict(batch: np.ndarray) -> np.ndarray:
        tensor = np.ascontiguousarray(batch.transpose(to_model))
        outputs = backend.infer(entry, {spec.input.name: tensor})
        return outputs[spec.output.name].transpose(from_model)

    values = [label.value for label in spec.labels]
    labels = postprocess(_source_labels(volume, entry, predict), spec.postprocessing, values)
    return LabelMap(volume.with_array(labels), spec.segment_labels(), entry.algorithm)


def _source_labels(volume: Volume, entry: ModelEntry, predict) -> np.ndarray:
    """Labels on the volume's grid, in the MONAI recipe's order: probabilities on the model grid, each
    channel resampled linearly back to the source voxels (Invertd), then discretized there.

    Only source voxels near labels the model grid already shows are
    resampled: where every interpolation neighbour is background, the
    interpolated probabilities are too (a convex combination keeps the
    background ahead), so the source voxel is. Those labels come from the
    logits (`found`), so probabilities are computed only for the model
    voxels that are mapped back, not for the whole grid.
    """
    spec = entry.pipeline
    post = spec.postprocessing
    space = transforms.to_model_space(volume, spec.preprocessing)
    grid = space.grid
    logits = sliding_window_inference(space.array, spec.sliding_window, predict)
    del space  # the model-space image: not needed past inference
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for on_source, where in transforms.to_source_grid(logits, grid, volume, needed=found(logits, post),
                                                      convert=lambda crop: activate(crop.copy(), post)):
        labels[where] = winners(on_source, post)
    return declared(labels, [label.value for label in spec.labels])


def found(logits: np.ndarray, post: Postprocessing) -> np.ndarray:
    """Model voxels [...] whose label is not background, read from the [channel, ...] logits.

    Softmax and sigmoid keep each voxel's channels in the order of their
    logits, so this is `winners(activate(logits)) > 0`, except that where
    rounding makes two probabilities equal or puts one on the threshold, it
    counts the voxel as found: it may find a voxel more, never one fewer.
    """
    if post.discretize == "argmax":  # some channel beats the background; a tie goes to the background
        return logits[1:].max(axis=0) >= logits[0]
    # sigmoid(x) >= t exactly where x >= log(t / (1 - t)); the margin covers float32 rounding near it.
    return logits.max(axis=0) >= np.float32(np.log(post.threshold / (1 - post.threshold)) - 1e-3)


def activate(logits: np.ndarray, post: Postprocessing) -> np.ndarray:
    """[channel, ...] logits to probabilities, in place: softmax over channels for argmax, sigmoid for threshold."""
    if post.discretize == "argmax":
        logits -= logits.max(axis=0, keepdims=True)  # no overflow in exp
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0, keepdims=True)
    else:
        np.negative(logits, out=logits)
        with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative logits: probability 0, as it should be
            np.exp(logits, out=logits)
        logits += 1
        np.reciprocal(logits, out=logits)
    return logits


def winners(probabilities: np.ndarray, post: Postprocessing) -> np.ndarray:
    """[channel, ...] probabilities to uint8 labels (0 = none).

    argmax: channel c is label c (channel 0 background), ties to the lower
    channel as in numpy and torch. threshold: channel c is label c + 1, a
    voxel takes the most probable channel at or above the threshold.
    """
    best = np.argmax(probabilities, axis=0).astype(np.uint8)
    if post.discretize == "argmax":
        return best
    above = np.take_along_axis(probabilities, best[None].astype(np.intp), axis=0)[0] >= post.threshold
    return np.where(above, best + 1, 0).astype(np.uint8)


def declared(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Only the labels pipeline.yaml declares survive; any other channel's voxels become background."""
    kept = np.zeros(max(int(labels.max()), max(values)) + 1, dtype=np.uint8)
    kept[values] = values
    return kept[labels]


def postprocess(labels: np.ndarray, post: Postprocessing, values: list[int]) -> np.ndarray:
    """Keep the largest connected component and fill holes, per label, as pipeline.yaml asks.

    Components are 26-connected (face, edge or corner neighbours), as in
    MONAI's KeepLargestConnectedComponent with its default connectivity.
    Each label is processed inside its bounding box plus one background voxel,
    which gives the same components and holes as the whole grid at a fraction
    of the memory (connected-component images are 32-bit).
    """
    largest = values if post.largest_component is True else list(post.largest_component or ())
    holes = values if post.fill_holes is True else list(post.fill_holes or ())
    for value in values:
        if value not in largest and value not in holes:
            continue
        box = transforms.bounding_box(labels == value, margin=1)
        if box is None:
            continue
        region = labels[box]  # a view: writes land in `labels`
        mask = region == value
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        if value in largest:
            image = sitk.RelabelComponent(sitk.ConnectedComponent(image, True)) == 1
        if value in holes:
            image = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
        kept = sitk.GetArrayViewFromImage(image).astype(bool)
        region[mask & ~kept] = 0
        region[kept & (region == 0)] = value
    return labels



def classify(volume: Volume, mask: LabelMap, entry: ModelEntry, backend: Backend) -> ClassProbabilities:
    """Class probabilities of the region `mask` marks: crop + margin, resize, window, softmax."""
    spec = entry.pipeline
    recipe = spec.classification
    if spec.task != "classification" or recipe is None:
        raise ValueError(f"model {entry.name!r} is a {spec.task} model, not a classifier")
    cropped = crop_to_mask(volume, mask, recipe.mask_labels, recipe.crop_margin_mm)
    tensor = classifier_input(cropped, recipe.input_size, recipe.window, spec.input_layout)
    output = backend.infer(entry, {spec.input.name: tensor})[spec.output.name]
    logits = np.asarray(output).transpose([spec.output_layout.index(axis) for axis in "NC"])[0]
    if logits.shape != (len(recipe.classes),):
        raise ValueError(f"model {entry.name!r} returned {logits.size} scores for {len(recipe.classes)} classes")
    probabilities = softmax(logits) if recipe.activation == "softmax" else logits
    return ClassProbabilities(recipe.labels(), tuple(float(p) for p in probabilities), entry.algorithm)
