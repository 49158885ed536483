"""The spleen task (embedded backend): the recipe works, any tensor layout, tiling, mapping back, post-processing.

Dice >= 0.75 against TotalSegmentator says the recipe works on the real
series; that the node implements MONAI's recipe exactly is
tests/test_monai_fidelity.py's job (MONAI itself as the reference).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from onnx import helper

from inference import tasks
from inference.backends import BackendSettings, open_backend
from inference.repository import ModelRepository, SlidingWindow
from inference.sliding_window import importance_map, patch_starts, sliding_window_inference
from inference.transforms import to_model_space, to_source_grid
from inference.volume import Volume
from tests.model_repository import SPLEEN_ONNX, install_spleen_model
from tests.peers import CT_J2K_SERIES, SHARED_DATA
from tests.volumes import dice, read_series

TOTALSEGMENTATOR_SPLEEN = SHARED_DATA / "ct" / "abdomen_siemens_20slices_spleen_ref_lpsgrid.nii.gz"


def make_repository(root):
    install_spleen_model(root)
    return ModelRepository(root)



@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_series(CT_J2K_SERIES)


@pytest.fixture(scope="module")
def embedded_mask(ct, tmp_path_factory):
    repository = make_repository(tmp_path_factory.mktemp("models"))
    backend = open_backend(BackendSettings(kind="embedded", cpu_threads=2))
    entry = repository.get("spleen_ct")
    backend.check(entry)
    return tasks.segment(ct, entry, backend)


def test_spleen_matches_totalsegmentator(ct, embedded_mask):
    mask = embedded_mask.volume.array
    assert embedded_mask.volume.same_grid(ct) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    (segment,) = embedded_mask.segments
    assert (segment.value, segment.type.value, segment.category.value) == (1, "78961009", "123037004")
    assert embedded_mask.algorithm.name == "MONAI spleen UNet (demo)"
    totalsegmentator = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEGMENTATOR_SPLEEN))) == 1
    assert dice(mask > 0, totalsegmentator) >= 0.75
    # One 26-connected component (largest_component: true, MONAI's default connectivity).
    assert int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask), True)).max()) == 1


def test_channels_last_zyx_model_gives_the_same_mask(ct, embedded_mask, tmp_path):
    """The same network wrapped to take NZYXC and return NZYXC: pipeline.yaml's layout does the rest."""
    model = onnx.load(str(SPLEEN_ONNX))
    graph = model.graph
    inner_in, inner_out = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.input[:] = ["inner_in" if name == inner_in else name for name in node.input]
        node.output[:] = ["inner_out" if name == inner_out else name for name in node.output]
    graph.node.insert(0, helper.make_node("Transpose", ["volume"], ["inner_in"], perm=[0, 4, 3, 2, 1]))
    graph.node.append(helper.make_node("Transpose", ["inner_out"], ["logits"], perm=[0, 4, 3, 2, 1]))
    del graph.input[:], graph.output[:]
    graph.input.append(helper.make_tensor_value_info("volume", onnx.TensorProto.FLOAT, ["n", "z", "y", "x", 1]))
    graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", "z", "y", "x", 2]))
    repository = make_repository(tmp_path)
    entry_dir = tmp_path / "spleen_ct"
    onnx.save(model, str(entry_dir / "1" / "model.onnx"))
    config = (entry_dir / "config.pbtxt").read_text()
    (entry_dir / "config.pbtxt").write_text(
        config.replace('"INPUT__0"', '"volume"').replace('"OUTPUT__0"', '"logits"')
        .replace("[ -1, 1, -1, -1, -1 ]", "[ -1, -1, -1, -1, 1 ]").replace("[ -1, 2, -1, -1, -1 ]", "[ -1, -1, -1, -1, 2 ]"))
    pipeline = (entry_dir / "pipeline.yaml").read_text()
    (entry_dir / "pipeline.yaml").write_text(
        pipeline.replace("name: INPUT__0 ", "name: volume ").replace("name: OUTPUT__0", "name: logits")
        .replace("layout: NCXYZ", "layout: NZYXC"))
    entry = repository.get("spleen_ct")
    assert entry.pipeline.input_layout == "NZYXC"
    backend = open_backend(BackendSettings(kind="embedded", cpu_threads=2))
    backend.check(entry)
    mask = tasks.segment(ct, entry, backend).volume.array
    assert dice(mask > 0, embedded_mask.volume.array > 0) >= 0.999


