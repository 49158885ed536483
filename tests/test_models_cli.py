"""`dicom-node models import|list|check` on a temporary repository, with the shared spleen model."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from tests.model_repository import SPLEEN_ONNX
from tests.peers import SHARED_MODELS

from dicom_node.ops import models

SPLEEN_TORCHSCRIPT = SHARED_MODELS / "spleen_ct_demo" / "model.torchscript.pt"
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_REPOSITORY = importlib.util.find_spec("inference.repository") is not None
needs_repository = pytest.mark.skipif(not HAS_REPOSITORY, reason="inference.repository not in this checkout yet")


def repository(path):
    from inference.repository import ModelRepository

    return ModelRepository(path)


def cli(*argv: str) -> tuple[int, str]:
    """Parse and run `models ...` exactly as the node's command line registers it."""
    parser = argparse.ArgumentParser(prog="dicom-node")
    models.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    out = io.StringIO()
    return models.run(args, None, out), out.getvalue()


def run_spleen(model_path, shape=(1, 1, 96, 96, 96)) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@needs_repository
def test_import_onnx_then_list_and_check(tmp_path):
    repo = tmp_path / "models"
    code, text = cli("import", str(SPLEEN_ONNX), "--name", "spleen", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 0, text
    entry_dir = repo / "spleen"
    assert (entry_dir / "1" / "model.onnx").read_bytes() == SPLEEN_ONNX.read_bytes()
    config = (entry_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config
    assert 'name: "INPUT__0"' in config and "dims: [ -1, 1, -1, -1, -1 ]" in config
    assert 'name: "OUTPUT__0"' in config and "dims: [ -1, 2, -1, -1, -1 ]" in config
    assert not [p for p in repo.iterdir() if p.name.startswith(".import-")]  # staging removed

    entry = repository(repo).get("spleen")
    assert entry.platform == "onnxruntime_onnx"

    code, text = cli("list", "--repository", str(repo))
    assert code == 0, text
    header, row = text.splitlines()[:2]
    assert header.split() == ["NAME", "PLATFORM", "TASK", "VERSIONS", "READY"]
    assert row.split() == ["spleen", "onnxruntime_onnx", "segmentation", "1", "yes"]

    code, text = cli("check", "--repository", str(repo))
    assert code == 0, text
    assert "spleen: ok (embedded)" in text

    code, text = cli("import", str(SPLEEN_ONNX), "--name", "spleen", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 1 and "exists; pass --force" in text


@needs_repository
def test_broken_pipeline_yaml_gives_located_error(tmp_path):
    repo = tmp_path / "models"
    assert cli("import", str(SPLEEN_ONNX), "--name", "spleen", "--preset", "monai-spleen", "--repository", str(repo))[0] == 0
    pipeline = repo / "spleen" / "pipeline.yaml"
    lines = pipeline.read_text().splitlines()
    index = next(n for n, line in enumerate(lines) if line.strip().startswith("overlap:"))
    lines[index] = lines[index].split(":")[0] + ": lots"
    pipeline.write_text("\n".join(lines) + "\n")
    # `check` reports it and exits 0 (a state the node runs with: its pipelines say degraded) unless strict.
    for command, expected_code in (("list", 1), ("check", 0), ("check --strict", 1)):
        code, text = cli(*command.split(), "--repository", str(repo))
        assert code == expected_code, text
        assert f"pipeline.yaml:{index + 1}" in text and "overlap" in text, text


@needs_repository
def test_monai_bundle_folder(tmp_path):
    bundle = tmp_path / "spleen_ct_segmentation"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "UNet"}}))
    shutil.copyfile(SPLEEN_ONNX, bundle / "models" / "model.onnx")
    repo = tmp_path / "models"
    code, text = cli("import", str(bundle), "--name", "bundle_spleen", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 0, text
    assert repository(repo).get("bundle_spleen").platform == "onnxruntime_onnx"


def test_import_refuses_what_is_not_a_model(tmp_path):
    repo = tmp_path / "models"
    not_a_bundle = tmp_path / "folder"
    not_a_bundle.mkdir()
    code, text = cli("import", str(not_a_bundle), "--name", "x", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 1 and "not a MONAI bundle (no configs/inference.json)" in text
    (not_a_bundle / "configs").mkdir()
    (not_a_bundle / "configs" / "inference.json").write_text("{}")
    code, text = cli("import", str(not_a_bundle), "--name", "x", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 1 and "holds no model.onnx, model.ts or model.pt" in text
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a model")
    code, text = cli("import", str(garbage), "--name", "x", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 1 and "ONNX Runtime cannot load it" in text
    code, text = cli("import", str(SPLEEN_ONNX), "--name", "../x", "--preset", "monai-spleen", "--repository", str(repo))
    assert code == 1 and "plain folder name" in text
    assert not (repo / "x").exists() and not list(repo.glob(".import-*"))


@needs_repository
@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (optional extra: pip install torch==2.13.0)")
def test_import_torchscript_exports_equivalent_onnx(tmp_path):
    repo = tmp_path / "models"
    code, text = cli("import", str(SPLEEN_TORCHSCRIPT), "--name", "spleen_ts", "--preset", "monai-spleen",
                     "--repository", str(repo))
    assert code == 0, text
    exported = repo / "spleen_ts" / "1" / "model.onnx"
    assert np.abs(run_spleen(exported) - run_spleen(SPLEEN_ONNX)).max() < 1e-3
    # Spatial axes stay dynamic: a 2-patch batch of another size runs too.
    assert run_spleen(exported, (2, 1, 64, 64, 32)).shape == (2, 2, 64, 64, 32)
    code, text = cli("check", "--repository", str(repo))
    assert code == 0 and "spleen_ts: ok" in text


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed; the missing-torch message cannot occur")
def test_import_torchscript_without_torch_says_what_to_install(tmp_path):
    repo = tmp_path / "models"
    code, text = cli("import", str(SPLEEN_TORCHSCRIPT), "--name", "spleen_ts", "--preset", "monai-spleen",
                     "--repository", str(repo))
    assert code == 1 and "install torch==2.13.0 to import TorchScript" in text
    assert not (repo / "spleen_ts").exists()


def test_monai_spleen_preset_is_the_recipe():
    """The preset is the demo model's training recipe: RAS, 1.5x1.5x2.0 mm, HU [-57, 164] -> [0, 1], 96^3, 0.25."""
    import yaml
    from string import Template

    text = Template(models.PRESETS["monai-spleen"].pipeline_yaml).substitute(input_name="IN", output_name="OUT")
    spec = yaml.safe_load(text)
    assert spec["input"]["name"] == "IN" and spec["output"]["name"] == "OUT"
    assert spec["preprocessing"] == {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0],
                                     "window": [-57.0, 164.0], "scale": [0.0, 1.0]}
    assert spec["sliding_window"]["roi_size"] == [96, 96, 96] and spec["sliding_window"]["overlap"] == 0.25
    assert spec["postprocessing"]["discretize"] == "argmax" and spec["postprocessing"]["largest_component"]
    (label,) = spec["labels"]
    assert label["value"] == 1 and label["type"]["value"] == "78961009" and label["type"]["scheme"] == "SCT"
