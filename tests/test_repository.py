"""Model repository reading: Triton's config.pbtxt, our pipeline.yaml, located errors, embedded checks."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from inference.backends import BackendError, BackendSettings, open_backend
from inference.repository import ModelRepository, RepositoryError, parse_config_pbtxt
from tests.model_repository import install_spleen_model



@pytest.fixture
def repo(tmp_path):
    """A repository holding the committed spleen_ct entry plus the shared demo weights."""
    install_spleen_model(tmp_path)
    return tmp_path


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def line_of(path, fragment):
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def test_spleen_entry_is_the_monai_recipe(repo):
    entry = ModelRepository(repo).get("spleen_ct")
    assert entry.platform == "onnxruntime_onnx" and entry.version == 1
    assert entry.version_path == repo / "spleen_ct" / "1" / "model.onnx"
    assert [(t.name, t.data_type, t.dims) for t in entry.config.inputs] == [("INPUT__0", "TYPE_FP32", (-1, 1, -1, -1, -1))]
    assert [(t.name, t.dims) for t in entry.config.outputs] == [("OUTPUT__0", (-1, 2, -1, -1, -1))]
    spec = entry.pipeline
    assert spec.task == "segmentation" and spec.input_layout == spec.output_layout == "NCXYZ"
    assert spec.preprocessing.orientation == "RAS" and spec.preprocessing.spacing == (1.5, 1.5, 2.0)
    assert spec.preprocessing.window == (-57.0, 164.0) and spec.preprocessing.scale == (0.0, 1.0)
    assert spec.sliding_window.roi_size == (96, 96, 96) and spec.sliding_window.overlap == 0.25
    assert spec.postprocessing.discretize == "argmax" and spec.postprocessing.largest_component is True
    (label,) = spec.segment_labels()
    assert (label.value, label.type.value, label.type.scheme, label.category.value) == (1, "78961009", "SCT", "123037004")
    assert list(ModelRepository(repo).models) == ["spleen_ct"]


def test_errors_name_file_line_and_key(repo):
    pipeline = repo / "spleen_ct" / "pipeline.yaml"
    edit(pipeline, "overlap: 0.25", "overlap: 1.5")
    edit(pipeline, "blending: gaussian", "blending: gaussian\n  stride: 4")
    edit(pipeline, "orientation: RAS", "orientation: RRS")
    with pytest.raises(RepositoryError) as caught:
        ModelRepository(repo).get("spleen_ct")
    problems = str(caught.value).splitlines()
    assert f"{pipeline}:{line_of(pipeline, 'overlap:')} sliding_window.overlap: Input should be less than 1" in problems
    assert f"{pipeline}:{line_of(pipeline, 'stride:')} sliding_window.stride: unknown key" in problems
    assert any(p.startswith(f"{pipeline}:{line_of(pipeline, 'orientation:')} preprocessing.orientation: ") and "R/L" in p
               for p in problems)


def test_missing_key_and_task_sections(repo):
    pipeline = repo / "spleen_ct" / "pipeline.yaml"
    edit(pipeline, "  roi_size: [96, 96, 96]", "")
    with pytest.raises(RepositoryError, match=r"pipeline.yaml:\d+ sliding_window: required key sliding_window.roi_size missing"):
        ModelRepository(repo).get("spleen_ct")
    pipeline.write_text("task: classification\ninput: {name: INPUT__0}\noutput: {name: OUTPUT__0}\n")
    with pytest.raises(RepositoryError, match="needs a classification section"):
        ModelRepository(repo).get("spleen_ct")


def test_pipeline_tensor_names_must_be_the_configs(repo):
    pipeline = repo / "spleen_ct" / "pipeline.yaml"
    edit(pipeline, "name: INPUT__0", "name: INPUT__1")
    with pytest.raises(RepositoryError) as caught:
        ModelRepository(repo).get("spleen_ct")
    assert str(caught.value) == (f"{pipeline}:{line_of(pipeline, 'INPUT__1')} input.name: "
                                 "'INPUT__1' is not an input of config.pbtxt (it has INPUT__0)")


def test_classifier_entry(repo):
    entry = repo / "covid19_ct"
    entry.mkdir()
    (entry / "config.pbtxt").write_text('name: "covid19_ct"\nbackend: "onnxruntime"\nmax_batch_size: 4\n')
    (entry / "pipeline.yaml").write_text(textwrap.dedent("""\
        task: classification
        input: {name: volume, layout: NZYXC}
        output: {name: probabilities}
        classification:
          classes:
            - {name: non-COVID}
            - name: COVID-19
              code: {value: "840539006", scheme: SCT, meaning: Disease caused by SARS-CoV-2}
          crop_margin_mm: 5
          input_size: [192, 192, 64]
          window: [-1000, 500]
          mask_labels: [1, 2]
        """))
    model = ModelRepository(repo).get("covid19_ct")
    assert model.version is None and model.version_path == entry / "1" / "model.onnx"
    spec = model.pipeline
    assert spec.input_layout == "NZYXC" and spec.output_layout == "NC"
    classes = spec.classification.labels()
    assert [c.name for c in classes] == ["non-COVID", "COVID-19"] and classes[1].code.value == "840539006"
    assert spec.classification.input_size == (192, 192, 64) and spec.classification.mask_labels == (1, 2)
    assert model.algorithm.name == "covid19_ct"


def test_config_pbtxt_reader(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(textwrap.dedent("""\
        # comment
        name: "seg"  platform: "tensorrt_plan"
        max_batch_size: 8
        input { name: "x" data_type: TYPE_FP16 format: FORMAT_NONE dims: [ 1, 96, 96, 96 ] }
        input { name: "y" dims: 3 dims: 4 }
        output [ { name: "z", data_type: TYPE_FP32, dims: [2, -1] } ]
        instance_group [ { count: 2 kind: KIND_GPU } ]
        dynamic_batching { max_queue_delay_microseconds: 100 }
        """))
    config = parse_config_pbtxt(path)
    assert (config.name, config.platform, config.max_batch_size) == ("seg", "tensorrt_plan", 8)
    assert [(t.name, t.data_type, t.dims) for t in config.inputs] == [("x", "TYPE_FP16", (1, 96, 96, 96)),
                                                                      ("y", "TYPE_FP32", (3, 4))]
    assert [(t.name, t.dims) for t in config.outputs] == [("z", (2, -1))]
    path.write_text('name: "seg" input [ { name: "x" ')
    with pytest.raises(RepositoryError, match=r"config.pbtxt:1:29: cannot read the text protobuf .*Expected \"}\""):
        parse_config_pbtxt(path)


@pytest.mark.parametrize("text, where, problem", [
    ('name: "seg"\nplatfrom: "onnxruntime_onnx"\n', "2:1", 'has no field named "platfrom"'),
    ('name: "seg"\nmax_batch_size: four\n', "2:17", "Couldn't parse integer: four"),
    ('input { name: "x"\n  data_type: TYPE_FLOAT32 }\n', "2:14", 'has no value named TYPE_FLOAT32'),
    ('name: "a"\nname: "b"\n', "2:7", 'should not have multiple "name" fields'),
])
def test_config_pbtxt_errors_are_located_as_triton_refuses_them(tmp_path, text, where, problem):
    """What Triton refuses (it reads config.pbtxt into the same message) is refused here, located."""
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    with pytest.raises(RepositoryError) as caught:
        parse_config_pbtxt(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{where}: cannot read the text protobuf (Triton's ModelConfig): ") and problem in message


def test_repository_level_errors(repo, tmp_path):
    with pytest.raises(RepositoryError, match="model 'liver' is not in the model repository"):
        ModelRepository(repo).get("liver")
    with pytest.raises(RepositoryError, match="is not a folder"):
        ModelRepository(tmp_path / "nowhere").models
    edit(repo / "spleen_ct" / "config.pbtxt", 'name: "spleen_ct"', 'name: "spleen"')
    with pytest.raises(RepositoryError, match="differs from its folder 'spleen_ct'"):
        ModelRepository(repo).get("spleen_ct")


def test_embedded_backend_checks_and_runs(repo):
    repository = ModelRepository(repo)
    backend = open_backend(BackendSettings(kind="embedded", cpu_threads=1))
    try:
        backend.check(repository.get("spleen_ct"))
        x = np.zeros((2, 1, 32, 32, 32), np.float32)
        (out,) = backend.infer(repository.get("spleen_ct"), {"INPUT__0": x}).values()
        assert out.shape == (2, 2, 32, 32, 32) and out.dtype == np.float32
        # A pipeline.yaml naming an output the model lacks (config.pbtxt silent about tensors).
        config_pbtxt = repo / "spleen_ct" / "config.pbtxt"
        config_pbtxt.write_text(config_pbtxt.read_text().split("output [")[0])
        edit(repo / "spleen_ct" / "pipeline.yaml", "name: OUTPUT__0", "name: LOGITS")
        with pytest.raises(BackendError, match=r"model 'spleen_ct' has no output 'LOGITS' in model.onnx \(it has OUTPUT__0\)"):
            backend.check(repository.get("spleen_ct"))
    finally:
        backend.close()
    (repo / "spleen_ct" / "1" / "model.onnx").unlink()
    fresh = open_backend(BackendSettings(kind="embedded"))
    with pytest.raises(BackendError, match="model.onnx is missing"):
        fresh.check(repository.get("spleen_ct"))
    with pytest.raises(BackendError, match="has no NoSuchProvider"):
        open_backend(BackendSettings(kind="embedded", providers=["NoSuchProvider"]))



def test_embedded_check_loads_the_model_outside_this_process(repo):
    """Readiness runs in the node's process: checking must not leave a model loaded there, a file
    ONNX Runtime cannot read is named, and a replaced model file is read again."""
    repository = ModelRepository(repo)
    backend = open_backend(BackendSettings(kind="embedded"))
    model_file = repo / "spleen_ct" / "1" / "model.onnx"
    original = model_file.read_bytes()
    backend.check(repository.get("spleen_ct"))
    assert backend._sessions == {}
    model_file.write_bytes(b"not an onnx model" * 10)
    with pytest.raises(BackendError, match=r"model 'spleen_ct': ONNX Runtime cannot load .*model\.onnx: .*\S"):
        backend.check(repository.get("spleen_ct"))
    model_file.write_bytes(original)
    backend.check(repository.get("spleen_ct"))
    assert backend._sessions == {}

def _classifier_model(path: Path, nodes: list, volume_shape: list[int], initializers: tuple = ()) -> None:
    """An ONNX model of `nodes` from a float `volume` of `volume_shape` to two float `scores`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("volume", TensorProto.FLOAT, volume_shape)],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2])], list(initializers))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _classifier_entry(entry: Path, layout: str, classification: str) -> None:
    """config.pbtxt and pipeline.yaml of a classifier from `volume` (in `layout`) to `scores`."""
    (entry / "config.pbtxt").write_text(f'name: "{entry.name}"\nplatform: "onnxruntime_onnx"\n')
    (entry / "pipeline.yaml").write_text(f"task: classification\ninput: {{name: volume, layout: {layout}}}\n"
                                         f"output: {{name: scores}}\nclassification:\n"
                                         + textwrap.indent(textwrap.dedent(classification), "  "))


