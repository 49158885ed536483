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
    labels, grid = _model_grid_labels(volume, entry, predict)
    labels = postprocess(transforms.to_source_grid(labels, grid, volume), spec.postprocessing, values)
    return LabelMap(volume.with_array(labels), spec.segment_labels(), entry.algorithm)


def _model_grid_labels(volume: Volume, entry: ModelEntry, predict) -> tuple[np.ndarray, sitk.Image]:
    """Labels on the model's grid, and that grid; the model-space image and logits die on return."""
    spec = entry.pipeline
    space = transforms.to_model_space(volume, spec.preprocessing)
    logits = sliding_window_inference(space.array, spec.sliding_window, predict)
    return discretize(logits, spec.postprocessing, [label.value for label in spec.labels]), space.grid


def discretize(logits: np.ndarray, post: Postprocessing, values: list[int]) -> np.ndarray:
    """[channel, ...] logits to uint8 labels; only the labels pipeline.yaml declares survive.

    argmax: channel c is label c (channel 0 background). threshold: sigmoid,
    channel c is label c + 1, a voxel takes the most probable channel at or
    above the threshold.
    """
    if post.discretize == "argmax":
        labels = np.argmax(logits, axis=0).astype(np.uint8)
    else:
        best = np.argmax(logits, axis=0)
        # sigmoid(x) >= t  <=>  x >= logit(t): compare logits, no exp over the volume.
        above = np.take_along_axis(logits, best[None], axis=0)[0] >= np.log(post.threshold / (1 - post.threshold))
        labels = np.where(above, best + 1, 0)
    declared = np.zeros(max(int(labels.max()), max(values)) + 1, dtype=np.uint8)
    declared[values] = values
    return declared[labels]


def postprocess(labels: np.ndarray, post: Postprocessing, values: list[int]) -> np.ndarray:
    """Keep the largest connected component and fill holes, per label, as pipeline.yaml asks.

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
            image = sitk.RelabelComponent(sitk.ConnectedComponent(image)) == 1
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
