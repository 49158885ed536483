"""The `pipelines` and `forward` sections: match conditions (dicom_node.pipeline.route applies them),
a pipeline's steps, and forward rules."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from dicom_node.config.base import _Model

# SeriesSummary fields (dicom_node.pipeline.volume) plus the association's AE titles.
MATCH_KEYS = frozenset({
    "modality", "body_part_examined", "series_description", "image_type", "slice_thickness",
    "number_of_slices", "manufacturer", "contrast_agent", "orientation", "calling_ae", "called_ae",
})


class RegexCondition(_Model):
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"invalid regular expression: {error}") from None
        return value


class RangeCondition(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RangeCondition:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class ContainsAllCondition(_Model):
    contains_all: list[str] = Field(min_length=1)


Scalar = str | int | float
CONDITION_FORMS = "a value, a list of values, {regex: ...}, {min: ..., max: ...} or {contains_all: [...]}"


def _condition_form(value: Any) -> str | None:
    """Which form of match condition a YAML value is, told by its shape.

    Choosing by shape (instead of trying every union member) gives one error
    about the form the admin wrote, not one per form they did not mean.
    """
    if isinstance(value, BaseModel):
        return {RegexCondition: "=regex", RangeCondition: "=range", ContainsAllCondition: "=contains_all"}[type(value)]
    if isinstance(value, dict):
        return "=regex" if "regex" in value else "=contains_all" if "contains_all" in value else "=range"
    if isinstance(value, list):
        return "=list"
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return "=scalar"
    return None


MatchCondition = Annotated[
    Annotated[Scalar, Tag("=scalar")] | Annotated[list[Scalar], Tag("=list")] | Annotated[RegexCondition, Tag("=regex")]
    | Annotated[RangeCondition, Tag("=range")] | Annotated[ContainsAllCondition, Tag("=contains_all")],
    Discriminator(_condition_form, custom_error_type="match_condition",
                  custom_error_message=f"a match condition is {CONDITION_FORMS}"),
]


BUILT_IN_TASKS = ("lung_classical", "lung_involvement")  # run in the node, no model (inference.parameters)


class StepConfig(_Model):
    name: str = Field(min_length=1)
    task: Literal["segmentation", "classification", "lung_classical", "lung_involvement"]
    model: str | None = None  # repository model name; required unless the task is built in
    input_mask: str | None = None  # an earlier step whose mask a classifier or lung_involvement reads
    options: dict[str, Any] = {}  # a built-in task's parameters (inference.parameters), validated here

    @model_validator(mode="after")
    def _model_named(self) -> StepConfig:
        if self.task not in BUILT_IN_TASKS and not self.model:
            raise ValueError(f"task {self.task} needs a model")
        if self.task in BUILT_IN_TASKS and self.model:
            raise ValueError(f"{self.task} is built in and takes no model")
        if self.task == "lung_involvement" and not self.input_mask:
            raise ValueError("lung_involvement needs input_mask: the lung_classical step whose lungs it measures")
        if self.options:
            if self.task not in BUILT_IN_TASKS:
                raise ValueError(f"options are for the built-in tasks ({', '.join(BUILT_IN_TASKS)}), "
                                 f"not {self.task}: a model's settings live in its pipeline.yaml")
            self.parameters()  # raises ValueError naming the wrong option
        return self

    def parameters(self):
        """The typed parameters of a built-in step (defaults where `options` says nothing)."""
        from inference.parameters import PARAMETERS
        return PARAMETERS[self.task].from_options(self.options)


class _RoutedConfig(_Model):
    """What pipelines and forward rules share: match rules (dicom_node.pipeline.route) and destinations."""

    enabled: bool = True
    match: dict[str, MatchCondition] = Field(min_length=1)
    destinations: list[str] = []

    @field_validator("match")
    @classmethod
    def _known_keys(cls, match: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(match) - MATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown match key(s) {', '.join(unknown)}; known: {', '.join(sorted(MATCH_KEYS))}")
        return match


class PipelineConfig(_RoutedConfig):
    steps: list[StepConfig] = Field(min_length=1)
    outputs: list[Literal["seg", "sr", "overlay", "keyimage"]] = ["seg"]  # keyimage: lung involvement only

    @field_validator("steps")
    @classmethod
    def _chained(cls, steps: list[StepConfig]) -> list[StepConfig]:
        seen: dict[str, str] = {}  # step name -> task
        for step in steps:
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} used twice")
            if step.input_mask is not None and step.input_mask not in seen:
                raise ValueError(f"step {step.name!r}: input_mask {step.input_mask!r} is not an earlier step")
            if step.task == "lung_involvement" and seen[step.input_mask] != "lung_classical":
                raise ValueError(f"step {step.name!r}: input_mask {step.input_mask!r} is not a lung_classical step")
            seen[step.name] = step.task
        return steps


class ForwardConfig(_RoutedConfig):
    """Plain auto-routing: every original instance of a matching series, as received, to the
    destinations (the node inline between scanner and PACS), with the results' retry and dead letter."""

    destinations: list[str] = Field(min_length=1)