def test_tiling_covers_the_volume_and_blends_exactly():
    """An identity 'model' must come back unchanged: every voxel covered, padding cropped, weights normalised."""
    assert patch_starts(200, 96, 0.25) == [0, 72, 104]
    assert patch_starts(96, 96, 0.25) == [0] and patch_starts(97, 96, 0.5) == [0, 1]
    weights = importance_map((96, 96, 96), SlidingWindow(roi_size=(96, 96, 96)))
    assert weights[48, 48, 48] > 0.99 and weights[0, 0, 0] == pytest.approx(1e-3, rel=0.01)
    calls = []

    def echo(batch):
        calls.append(batch.shape)
        return np.concatenate([batch, -batch], axis=1)

    image = np.random.default_rng(1).random((150, 70, 33), dtype=np.float32)
    window = SlidingWindow(roi_size=(64, 64, 32), overlap=0.5, batch_size=3)
    out = sliding_window_inference(image, window, echo)
    assert out.shape == (2, 150, 70, 33)
    np.testing.assert_allclose(out[0], image, rtol=1e-5)
    np.testing.assert_allclose(out[1], -image, rtol=1e-5)
    # x: starts 0,32,64,86 (4); y: 0,6 (2); z: 0,1 (2) -> 16 patches in batches of 3.
    assert [shape[0] for shape in calls] == [3, 3, 3, 3, 3, 1]
    assert all(shape[1:] == (1, 64, 64, 32) for shape in calls)
    small = np.ones((10, 20, 30), np.float32)
    np.testing.assert_allclose(sliding_window_inference(small, window, echo)[0], small)


def _blend_over_the_padded_volume(image, window, predict):
    """The scheme spelt out: pad with zeros, predict one patch at a time, blend over everything, crop."""
    roi = window.roi_size
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(image.shape, roi)]
    padded = np.pad(image, pads)
    weights = importance_map(roi, window)
    sums, total = None, np.zeros(padded.shape)
    for corner in itertools.product(*(patch_starts(n, r, window.overlap) for n, r in zip(padded.shape, roi))):
        box = tuple(slice(c, c + r) for c, r in zip(corner, roi))
        prediction = predict(padded[box][None, None])[0]
        sums = np.zeros((len(prediction), *padded.shape)) if sums is None else sums
        sums[(slice(None), *box)] += prediction * weights
        total[box] += weights
    return (sums / total)[(slice(None), *(slice(a, a + n) for (a, _), n in zip(pads, image.shape)))]


