"""The model repository: NVIDIA Triton's layout plus our `pipeline.yaml` per model.

One folder serves both backends unchanged:

    <repository>/<name>/config.pbtxt       Triton's model configuration
    <repository>/<name>/<version>/model.onnx   (or model.plan, model.pt, ... for Triton-only platforms)
    <repository>/<name>/pipeline.yaml      how to feed the model (Triton ignores it)

`pipeline.yaml` plays the part of Clara's `config_inference.json`: tensor
names and layout, orientation, spacing, intensity window, sliding-window
settings, post-processing, labels with their codes, and for classifiers the
class names and the crop recipe. It is validated at the boundary into frozen
dataclasses; every error names the file, the line and the key, as the node's
config.yaml errors do. config.pbtxt is read with protobuf's text format into
Triton's ModelConfig message, as Triton reads it. bench/pbtxt.py times it
against the hand-written reader it replaced: 0.8 ms per spleen_ct config.pbtxt
against 0.15 ms (2026-12-03, 2-core shared x86_64 VM, protobuf 6.33 upb), five
times slower and still nothing beside a job that runs for seconds, so the
library stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from google.protobuf import text_format
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as validated
from tritonclient.grpc import model_config_pb2

from inference.results import Algorithm, ClassLabel, Code, SegmentLabel

STRICT = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

# Triton platforms / backends and the model file each loads by default (Triton's model repository documentation).
MODEL_FILES = {
    "onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx",
    "tensorrt_plan": "model.plan", "tensorrt": "model.plan",
    "pytorch_libtorch": "model.pt", "pytorch": "model.pt",
    "tensorflow_graphdef": "model.graphdef", "tensorflow_savedmodel": "model.savedmodel",
    "openvino": "model.xml", "python": "model.py",
}
AXES = "NCXYZ"


class RepositoryError(Exception):
    """A model repository entry that cannot be used; the message says which file, line and key."""


# --- pipeline.yaml ---------------------------------------------------------------------------

Positive = Annotated[float, Field(gt=0)]
Size = Annotated[int, Field(ge=1)]


@validated(config=STRICT)
class CodeSpec:
    value: str
    scheme: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


@validated(config=STRICT)
class TensorSpec:
    """One model tensor: its name and axis order, N batch, C channel, X Y Z the model's axes.

    An input always has all five axes (e.g. NCXYZ, NCZYX, NXYZC); a segmentation
    output too; a classifier's output is NC. Without `layout` an output has its
    input's layout (segmentation) or NC (classification).
    """

    name: str
    layout: str | None = None

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str | None) -> str | None:
        if value is not None and (sorted(value) not in (sorted(AXES), ["C", "N"])):
            raise ValueError(f"layout {value!r} must order the axes {AXES} (e.g. NCXYZ, NCZYX, NXYZC), or be NC")
        return value


@validated(config=STRICT)
class Preprocessing:
    """Orientation (axis codes the model's X, Y, Z point to, as MONAI/NIfTI write them), spacing, window."""

    orientation: str = "RAS"
    spacing: tuple[Positive, Positive, Positive] | None = None
    window: tuple[float, float] | None = None
    scale: tuple[float, float] = (0.0, 1.0)

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, value: str) -> str:
        value = value.upper()
        if len(value) != 3 or sorted(_AXIS_OF[c] for c in value if c in _AXIS_OF) != [0, 1, 2]:
            raise ValueError(f"orientation {value!r} must take one letter of each pair R/L, A/P, S/I (e.g. RAS, LPS)")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[1] > value[0]:
            raise ValueError(f"window {list(value)} must be [low, high] with high > low")
        return value


@validated(config=STRICT)
class SlidingWindow:
    """ROI patches over the resampled volume (MONAI sliding_window_inference's parameters)."""

    roi_size: tuple[Size, Size, Size]
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    batch_size: Size = 4
    blending: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: Positive = 0.125


@validated(config=STRICT)
class Postprocessing:
    """Logits to labels: argmax over channels (channel c = label c), or sigmoid + threshold (channel c = label c+1)."""

    discretize: Literal["argmax", "threshold"] = "argmax"
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    largest_component: bool | tuple[Annotated[int, Field(ge=1, le=255)], ...] = False
    fill_holes: bool | tuple[Annotated[int, Field(ge=1, le=255)], ...] = False


