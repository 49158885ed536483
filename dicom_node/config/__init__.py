"""The node's configuration: one YAML file, validated by a typed schema.

Every model forbids unknown keys, because a misspelt key silently ignored is
a setting the admin believes is active and is not. `load_config` reports each
problem with the file, line and dotted key path it refers to
(`config.yaml:12 destinations.pacs.port: ...`), found by walking the YAML
node tree along the error's location. Relative paths resolve against the
config file's folder, so the node behaves the same from any working directory.

This package holds `Config`, `ConfigError` and the loading; each section's
models live in the module named for it, in the order of the config.yaml
reference, and are imported from there:

- `base`: what the models share (`_Model`, path anchoring, TLS file sets);
- `node`: `node`, `http` (with STOW-RS senders), `security`, `completion`, `retention`, `cluster`;
- `inference`: the inference backend (embedded or Triton);
- `pipelines`: match conditions, pipelines and their steps, forward rules;
- `destinations`: DIMSE and DICOMweb destinations and their retry policy;
- `results`: the result series the node writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, model_validator

from dicom_node.config.base import _Model
from dicom_node.config.destinations import AnyDestination
from dicom_node.config.inference import InferenceConfig
from dicom_node.config.node import (ClusterConfig, CompletionConfig, HttpConfig, NodeConfig, RetentionConfig,
                                   SecurityConfig)
from dicom_node.config.pipelines import ForwardConfig, PipelineConfig
from dicom_node.config.results import ResultsConfig


class ConfigError(Exception):
    """The configuration is unusable; `errors` are located lines ready to print."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Config(_Model):
    node: NodeConfig = NodeConfig()
    http: HttpConfig = HttpConfig()
    security: SecurityConfig = SecurityConfig()
    completion: CompletionConfig = CompletionConfig()
    retention: RetentionConfig = RetentionConfig()
    cluster: ClusterConfig = ClusterConfig()
    inference: InferenceConfig = InferenceConfig()
    pipelines: dict[str, PipelineConfig] = {}
    forward: dict[str, ForwardConfig] = {}
    destinations: dict[str, AnyDestination] = {}
    results: ResultsConfig = ResultsConfig()
    source_path: Path | None = Field(None, exclude=True)  # the file it was loaded from

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> Config:
        if (info.context or {}).get("defer_references"):
            return self  # load_config reports them with their lines
        problems = reference_problems(self)
        if problems:
            raise ValueError("; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems))
        return self


def reference_problems(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    """Names used in one section that another must define (pipeline and forward destinations), and forward
    rules named like a pipeline: a job is named by its pipeline or rule, one name per series generation."""
    return [
        ((section, name, "destinations", index), f"unknown destination {destination!r} (not under destinations)")
        for section, rules in (("pipelines", config.pipelines), ("forward", config.forward))
        for name, rule in rules.items()
        for index, destination in enumerate(rule.destinations)
        if destination not in config.destinations
    ] + [(("forward", name), f"a pipeline is named {name!r} too; jobs are named by their pipeline or forward "
                             "rule, so the names must differ") for name in config.forward if name in config.pipelines]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key written twice in one mapping.

    YAML 1.2 says mapping keys are unique; PyYAML keeps the later value without a word, so a second
    `port:` under `node` (a merge gone wrong, a pasted block) would silently replace the first.
    Keys brought in by a merge (`<<: *anchor`) may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {earlier.line + 1}): "
                        "YAML keeps one value per key, remove one of them", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> Config:
    """Read, validate and anchor a config file; raise ConfigError with located messages."""
    path = Path(path)
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label}:1: the top level must be a mapping of sections"])
    if "source_path" in data:
        raise ConfigError([f"{label}:{_line(root, ('source_path',))} source_path: Extra inputs are not permitted"])
    context = {"base_dir": path.resolve().parent, "defer_references": True}
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as error:
        raise ConfigError([
            f"{label}:{_line(root, item['loc'])} {_dotted(item['loc']) or '(top level)'}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors(include_url=False)
        ]) from None
    problems = reference_problems(config)
    if problems:
        raise ConfigError([f"{label}:{_line(root, loc)} {_dotted(loc)}: {message}" for loc, message in problems])
    config.source_path = path.resolve()
    return config


def _dotted(loc: tuple[str | int, ...]) -> str:
    """The key path as the admin wrote it (match-condition form tags, `=...`, left out)."""
    return ".".join(str(part) for part in loc if not str(part).startswith("="))


def _line(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int:
    """1-based line of the deepest YAML node reachable along a pydantic error location.

    Pydantic inserts union-member tags (e.g. `str`, `list[...]`) into the
    location; a part the node tree does not have is skipped, so the line is
    that of the nearest enclosing key that exists.
    """
    node = root
    line = node.start_mark.line if node is not None else 0
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue
        key_line, node = child
        line = key_line
    return line + 1


def _child(node: yaml.Node | None, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item.start_mark.line, item
    return None
