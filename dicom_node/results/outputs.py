"""The outputs a pipeline lists under `outputs`, by name: which writer makes each, and which are exported.

Adding an output is adding its writer function and its line in `OUTPUTS` (and the
name to `config.PipelineConfig.outputs`, which a test keeps equal to `OUTPUTS`).
An output with `fallback_for` is written but exported only when the output it
stands in for wrote nothing or is not listed: the overlay series goes to a
destination only instead of the SEG (its other use is `ExportDispatcher._overlay_fallback`,
for a destination that refuses SEG's SOP class), so a PACS never shows both.

The writers' modules (highdicom, numpy) are imported when an output is written,
not with this module: the node's own process imports `dicom_node.pipeline.job`, which
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

    from dicom_node.config.results import ResultsConfig
    from dicom_node.store.journal import StepOutcome
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
    involvements: Sequence[Any]  # each lung_involvement step's LungInvolvement (inference.involvement)
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
    # The writer gets what the job produced and the files the outputs before it wrote, by name (the
    # SR references the SEG it follows).
    write: Callable[[Produced, dict[str, list[Path]]], list[Path]]
    fallback_for: str | None = None  # exported only when this output wrote nothing or is not listed


def _seg(produced: Produced, written: dict[str, list[Path]]) -> list[Path]:
    from dicom_node.results.seg import SegOptions, write_seg
    if produced.label_map is None:
        return []
    # The opacities a lung involvement step found are segments of the same SEG, after the lungs.
    label_maps = [produced.label_map, *(involvement.opacities for involvement in produced.involvements)]
    path = write_seg(label_maps, produced.sources, produced.out_dir,
                     SegOptions.from_config(produced.results, produced.series("seg")), produced.frame_numbers)
    return [] if path is None else [path]  # None: an empty mask, skipped as configured


def _sr(produced: Produced, written: dict[str, list[Path]]) -> list[Path]:
    """The job's one measurement report: lung involvement, every classifier's probabilities, how each step
    went (`sr.write_report`); none when every step completed and none measured anything."""
    from dicom_node.results.sr import ReportContent, SrOptions, write_report
    content = ReportContent(produced.steps, produced.probabilities, produced.involvements)
    path = write_report(content, produced.sources, produced.out_dir, SrOptions(produced.series("sr")),
                        next(iter(written.get("seg", [])), None))  # the SEG whose segments it references
    return [] if path is None else [path]


def _keyimage(produced: Produced, written: dict[str, list[Path]]) -> list[Path]:
    from dicom_node.results.keyimage import KeyImageOptions, write_key_images
    if produced.label_map is None:
        return []
    return [path for result in produced.involvements
            for path in write_key_images(result, produced.label_map, produced.pixels, produced.sources,
                                         produced.out_dir, KeyImageOptions(produced.series("keyimage")))]


def _overlay(produced: Produced, written: dict[str, list[Path]]) -> list[Path]:
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
    "keyimage": Output(_keyimage),  # axial and coronal key images of a lung involvement step
}


def write_outputs(names: Sequence[str], produced: Produced) -> list[Path]:
    """Write each output named in `names`; returns the files to export, in `OUTPUTS` order."""
    written: dict[str, list[Path]] = {}
    for name, output in OUTPUTS.items():
        if name in names:
            written[name] = output.write(produced, written)
    return [path for name, paths in written.items()
            if OUTPUTS[name].fallback_for is None or not written.get(OUTPUTS[name].fallback_for)
            for path in paths]