@validated(config=STRICT)
class LabelSpec:
    value: Annotated[int, Field(ge=1, le=255)]
    name: str
    category: CodeSpec
    type: CodeSpec

    def segment(self) -> SegmentLabel:
        return SegmentLabel(self.value, self.name, self.category.code(), self.type.code())


@validated(config=STRICT)
class ClassSpec:
    name: str
    code: CodeSpec | None = None


@validated(config=STRICT)
class Classification:
    """How a classifier is fed from a mask: crop box + margin, resize, window (inference.classify)."""

    classes: Annotated[tuple[ClassSpec, ...], Field(min_length=2)]
    input_size: tuple[Size, Size, Size]
    window: tuple[float, float]
    crop_margin_mm: Annotated[float, Field(ge=0)] = 10.0
    mask_labels: tuple[Annotated[int, Field(ge=1, le=255)], ...] | None = None
    activation: Literal["softmax", "none"] = "softmax"  # none: the model already outputs probabilities

    def labels(self) -> tuple[ClassLabel, ...]:
        return tuple(ClassLabel(c.name, c.code.code() if c.code else None) for c in self.classes)


@validated(config=STRICT)
class AlgorithmSpec:
    name: str
    version: str


@validated(config=STRICT)
class PipelineSpec:
    """The parsed pipeline.yaml of one model."""

    task: Literal["segmentation", "classification"]
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing = Preprocessing()
    sliding_window: SlidingWindow | None = None
    postprocessing: Postprocessing = Postprocessing()
    labels: tuple[LabelSpec, ...] = ()
    classification: Classification | None = None
    algorithm: AlgorithmSpec | None = None

    @property
    def input_layout(self) -> str:
        return self.input.layout or AXES

    @property
    def output_layout(self) -> str:
        if self.output.layout:
            return self.output.layout
        return self.input_layout if self.task == "segmentation" else "NC"

    @model_validator(mode="after")
    def _task_sections(self) -> PipelineSpec:
        if len(self.input_layout) != len(AXES):
            raise ValueError(f"input.layout {self.input_layout!r} must have all five axes {AXES}")
        expected = len(AXES) if self.task == "segmentation" else 2
        if len(self.output_layout) != expected:
            raise ValueError(f"output.layout {self.output_layout!r} of a {self.task} model must have {expected} axes")
        if self.task == "segmentation":
            if self.sliding_window is None:
                raise ValueError("a segmentation model needs a sliding_window section (roi_size at least)")
            if not self.labels:
                raise ValueError("a segmentation model needs labels (value, name, category, type)")
            values = [label.value for label in self.labels]
            if len(set(values)) != len(values):
                raise ValueError(f"label values must be unique, got {values}")
        elif self.classification is None:
            raise ValueError("a classification model needs a classification section")
        return self

    def segment_labels(self) -> tuple[SegmentLabel, ...]:
        return tuple(label.segment() for label in self.labels)


_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
_PIPELINE = TypeAdapter(PipelineSpec)