def _scaling_model(path: Path, factor: float) -> None:
    """A classifier whose `scores` are its `volume` (1 x 1 x 1 x 1 x 2) times `factor`, flattened."""
    from onnx import TensorProto, helper

    _classifier_model(path, [helper.make_node("Mul", ["volume", "factor"], ["scaled"]),
                             helper.make_node("Flatten", ["scaled"], ["scores"], axis=1)],
                      [1, 1, 1, 1, 2], (helper.make_tensor("factor", TensorProto.FLOAT, [], [factor]),))


def test_a_new_model_version_or_replaced_file_is_what_the_next_inference_runs(tmp_path, caplog):
    """An admin installs version 2 (Triton's latest-version policy) or overwrites the file while the
    worker holds version 1's session: the next job's entry names the new file, and that is what runs,
    so a result never records one model version while another made it."""
    entry = tmp_path / "scaler"
    _scaling_model(entry / "1" / "model.onnx", 1.0)
    _classifier_entry(entry, "NCZYX", """\
        classes: [{name: a}, {name: b}]
        input_size: [1, 1, 2]
        window: [0, 1]
        """)
    repository = ModelRepository(tmp_path)
    backend = open_backend(BackendSettings(kind="embedded"))
    x = np.array([1.0, 2.0], np.float32).reshape(1, 1, 1, 1, 2)
    try:
        assert backend.infer(repository.get("scaler"), {"volume": x})["scores"].tolist() == [[1.0, 2.0]]
        _scaling_model(entry / "2" / "model.onnx", 2.0)
        latest = repository.get("scaler")
        assert latest.version == 2
        with caplog.at_level("INFO", logger="inference.backends"):
            assert backend.infer(latest, {"volume": x})["scores"].tolist() == [[2.0, 4.0]]
        assert "model scaler: " in caplog.text and "changed since it was loaded; loaded again" in caplog.text
        time.sleep(0.05)  # file times advance in clock ticks: a replacement comes later than that
        _scaling_model(entry / "2" / "model.onnx", 3.0)  # the same version's file replaced in place
        assert backend.infer(repository.get("scaler"), {"volume": x})["scores"].tolist() == [[3.0, 6.0]]
    finally:
        backend.close()


