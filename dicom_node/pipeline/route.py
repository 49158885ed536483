"""Routing: which pipelines a completed series goes to.

A pipeline's `match` mapping names series attributes (the SeriesSummary
fields, plus the association's calling and called AE titles) and one
condition each; the series matches when every condition holds. Strings
compare case-insensitively after stripping, because scanners differ in case
and in padding (PS3.5 6.2 pads CS values with trailing spaces). A missing
attribute (absent or empty) never satisfies a condition, so a series without
Body Part Examined does not slip into a pipeline that asks for CHEST.
Multi-valued attributes (Image Type, PS3.3 C.7.6.1.1.2) match a value or a
regex when any of their values does.

Forward rules (`forward:` in config.yaml, plain auto-routing of the original
series) use the same conditions; their jobs are of kind `forward`, named by the
rule (dicom_node.config keeps pipeline and forward rule names apart).

Pipelines see images only. A series without pixel data in any instance (an
SR, KOS, presentation state, encapsulated PDF/CDA, RT Structure Set, waveform)
matches no pipeline, whatever its conditions, with the unmatched reason "not
an image series"; forward rules still send it on. A series mixing images with
such instances (which PS3.3 C.7.3 does not foresee, but senders do) is routed
on its images: the summary and the volume are made of them alone, and a
forward rule sends every instance.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node import sop_classes
from dicom_node.config import Config
from dicom_node.config.pipelines import (ContainsAllCondition, ForwardConfig, PipelineConfig, RangeCondition,
                                         RegexCondition)
from dicom_node.states import JobKind
from dicom_node.pipeline.volume import SeriesSummary


@dataclass(frozen=True)
class RouteMatch:
    """A pipeline (or forward rule) the series goes to, with each condition that let it in (for the log and
    the audit)."""

    pipeline: str  # the pipeline's or the forward rule's name
    reasons: tuple[str, ...]
    kind: JobKind = JobKind.PIPELINE


@dataclass(frozen=True)
class Verdict:
    matched: bool
    reasons: tuple[str, ...]  # why each condition held, or the first one that did not


def series_attributes(summary: SeriesSummary, calling_ae: str, called_ae: str) -> dict[str, Any]:
    """The values match rules see: the summary's fields and the association's AE titles."""
    return {**dataclasses.asdict(summary), "calling_ae": calling_ae, "called_ae": called_ae}


def _rules(config: Config) -> list[tuple[str, JobKind, PipelineConfig | ForwardConfig]]:
    """Forward rules, then pipelines, each in config order: the worker pool runs jobs in order, so the
    originals leave before any model runs (a forward job only queues exports)."""
    return ([(name, JobKind.FORWARD, rule) for name, rule in config.forward.items()]
            + [(name, JobKind.PIPELINE, pipeline) for name, pipeline in config.pipelines.items()])


def match_pipelines(config: Config, summary: SeriesSummary, calling_ae: str, called_ae: str) -> list[RouteMatch]:
    """Every enabled pipeline and forward rule whose conditions all hold, in config order; each becomes a job."""
    attributes = series_attributes(summary, calling_ae, called_ae)
    matches = []
    for name, kind, rule in _rules(config):
        verdict = evaluate(rule, attributes)
        if verdict.matched:
            matches.append(RouteMatch(name, verdict.reasons, kind))
    return matches


def unmatched_reasons(config: Config, summary: SeriesSummary, calling_ae: str, called_ae: str) -> dict[str, str]:
    """For each pipeline or forward rule the series does not go to, why not (what an admin asks about an
    unmatched series)."""
    attributes = series_attributes(summary, calling_ae, called_ae)
    reasons = {}
    for name, _, rule in _rules(config):
        verdict = evaluate(rule, attributes)
        if not verdict.matched:
            reasons[name] = verdict.reasons[-1]
    return reasons


def evaluate(pipeline: PipelineConfig | ForwardConfig, attributes: dict[str, Any]) -> Verdict:
    if not pipeline.enabled:
        return Verdict(False, ("pipeline disabled",))
    if isinstance(pipeline, PipelineConfig) and not attributes.get("image_instances"):
        classes = ", ".join(sop_classes.name(uid) for uid in attributes.get("non_image_sop_classes") or ())
        return Verdict(False, (f"not an image series: no instance has pixel data ({classes or 'no SOP class'})",))
    reasons = []
    for key, condition in pipeline.match.items():
        value = attributes.get(key)
        rule = RULES[type(condition)]
        held = not _missing(value) and rule.holds(condition, value)
        described = f"{key} {_show(value)} {rule.describe(condition)}"
        if not held:
            return Verdict(False, (*reasons, f"not {described}" if not _missing(value) else f"{key} missing"))
        reasons.append(described)
    return Verdict(True, tuple(reasons))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str | tuple | list) and not any(_norm(v) for v in _values(value)))


def _norm(value: Any) -> str:
    return str(value).strip().casefold()


def _values(value: Any) -> tuple[Any, ...]:
    """An attribute as its list of values (a single value is a list of one)."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _equal(expected: str | int | float, value: Any) -> bool:
    """Numbers compare as numbers (so 5 equals "5.0"), everything else as normalized strings."""
    if isinstance(expected, int | float):
        number = _number(value)
        return number is not None and number == float(expected)
    return _norm(expected) == _norm(value)


def _scalar(condition: str | int | float, value: Any) -> bool:
    return any(_equal(condition, v) for v in _values(value))


def _membership(condition: list[str | int | float], value: Any) -> bool:
    return any(_scalar(item, value) for item in condition)


def _regex(condition: RegexCondition, value: Any) -> bool:
    pattern = re.compile(condition.regex, re.IGNORECASE)
    return any(pattern.search(str(v).strip()) for v in _values(value))


def _range(condition: RangeCondition, value: Any) -> bool:
    number = _number(value) if not isinstance(value, tuple | list) else None
    return (
        number is not None
        and (condition.min is None or number >= condition.min)
        and (condition.max is None or number <= condition.max)
    )


def _contains_all(condition: ContainsAllCondition, value: Any) -> bool:
    present = {_norm(v) for v in _values(value)}
    return all(_norm(item) in present for item in condition.contains_all)


@dataclass(frozen=True)
class Rule:
    """How one form of match condition is tested and worded."""

    holds: Callable[[Any, Any], bool]
    describe: Callable[[Any], str]


def _bounds(condition: RangeCondition) -> str:
    parts = [f">= {condition.min:g}"] if condition.min is not None else []
    parts += [f"<= {condition.max:g}"] if condition.max is not None else []
    return " and ".join(parts)


_SCALAR = Rule(_scalar, lambda condition: f"= {condition!r}")
RULES: dict[type, Rule] = {
    str: _SCALAR, int: _SCALAR, float: _SCALAR,
    list: Rule(_membership, lambda condition: f"in {condition}"),
    RegexCondition: Rule(_regex, lambda condition: f"matches /{condition.regex}/"),
    RangeCondition: Rule(_range, _bounds),
    ContainsAllCondition: Rule(_contains_all, lambda condition: f"contains all of {condition.contains_all}"),
}


def _show(value: Any) -> str:
    return "\\".join(str(v) for v in value) if isinstance(value, tuple | list) else repr(value)