def parse_pipeline(path: Path, config: ModelConfig | None = None) -> PipelineSpec:
    """Validate one pipeline.yaml; RepositoryError lists each problem as `file:line key: message`.

    With `config` (the model's config.pbtxt), the tensor names must also be the model's.
    """
    text = _read(path)
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RepositoryError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}:1: pipeline.yaml must be a mapping (task, input, output, ...)")
    lines: dict[tuple, int] = {}
    _record_lines(root, (), lines)

    def located(loc: tuple) -> str:
        known = next(loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in lines)
        return f"{path}:{lines[known]} {'.'.join(map(str, known)) or '(top level)'}"

    try:
        spec = _PIPELINE.validate_python(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            loc = tuple(item["loc"])
            if item["type"] == "missing":
                problems.append(f"{located(loc[:-1])}: required key {'.'.join(map(str, loc))} missing")
            elif item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                problems.append(f"{located(loc)}: unknown key")
            else:
                problems.append(f"{located(loc)}: {item['msg'].removeprefix('Value error, ')}")
        raise RepositoryError("\n".join(dict.fromkeys(problems))) from None
    if config is not None:
        for kind, tensor, declared in (("input", spec.input, config.inputs), ("output", spec.output, config.outputs)):
            names = [t.name for t in declared]
            if names and tensor.name not in names:
                raise RepositoryError(f"{located((kind, 'name'))}: {tensor.name!r} is not an {kind} of "
                                      f"config.pbtxt (it has {', '.join(names)})")
    return spec


def _record_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    """The line (1-based) each key path of the document starts on."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _record_lines(value_node, (*path, key_node.value), lines)
            lines[(*path, key_node.value)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for n, item in enumerate(node.value):
            _record_lines(item, (*path, n), lines)


# --- config.pbtxt ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorConfig:
    """One input/output of Triton's model configuration (model_config.proto ModelInput/ModelOutput)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    """The fields of config.pbtxt the node uses; Triton reads the rest itself."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    default_model_filename: str | None


def parse_config_pbtxt(path: Path) -> ModelConfig:
    """Read config.pbtxt as Triton does: protobuf's text format into Triton's own ModelConfig message
    (tritonclient's model_config_pb2), so a field Triton does not know, a field given twice or a
    wrong enum value is refused here as it would be there, with its line and column.

    An input or output without data_type (TYPE_INVALID, Triton fills it in from an ONNX model) reads
    TYPE_FP32, the type the node feeds and reads.
    """
    text = _read(path)
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        where = f"{path}:{error.GetLine()}:{error.GetColumn()}" if error.GetLine() else str(path)
        problem = str(error).split(" : ", 1)[-1]
        raise RepositoryError(f"{where}: cannot read the text protobuf (Triton's ModelConfig): {problem}") from None

    def tensors(declared) -> tuple[TensorConfig, ...]:
        return tuple(TensorConfig(t.name, model_config_pb2.DataType.Name(t.data_type or model_config_pb2.TYPE_FP32),
                                  tuple(t.dims)) for t in declared)

    for kind, declared in (("input", message.input), ("output", message.output)):
        if any(not t.name for t in declared):
            raise RepositoryError(f"{path}: every {kind} needs a name")
    return ModelConfig(
        name=message.name, platform=message.platform or message.backend, max_batch_size=message.max_batch_size,
        inputs=tensors(message.input), outputs=tensors(message.output),
        default_model_filename=message.default_model_filename or None,
    )


# --- the repository --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model: where it lives, what serves it, and how to feed it."""

    name: str
    path: Path
    platform: str
    version: int | None
    version_path: Path
    config: ModelConfig
    pipeline: PipelineSpec

    @property
    def algorithm(self) -> Algorithm:
        """Algorithm Identification for results (PS3.3 C.8.20.2): pipeline.yaml's, else the model name/version."""
        spec = self.pipeline.algorithm
        if spec is not None:
            return Algorithm(spec.name, spec.version)
        return Algorithm(self.name, str(self.version) if self.version is not None else "1")


class ModelRepository:
    """A folder of models in Triton's layout; entries are read (and validated) when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def models(self) -> dict[str, ModelEntry]:
        """Every model of the repository; one broken entry is an error (its file, line and key)."""
        if not self.path.is_dir():
            raise RepositoryError(f"model repository {self.path} is not a folder")
        names = sorted(p.name for p in self.path.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and
                       ((p / "config.pbtxt").exists() or (p / "pipeline.yaml").exists()))
        return {name: self.get(name) for name in names}

    def get(self, name: str) -> ModelEntry:
        folder = self.path / name
        if not name or "/" in name or name.startswith(".") or not folder.is_dir():
            where = "" if self.path.is_dir() else " (that folder does not exist)"
            raise RepositoryError(f"model {name!r} is not in the model repository {self.path}{where}")
        config_path, pipeline_path = folder / "config.pbtxt", folder / "pipeline.yaml"
        for required in (config_path, pipeline_path):
            if not required.is_file():
                raise RepositoryError(f"model {name!r}: {required} is missing")
        config = parse_config_pbtxt(config_path)
        if config.name and config.name != name:
            raise RepositoryError(f"{config_path}: name {config.name!r} differs from its folder {name!r} (Triton refuses that)")
        if config.platform not in MODEL_FILES:
            raise RepositoryError(f"{config_path}: platform/backend {config.platform!r} is not one of {sorted(MODEL_FILES)}")
        pipeline = parse_pipeline(pipeline_path, config)
        versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        version = versions[-1] if versions else None  # Triton's default version policy: latest one
        filename = config.default_model_filename or MODEL_FILES[config.platform]
        version_path = folder / str(version if version is not None else 1) / filename
        return ModelEntry(name, folder, config.platform, version, version_path, config, pipeline)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise RepositoryError(f"{path}: {error.strerror}") from None