def test_classifier_task_feeds_the_recipe(repo):
    """pipeline.yaml's classification section drives crop, resize, window, layout and softmax."""
    from onnx import helper

    from inference import tasks
    from inference.classify import classifier_input, crop_to_mask
    from inference.results import Algorithm, LabelMap
    from inference.volume import Volume

    entry = repo / "toy_classifier"
    # logits = [mean(volume), max(volume)] over a channels-last Z, Y, X input of 8 x 12 x 16.
    _classifier_model(entry / "1" / "model.onnx",
                      [helper.make_node("Flatten", ["volume"], ["flat"], axis=1),
                       helper.make_node("ReduceMean", ["flat"], ["mean"], keepdims=1, axes=[1]),
                       helper.make_node("ReduceMax", ["flat"], ["max"], keepdims=1, axes=[1]),
                       helper.make_node("Concat", ["mean", "max"], ["scores"], axis=1)], [1, 8, 12, 16, 1])
    _classifier_entry(entry, "NZYXC", """\
        classes: [{name: low}, {name: high}]
        crop_margin_mm: 4
        input_size: [16, 12, 8]
        window: [-100, 300]
        mask_labels: [2]
        """)
    rng = np.random.default_rng(3)
    array = rng.integers(-200, 400, size=(30, 40, 50)).astype(np.int16)
    labels = np.zeros(array.shape, np.uint8)
    labels[5:10, 10:20, 30:45] = 2
    labels[15:25, 5:30, 5:20] = 1
    volume = Volume(array, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    mask = LabelMap(volume.with_array(labels), (), Algorithm("lungs", "1"))
    repository = ModelRepository(repo)
    model = repository.get("toy_classifier")
    seen = []

    class Recording:
        """The real embedded backend, keeping a copy of what the task sends."""

        def __init__(self, backend):
            self.backend = backend

        def infer(self, entry, inputs):
            seen.append({k: v.copy() for k, v in inputs.items()})
            return self.backend.infer(entry, inputs)

    backend = open_backend(BackendSettings(kind="embedded"))
    backend.check(model)
    result = tasks.classify(volume, mask, model, Recording(backend))
    crop = crop_to_mask(volume, mask, [2], 4.0)
    assert crop.shape == (5 + 2 * 2, 10 + 2 * 5, 15 + 2 * 5)  # margin 4 mm: 2 slices, 5 pixels
    expected_input = classifier_input(crop, (16, 12, 8), (-100, 300), "NZYXC")
    (sent,) = seen
    assert sent["volume"].shape == (1, 8, 12, 16, 1)
    np.testing.assert_array_equal(sent["volume"], expected_input)
    logits = np.array([expected_input.mean(), expected_input.max()], np.float64)
    expected = np.exp(logits) / np.exp(logits).sum()
    assert [c.name for c in result.classes] == ["low", "high"]
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)
    assert result.winner.name == "high" and result.algorithm.name == "toy_classifier"
