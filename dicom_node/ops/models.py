"""`dicom-node models list|check|import`: the admin's view of the model repository.

The repository has Triton's layout (`<name>/config.pbtxt`,
`<name>/<version>/model.onnx`) plus our `<name>/pipeline.yaml`; both backends
serve it unchanged. `import` turns what an admin has (an ONNX file, a
TorchScript file, a MONAI bundle folder) into such an entry, with the feeding
recipe taken from a preset, and validates what it wrote with the same parser
the node uses before moving it into place.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, TextIO

import onnxruntime as ort

if TYPE_CHECKING:
    from dicom_node.config import Config

TORCH_HINT = "install torch==2.13.0 to import TorchScript (pip install torch==2.13.0)"


@dataclass(frozen=True)
class Preset:
    """How to feed one family of models: a pipeline.yaml template plus what an export needs.

    The template's `$input_name` and `$output_name` are filled from the model's
    own tensor names.
    """

    description: str
    pipeline_yaml: str
    input_channels: int
    example_size: tuple[int, int, int]


MONAI_SPLEEN = Preset(
    description="MONAI spleen CT recipe (spleen_ct_segmentation bundle, spleen_ct_demo)",
    input_channels=1,
    example_size=(96, 96, 96),
    pipeline_yaml="""\
# MONAI spleen CT segmentation recipe (see MONAI's spleen_ct_segmentation bundle).
task: segmentation
input:
  name: $input_name
  layout: NCXYZ
output:
  name: $output_name
  layout: NCXYZ
preprocessing:
  orientation: RAS
  spacing: [1.5, 1.5, 2.0]
  window: [-57.0, 164.0]
  scale: [0.0, 1.0]
sliding_window:
  roi_size: [96, 96, 96]
  overlap: 0.25
  batch_size: 4
  blending: gaussian
postprocessing:
  discretize: argmax
  largest_component: true
  fill_holes: false
labels:
  - value: 1
    name: Spleen
    category: {value: "123037004", scheme: SCT, meaning: Anatomical Structure}
    type: {value: "78961009", scheme: SCT, meaning: Spleen}
""",
)

PRESETS: dict[str, Preset] = {"monai-spleen": MONAI_SPLEEN}

# ONNX Runtime element types as Triton config.pbtxt data types (Triton model_config.proto).
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL",
}


class ModelImportError(Exception):
    """What the admin gave cannot become a repository entry; the message says why."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `models list|check|import` under the node's command line."""
    models = subparsers.add_parser("models", help="list, check and import models of the model repository")
    commands = models.add_subparsers(dest="models_command", required=True)
    repository_help = "model repository folder (default: inference.model_repository of the config)"

    listing = commands.add_parser("list", help="name, platform, task, versions and readiness of each model")
    listing.add_argument("--repository", type=Path, help=repository_help)
    listing.set_defaults(models_handler=run_list)

    check = commands.add_parser("check", help="validate each pipeline.yaml, check each model with the backend, "
                                              "and say which pipelines are ready or degraded")
    check.add_argument("--repository", type=Path, help=repository_help)
    check.add_argument("--strict", action="store_true", help="exit 1 when an entry failed or a pipeline is degraded")
    check.set_defaults(models_handler=run_check)

    imports = commands.add_parser("import", help="make a repository entry from an ONNX/TorchScript file or a MONAI bundle")
    imports.add_argument("path", type=Path, help="model.onnx, a TorchScript .pt/.ts file, or a MONAI bundle folder")
    imports.add_argument("--name", required=True, help="model name in the repository")
    imports.add_argument("--preset", required=True, choices=sorted(PRESETS), help="feeding recipe")
    imports.add_argument("--repository", type=Path, help=repository_help)
    imports.add_argument("--version", type=int, default=1, help="Triton version folder (default 1)")
    imports.add_argument("--force", action="store_true", help="replace an existing entry of that name")
    imports.set_defaults(models_handler=run_import)


def run(args: argparse.Namespace, config: Config | None, out: TextIO = sys.stdout) -> int:
    """Entry from the CLI: dispatch to the chosen subcommand; returns the exit code."""
    return args.models_handler(args, config, out)


def _repository_path(args: argparse.Namespace, config: Config | None) -> Path:
    if args.repository is not None:
        return args.repository
    return config.inference.model_repository if config is not None else Path("models")


