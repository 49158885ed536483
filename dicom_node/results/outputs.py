"""The outputs a pipeline lists under `outputs`, by name: which writer makes each, and which are exported.

Adding an output is adding its writer function and its line in `OUTPUTS` (and the
name to `config.PipelineConfig.outputs`, which a test keeps equal to `OUTPUTS`).
An output with `fallback_for` is written but exported only when the output it
stands in for wrote nothing or is not listed: the overlay series goes to a
destination only instead of the SEG (its other use is `Pipeline._overlay_fallback`,
for a destination that refuses SEG's SOP class), so a PACS never shows both.

The writers' modules (highdicom, numpy) are imported when an output is written,
not with this module: the node's own process imports `dicom_node.job`, which
imports this, only for its request types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.results import OutputSeries

if TYPE_CHECKING:
    import pydicom

    from dicom_node.config import ResultsConfig
    from dicom_node.journal import StepOutcome
    from inference.results import LabelMap


@dataclass(frozen=True)
class Produced:
    """What a job's steps produced, and for which series: what every writer gets."""

    results: ResultsConfig
    series_instance_uid: str
    generation: int
    pipeline: str
    position: int  # the pipeline's place in `pipelines`: its outputs' SeriesNumbers (OutputSeries)
    label_map: LabelMap | None  # the last mask a step produced, None when no step segments
    probabilities: Sequence[Any]  # each classifier step's ClassProbabilities
    steps: Sequence[StepOutcome]  # how each step went, said in the SR
    sources: Sequence[pydicom.Dataset]  # the source headers, in the label map's slice order
    frame_numbers: Sequence[int | None]  # each slice's frame in a multi-frame source, None for single-frame
    pixels: Any  # the CT volume in Hounsfield units on the label map's grid
    out_dir: Path

    def series(self, kind: str) -> OutputSeries:
        return OutputSeries.from_config(self.results, kind=kind, series_instance_uid=self.series_instance_uid,
                                        generation=self.generation, pipeline=self.pipeline, position=self.position,
                                        description=self.pipeline)


@dataclass(frozen=True)
class Output:
    write: Callable[[Produced], list[Path]]
    fallback_for: str | None = None  # exported only when this output wrote nothing or is not listed


def _seg(produced: Produced) -> list[Path]:
    from dicom_node.results.seg import SegOptions, write_seg
    if produced.label_map is None:
        return []
    path = write_seg(produced.label_map, produced.sources, produced.out_dir,
                     SegOptions.from_config(produced.results, produced.series("seg")), produced.frame_numbers)
    return [] if path is None else [path]  # None: an empty mask, skipped as configured


def _sr(produced: Produced) -> list[Path]:
    """One SR per classifier with its probabilities and how every step went; when no classifier gave
    probabilities but a step did not run, one SR that says so."""
    from dicom_node.results.sr import SrOptions, write_classification_sr
    from dicom_node.states import StepState
    not_all_ok = any(step.state != StepState.OK for step in produced.steps)
    return [write_classification_sr(result, produced.sources, produced.out_dir, SrOptions(produced.series("sr")),
                                    produced.steps)
            for result in produced.probabilities or ([None] if not_all_ok else [])]


def _overlay(produced: Produced) -> list[Path]:
    from dicom_node.results.overlay import OverlayOptions, write_overlay
    if produced.label_map is None:
        return []
    return write_overlay(produced.label_map, produced.sources, produced.pixels, produced.out_dir / "overlay",
                         OverlayOptions.from_config(produced.results, produced.series("overlay")),
                         produced.frame_numbers)


# In export order.
OUTPUTS: dict[str, Output] = {
    "seg": Output(_seg),
    "sr": Output(_sr),
    "overlay": Output(_overlay, fallback_for="seg"),
}


def write_outputs(names: Sequence[str], produced: Produced) -> list[Path]:
    """Write each output named in `names`; returns the files to export, in `OUTPUTS` order."""
    written = {name: output.write(produced) for name, output in OUTPUTS.items() if name in names}
    return [path for name, paths in written.items()
            if OUTPUTS[name].fallback_for is None or not written.get(OUTPUTS[name].fallback_for)
            for path in paths]
