"""Classifier feeding (crop by mask, resize, window, layout, softmax) with test-built ONNX models.

No public COVID-19 weights exist, so the models here are made with onnx's
helper API: their logits are a known function of the input tensor, and the
probabilities the node reports must equal that function computed in numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference.classify import classifier_input, crop_to_mask, resize, softmax
from inference.lung import segment_lungs_classical
from inference.results import Algorithm, LabelMap
from inference.volume import Volume
from tests.phantoms import chest_phantom

ALGORITHM = Algorithm("test", "1")


def mean_classifier(path, input_shape, weights, bias, input_name="INPUT__0", output_name="OUTPUT__0") -> None:
    """ONNX model: logits = mean(input) * weights + bias (GlobalAveragePool -> Flatten -> Gemm)."""
    classes = len(weights)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "B"], [output_name]),
        ],
        "mean_classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [input_shape[0], classes])],
        [numpy_helper.from_array(np.asarray([weights], np.float32), "W"),
         numpy_helper.from_array(np.asarray(bias, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def grid(shape, spacing=(1.0, 2.0, 3.0), origin=(10.0, -20.0, 30.0), direction=None) -> Volume:
    array = np.zeros(shape, np.int16)
    return Volume(array, spacing, origin, np.eye(3) if direction is None else direction)


def test_crop_box_is_mask_box_plus_margin_clipped():
    volume = grid((20, 30, 40))
    volume = volume.with_array(np.arange(volume.array.size, dtype=np.int16).reshape(volume.shape) % 1000)
    labels = np.zeros(volume.shape, np.uint8)
    labels[5:9, 10:12, 1:30] = 1   # k 5..8, j 10..11, i 1..29
    labels[12, 20, 35] = 2
    mask = LabelMap(volume.with_array(labels), (), ALGORITHM)
    # margin 5 mm: 5 voxels in i (1 mm), 3 in j (2 mm), 2 in k (3 mm); i clips at 0.
    cropped = crop_to_mask(volume, mask, [1], margin_mm=5.0)
    assert cropped.shape == (8 + 2 - (5 - 2) + 1, 11 + 3 - (10 - 3) + 1, 29 + 5 + 1)
    assert np.array_equal(cropped.array, volume.array[3:11, 7:15, 0:35])
    assert np.allclose(cropped.origin, (10.0 + 0 * 1.0, -20.0 + 7 * 2.0, 30.0 + 3 * 3.0))
    assert cropped.spacing == volume.spacing
    # None means every nonzero label: the box grows to label 2 and clips at the far i edge.
    everything = crop_to_mask(volume, mask, None, margin_mm=5.0)
    assert everything.shape == (12 + 2 - 3 + 1, 20 + 3 - 7 + 1, 40)
    with pytest.raises(ValueError, match="no voxel of labels \\[3\\]"):
        crop_to_mask(volume, mask, [3], margin_mm=5.0)


def test_crop_origin_follows_direction():
    flipped = np.diag([-1.0, 1.0, -1.0])
    volume = grid((10, 10, 10), direction=flipped)
    labels = np.zeros(volume.shape, np.uint8)
    labels[4, 5, 6] = 1
    cropped = crop_to_mask(volume, LabelMap(volume.with_array(labels), (), ALGORITHM), None, 0.0)
    assert cropped.shape == (1, 1, 1)
    assert np.allclose(cropped.origin, volume.index_to_lps(np.array([6, 5, 4])))


def test_resize_keeps_field_of_view_and_linear_values():
    volume = grid((8, 12, 16), spacing=(1.0, 1.0, 2.0))
    i = np.arange(16, dtype=np.float32)
    volume = Volume(np.broadcast_to(i * 10.0, (8, 12, 16)).astype(np.float32), volume.spacing, volume.origin, volume.direction)
    resized = resize(volume, (8, 6, 4))
    assert resized.shape == (4, 6, 8)
    assert np.allclose(resized.spacing, (2.0, 2.0, 4.0))
    # First voxel centre sits half a new voxel inside the old first voxel's outer edge.
    assert np.allclose(resized.origin, (10.0 + 0.5, -20.0 + 0.5, 30.0 + 1.0))
    # A ramp in i stays the ramp at the new centres (linear interpolation is exact inside).
    new_i = (np.arange(8) * 2.0 + 0.5)
    assert np.allclose(resized.array[0, 0], new_i * 10.0, atol=1e-3)


@pytest.mark.parametrize("layout,shape", [("NCXYZ", (1, 1, 24, 20, 8)), ("NZYXC", (1, 8, 20, 24, 1))])
def test_classifier_input_shape_window_and_layout(layout, shape):
    volume = grid((16, 40, 48), spacing=(1.0, 1.0, 1.0))
    i = np.arange(48, dtype=np.float32)
    hu = np.broadcast_to(-1000.0 + i * 40.0, volume.shape).astype(np.float32)  # -1000 .. 880 along x
    tensor = classifier_input(volume.with_array(hu), (24, 20, 8), (-1000.0, 0.0), layout)
    assert tensor.shape == shape and tensor.dtype == np.float32
    assert tensor.min() >= 0.0 and tensor.max() == 1.0
    x_profile = tensor.reshape(shape).transpose([layout.index(a) for a in "NCXYZ"])[0, 0, :, 0, 0]
    assert np.all(np.diff(x_profile) >= 0) and x_profile[0] < 0.05 and x_profile[-1] == 1.0
    with pytest.raises(ValueError, match="layout"):
        classifier_input(volume.with_array(hu), (24, 20, 8), (-1000.0, 0.0), "NCXY")


def test_softmax_matches_definition_and_survives_large_logits():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]])
    probabilities = softmax(logits)
    assert np.allclose(probabilities[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    assert np.allclose(probabilities[1], [0.5, 0.5, 0.0])


def test_lung_crop_through_onnx_classifier_gives_analytic_probabilities(tmp_path):
    """Phantom -> classical lungs -> crop -> 192x192x64 tensor -> ONNX Runtime -> softmax."""
    phantom = chest_phantom()
    lungs = segment_lungs_classical(phantom.volume)
    cropped = crop_to_mask(phantom.volume, lungs, None, margin_mm=10.0)
    # The crop is the lungs' box (truth) plus 10 mm, within the body.
    truth = phantom.right_lung | phantom.left_lung
    ks, js, is_ = (np.flatnonzero(truth.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    expected_i = min(is_[-1] + 5, phantom.volume.shape[2] - 1) - max(is_[0] - 4, 0) + 1
    assert abs(cropped.shape[2] - expected_i) <= 2
    assert abs(cropped.shape[0] - (ks[-1] - ks[0] + 1 + 6)) <= 2

    model = tmp_path / "model.onnx"
    mean_classifier(model, [1, 1, 192, 192, 64], weights=[-4.0, 6.0], bias=[1.0, -0.5])
    tensor = classifier_input(cropped, (192, 192, 64), (-1000.0, 200.0), "NCXYZ")
    assert tensor.shape == (1, 1, 192, 192, 64)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["OUTPUT__0"], {"INPUT__0": tensor})
    probabilities = softmax(logits)[0]
    mean = float(tensor.astype(np.float64).mean())
    # float32 pooling over 2.4 M voxels differs from the float64 mean by ~1e-5 in the mean.
    assert np.allclose(probabilities, softmax(np.array([-4.0 * mean + 1.0, 6.0 * mean - 0.5])), atol=5e-4)
    assert probabilities.sum() == pytest.approx(1.0)