def run_list(args: argparse.Namespace, config: Config | None, out: TextIO = sys.stdout) -> int:
    from inference.repository import ModelRepository, RepositoryError

    path = _repository_path(args, config)
    try:
        entries = ModelRepository(path).models
    except RepositoryError as error:
        print(f"error: {error}", file=out)
        return 1
    rows = [("NAME", "PLATFORM", "TASK", "VERSIONS", "READY")]
    for name, entry in sorted(entries.items()):
        versions = sorted(int(p.name) for p in Path(entry.path).iterdir() if p.is_dir() and p.name.isdigit())
        ready = Path(entry.version_path).exists()
        rows.append((name, entry.platform, str(entry.pipeline.task), ",".join(map(str, versions)) or "-",
                     "yes" if ready else "no (no model file)"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    if not entries:
        print(f"(no models in {path})", file=out)
    return 0


def run_check(args: argparse.Namespace, config: Config | None, out: TextIO = sys.stdout) -> int:
    """Each repository entry `ok` or `FAILED`, then each enabled pipeline `ready` or `degraded (why)` as
    /v1/status says it (dicom_node.pipeline.health), then each triton server up or down. Exit 0 when the check ran, whatever it found: a pipeline
    naming a model the site has not installed is a state, not an error; `--strict` exits 1 on any
    failed entry or degraded pipeline (for an install script or CI)."""
    from inference.backends import BackendError, open_backend
    from inference.repository import ModelRepository, RepositoryError

    from dicom_node.config.inference import InferenceConfig
    from dicom_node.pipeline.health import inference_servers, pipeline_health

    path = _repository_path(args, config)
    repository = ModelRepository(path)
    failures = 0
    try:
        entries = repository.models
    except RepositoryError as error:
        print(f"error: {error}", file=out)
        entries, failures = {}, failures + 1
    settings = (config.inference if config else InferenceConfig()).backend_settings()  # embedded without one
    try:
        backend = open_backend(settings)
    except BackendError as error:
        print(f"error: {settings.kind} backend: {error}", file=out)
        backend, failures = None, failures + 1
    try:
        for name, entry in sorted(entries.items()) if backend is not None else ():
            try:
                backend.check(entry)
            except BackendError as error:
                failures += 1
                print(f"{name}: FAILED: {error}", file=out)
            else:
                print(f"{name}: ok ({settings.kind})", file=out)

        def open_inference():
            if backend is None:
                raise BackendError("did not open (above)")
            return repository, backend

        health = pipeline_health(config, open_inference) if config is not None else []
        for pipeline in health:
            print(f"pipeline {pipeline.pipeline}: {pipeline.describe()}", file=out)
        for server in inference_servers(config, open_inference) if config is not None and backend is not None else ():
            print(f"triton server {server.url}: {server.describe()}", file=out)
    finally:
        if backend is not None:
            backend.close()
    return 1 if args.strict and (failures or not all(p.ready for p in health)) else 0


def run_import(args: argparse.Namespace, config: Config | None, out: TextIO = sys.stdout) -> int:
    try:
        target = import_model(args.path, _repository_path(args, config), args.name, PRESETS[args.preset],
                              version=args.version, force=args.force)
    except ModelImportError as error:
        print(f"error: {error}", file=out)
        return 1
    print(f"imported {args.path} as {target} (preset {args.preset})", file=out)
    return 0


def import_model(source: Path, repository: Path, name: str, preset: Preset, *, version: int = 1,
                 force: bool = False) -> Path:
    """Write `<repository>/<name>/` (config.pbtxt, <version>/model.onnx, pipeline.yaml); returns it.

    The entry is built in a staging folder inside the repository, parsed with
    the node's own repository reader, and only then moved into place, so a
    failed import never leaves a half-written model the node would load.
    """
    source, repository = Path(source), Path(repository)
    if not name or "/" in name or name.startswith("."):
        raise ModelImportError(f"model name {name!r} must be a plain folder name")
    target = repository / name
    if target.exists() and not force:
        raise ModelImportError(f"{target} exists; pass --force to replace it")
    repository.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".import-{name}-", dir=repository) as staging:
        entry = Path(staging) / name
        model_path = entry / str(version) / "model.onnx"
        model_path.parent.mkdir(parents=True)
        _write_onnx(source, model_path, preset)
        inputs, outputs = _signature(model_path)
        (entry / "config.pbtxt").write_text(_config_pbtxt(name, inputs, outputs))
        (entry / "pipeline.yaml").write_text(
            Template(preset.pipeline_yaml).substitute(input_name=inputs[0].name, output_name=outputs[0].name))
        _validate(Path(staging), name)
        if target.exists():
            shutil.rmtree(target)
        entry.rename(target)
    return target


def _validate(repository: Path, name: str) -> None:
    """Parse the staged entry with the node's repository reader (errors carry file:line)."""
    from inference.repository import ModelRepository, RepositoryError

    try:
        ModelRepository(repository).get(name)
    except RepositoryError as error:
        raise ModelImportError(f"the written entry does not validate: {error}") from None


def _write_onnx(source: Path, destination: Path, preset: Preset) -> None:
    """Copy an ONNX model, or export a TorchScript file or MONAI bundle to ONNX."""
    if source.is_dir():
        source = _bundle_model(source)
    if not source.is_file():
        raise ModelImportError(f"{source} does not exist")
    if source.suffix == ".onnx":
        shutil.copyfile(source, destination)
    elif source.suffix in (".pt", ".ts", ".pth"):
        _export_torchscript(source, destination, preset)
    else:
        raise ModelImportError(f"{source}: expected a .onnx file, a TorchScript .pt/.ts file or a MONAI bundle folder")


def _bundle_model(bundle: Path) -> Path:
    """The model file of a MONAI bundle (configs/inference.json + models/): ONNX first, then TorchScript."""
    if not (bundle / "configs" / "inference.json").is_file():
        raise ModelImportError(f"{bundle} is a folder but not a MONAI bundle (no configs/inference.json)")
    for candidate in ("model.onnx", "model.ts", "model.pt"):
        if (bundle / "models" / candidate).is_file():
            return bundle / "models" / candidate
    raise ModelImportError(f"{bundle}/models holds no model.onnx, model.ts or model.pt")


def _export_torchscript(source: Path, destination: Path, preset: Preset) -> None:
    try:
        import torch
    except ImportError:
        raise ModelImportError(f"{source} is TorchScript: {TORCH_HINT}") from None
    try:
        module = torch.jit.load(str(source), map_location="cpu").eval()
    except RuntimeError as error:
        raise ModelImportError(
            f"{source} is not a TorchScript module ({error.__class__.__name__}); a MONAI bundle's "
            "state-dict model.pt must first be exported with `python -m monai.bundle ckpt_export`") from None
    example = torch.zeros((1, preset.input_channels, *preset.example_size), dtype=torch.float32)
    spatial = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(destination), input_names=["INPUT__0"],
                          output_names=["OUTPUT__0"], dynamic_axes={"INPUT__0": spatial, "OUTPUT__0": spatial},
                          opset_version=17, dynamo=False)