@pytest.mark.parametrize("shape, roi, overlap, batch_size", [
    ((30, 12, 7), (16, 16, 16), 0.25, 4),  # smaller than the ROI along y and z, as a short series is along z
    ((5, 6, 40), (16, 16, 16), 0.5, 3),  # smaller along x and y, tiled along z
    ((9, 9, 9), (16, 16, 16), 0.25, 2),  # one patch, mostly padding
])
def test_patches_over_the_padding_see_zeros_there_and_their_predictions_blend_as_over_the_padded_volume(
        shape, roi, overlap, batch_size):
    """A model whose every output voxel depends on the whole patch, padding included, gives what tiling
    the zero-padded volume gives, though the node never holds the padded volume or its blend."""
    def whole_patch(batch):  # channel 0: the voxel plus its patch's mean; channel 1: the patch's largest value
        means = batch.mean(axis=(2, 3, 4), keepdims=True)
        peaks = np.broadcast_to(batch.max(axis=(2, 3, 4), keepdims=True), batch.shape)
        return np.concatenate([batch + means, peaks], axis=1)

    image = np.random.default_rng(2).random(shape, dtype=np.float32) + 1  # no voxel is 0, as padding is
    window = SlidingWindow(roi_size=roi, overlap=overlap, batch_size=batch_size)
    fed, fed_padded = [], []

    def recording(into):
        def predict(batch):
            into.append(batch.copy())
            return whole_patch(batch)
        return predict

    out = sliding_window_inference(image, window, recording(fed))
    expected = _blend_over_the_padded_volume(image, window, recording(fed_padded))
    assert out.shape == (2, *shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert all(len(batch) <= batch_size for batch in fed)
    np.testing.assert_array_equal(np.concatenate(fed), np.concatenate(fed_padded))  # patch for patch, in order


def test_model_space_round_trip_on_a_flipped_anisotropic_grid(tmp_path):
    """A cube found on the model's RAS grid lands back on the source voxels of a grid stored S->I, R->L."""
    array = np.full((40, 50, 60), -1000, np.int16)  # [k, j, i]
    array[10:30, 15:35, 20:45] = 300
    direction = np.diag([-1.0, 1.0, -1.0])  # i runs to the right, k runs inferior
    volume = Volume(array, (0.8, 0.9, 2.5), (10.0, -20.0, 300.0), direction)
    from inference.repository import Preprocessing

    space = to_model_space(volume, Preprocessing(orientation="RAS", spacing=(1.5, 1.5, 2.0), window=(-57, 164)))
    assert np.allclose(np.array(space.grid.GetDirection()).reshape(3, 3), np.diag([-1.0, -1.0, 1.0]))
    assert space.grid.GetSpacing() == (1.5, 1.5, 2.0)
    assert space.array.min() == 0.0 and space.array.max() == 1.0
    inside = (space.array > 0.5).astype(np.float32)
    back = np.full(array.shape, -1)
    for values, where in to_source_grid(np.stack([1 - inside, inside]), space.grid, volume):
        back[where] = np.argmax(values, axis=0)
    assert (back >= 0).all()  # the whole grid reaches every source voxel
    assert back.shape == array.shape
    assert dice(back > 0, array > 0) > 0.9
    # The corner voxel of the cube nearest the origin is where the source put it, in patient space.
    found = np.argwhere(back)
    assert abs(found[:, 0].min() - 10) <= 1 and abs(found[:, 2].min() - 20) <= 1


def test_postprocessing_keeps_largest_component_and_fills_holes_per_label():
    from inference.repository import Postprocessing

    labels = np.zeros((20, 30, 40), np.uint8)
    labels[5:15, 5:20, 5:20] = 1
    labels[9:11, 11:13, 11:13] = 0  # enclosed hole in label 1
    labels[16:18, 25:28, 30:33] = 1  # a second, smaller label-1 island
    labels[15, 20, 20] = 1  # touches the block by a corner only: one component (26-connected, as MONAI's default)
    labels[0:6, 22:30, 30:40] = 2  # label 2 touches the volume's faces...
    labels[2:4, 25:27, 34:36] = 0  # ...and has its own enclosed hole
    labels[18:20, 0:2, 0:2] = 2  # small label-2 island
    out = tasks.postprocess(labels.copy(), Postprocessing(largest_component=True, fill_holes=(1,)), [1, 2])
    assert (out[9:11, 11:13, 11:13] == 1).all()  # hole filled
    assert (out[16:18, 25:28, 30:33] == 0).all() and (out[18:20, 0:2, 0:2] == 0).all()  # islands gone
    assert (out[2:4, 25:27, 34:36] == 0).all()  # label 2 is not in fill_holes
    assert out[15, 20, 20] == 1
    assert (out == 1).sum() == 10 * 15 * 15 + 1 and (out == 2).sum() == 6 * 8 * 10 - 8
    untouched = tasks.postprocess(labels.copy(), Postprocessing(), [1, 2])
    np.testing.assert_array_equal(untouched, labels)


@pytest.mark.parametrize("post", [{"discretize": "argmax"}, {"discretize": "threshold", "threshold": 0.7}],
                         ids=["softmax argmax", "sigmoid threshold"])
def test_labels_found_from_logits_are_those_of_the_probabilities(post):
    """The voxels mapped back to the source are picked from the logits, before any probability is
    computed: every voxel the probabilities label is among them, and so is nothing else but ties."""
    from inference.repository import Postprocessing

    post = Postprocessing(**post)
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 3, (3, 40, 30, 20)).astype(np.float32)
    logits[1, :5] = logits[0, :5]  # exact ties: argmax gives them to the background
    logits[2, 5:10] = logits[0, 5:10] + np.float32(1e-6)  # wins on the logits, a tie or not after softmax
    logits[:, 10:15] = np.float32(np.log(0.7 / 0.3))  # sigmoid exactly on the threshold, give or take rounding
    logits[:, 15:20] += 200  # large logits: softmax subtracts the maximum, sigmoid rounds to 1
    found = tasks.found(logits, post)
    labelled = tasks.winners(tasks.activate(logits.copy(), post), post) > 0
    assert labelled.any() and (~labelled).any()
    assert not (labelled & ~found).any()  # never one fewer
    extra = found & ~labelled
    assert extra.any()  # the cases made above, or this checks nothing
    if post.discretize == "argmax":  # where a channel ties with the background
        near = logits[1:].max(axis=0) - logits[0] <= 1e-5
    else:  # where the best channel is within the margin of the threshold's logit
        near = np.abs(logits.max(axis=0) - np.log(0.7 / 0.3)) <= 1e-3
    assert not (extra & ~near).any()  # elsewhere, the same voxels