@dataclass(frozen=True)
class TensorSignature:
    name: str
    data_type: str
    dims: tuple[int, ...]


def _signature(model: Path) -> tuple[list[TensorSignature], list[TensorSignature]]:
    """Input and output tensors as ONNX Runtime reads them (dynamic axes as -1, Triton's wildcard)."""
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own exception types for unreadable models
        raise ModelImportError(f"{model}: ONNX Runtime cannot load it: {error}") from None

    def describe(arg) -> TensorSignature:
        if arg.type not in TRITON_TYPES:
            raise ModelImportError(f"{model}: tensor {arg.name} has type {arg.type}, which Triton cannot serve")
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        return TensorSignature(arg.name, TRITON_TYPES[arg.type], dims)

    return [describe(a) for a in session.get_inputs()], [describe(a) for a in session.get_outputs()]


def _config_pbtxt(name: str, inputs: list[TensorSignature], outputs: list[TensorSignature]) -> str:
    """Triton model configuration (text protobuf); max_batch_size 0: dims include the batch axis."""

    def tensors(kind: str, items: list[TensorSignature]) -> str:
        blocks = ",\n".join(
            f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {", ".join(map(str, t.dims))} ]\n  }}'
            for t in items)
        return f"{kind} [\n{blocks}\n]\n"

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            + tensors("input", inputs) + tensors("output", outputs))
