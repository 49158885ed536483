"""The work of one pipeline job: load the series, run each step, write the result objects.

This runs in a worker process (dicom_node.workers), so it touches neither
the journal nor the metrics: it gets everything it needs in a JobRequest and
hands back a JobOutput, and the node's own process records what happened.
The model repository and inference backend are opened on the first job a
worker runs and kept for the next ones (a model load takes seconds).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import Config, PipelineConfig
from dicom_node.journal import JobRecord
from dicom_node.results import OutputSeries


@dataclass(frozen=True)
class JobRequest:
    config: Config
    job: JobRecord
    study_instance_uid: str
    instance_paths: tuple[str, ...]
    out_dir: str


@dataclass(frozen=True)
class JobOutput:
    exported: tuple[str, ...]  # result files to send, in order
    sop_instance_uids: tuple[str, ...]  # of `exported`
    seconds: dict[str, float]  # load, inference, encode


log = logging.getLogger(__name__)

_opened: dict[str, object] = {}  # this process's model repository and backend, once opened


def open_inference(config: Config):
    """This process's model repository and backend, opened on first use and kept (a model load is
    seconds): a worker's for its jobs, the node's for its readiness checks. Not thread-safe."""
    if not _opened:
        from inference.backends import open_backend
        from inference.repository import ModelRepository
        from dicom_node.models import backend_settings
        repository = ModelRepository(config.inference.model_repository)
        _opened["repository"] = repository
        _opened["backend"] = open_backend(backend_settings(config))
    return _opened["repository"], _opened["backend"]


def close_inference() -> None:
    backend = _opened.pop("backend", None)
    _opened.clear()
    if backend is not None:
        backend.close()


def preload(config: Config) -> None:
    """Import what every job uses (numpy, SimpleITK, the pixel codecs, highdicom: about 1 s of CPU) and,
    with the embedded backend, load the models of the enabled pipelines (0.5 s or more each), so that
    a worker started with the node has paid for both before its first job. A model that does not load
    is left to its first job, which fails with the reason. The node's own process imports this module
    for JobRequest only, and keeps its memory small by not calling this."""
    for module in ("dicom_node.volume", "inference.tasks", "dicom_node.results.seg", "dicom_node.results.sr",
                   "dicom_node.results.measurements", "inference.involvement",
                   "dicom_node.results.overlay"):
        importlib.import_module(module)
    if config.inference.backend != "embedded":
        return
    from dicom_node.status import configured_models
    for model in configured_models(config):
        try:
            repository, backend = open_inference(config)
            backend.load(repository.get(model))
        except Exception as error:
            log.warning("job worker: model %s not loaded ahead (its first job tries again): %s", model, error)


def produce(request: JobRequest) -> JobOutput:
    """Load, run each step, write the results under `request.out_dir`."""
    from dicom_node.volume import load_series
    job, config = request.job, request.config
    pipeline = config.pipelines[job.pipeline]
    started = time.monotonic()
    loaded = load_series([Path(p) for p in request.instance_paths])
    loaded_at = time.monotonic()
    masks, probabilities, involvements = run_steps(config, pipeline, loaded.volume)
    inferred_at = time.monotonic()
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = write_results(config, job, pipeline, masks, probabilities, sources, loaded.volume, out_dir,
                             involvements)
    encoded_at = time.monotonic()
    uids = tuple(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                 for path in exported)
    return JobOutput(tuple(str(p) for p in exported), uids,
                     {"load": loaded_at - started, "inference": inferred_at - loaded_at,
                      "encode": encoded_at - inferred_at})


def run_steps(config: Config, pipeline: PipelineConfig, volume):
    """Each step in order; a classifier crops by an earlier step's label map, lung_involvement measures
    inside one."""
    masks, probabilities, involvements = {}, [], []
    for step in pipeline.steps:
        if step.task == "lung_classical":
            from inference.lung import segment_lungs_classical
            masks[step.name] = segment_lungs_classical(volume, step.parameters())
            continue
        if step.task == "lung_involvement":
            from inference.involvement import quantify_involvement
            involvements.append(quantify_involvement(volume, masks[step.input_mask], step.parameters()))
            continue
        from inference import tasks
        repository, backend = open_inference(config)
        entry = repository.get(step.model)
        if step.task == "segmentation":
            masks[step.name] = tasks.segment(volume, entry, backend)
        else:
            probabilities.append(tasks.classify(volume, masks[step.input_mask], entry, backend))
    return masks, probabilities, involvements


def write_results(config: Config, job: JobRecord, pipeline: PipelineConfig, masks, probabilities, sources, pixels,
                  out_dir: Path, involvements=()) -> list[Path]:
    """SEG / SR / overlay files of the job; returns what gets exported.

    A lung involvement result adds its opacity segments to the SEG (after the
    lungs) and, with `sr`, a measurement SR that references the SEG's segments.

    The overlay (secondary capture) series is exported only when the pipeline
    makes no SEG; otherwise it is the fallback for a destination that refuses
    SEG's SOP class (Pipeline._overlay_fallback), so a PACS never shows both.
    """
    from dicom_node.results.overlay import OverlayOptions, write_overlay
    from dicom_node.results.seg import SegOptions, write_seg
    from dicom_node.results.measurements import write_involvement_sr
    from dicom_node.results.sr import SrOptions, write_classification_sr
    results = config.results

    def series(kind: str, name: str) -> OutputSeries:
        return OutputSeries.from_config(results, kind=kind, series_instance_uid=job.series_instance_uid,
                                        generation=job.generation, pipeline=job.pipeline, description=name)

    written: dict[str, list[Path]] = defaultdict(list)
    label_map = list(masks.values())[-1] if masks else None  # the last mask a step produced
    segmentations = [label_map, *(i.opacities for i in involvements)] if label_map is not None else []
    if segmentations and "seg" in pipeline.outputs:
        path = write_seg(segmentations, sources, out_dir, SegOptions.from_config(results, series("seg", job.pipeline)))
        if path is not None:
            written["seg"].append(path)
    if label_map is not None and "overlay" in pipeline.outputs:
        written["overlay"] += write_overlay(label_map, sources, pixels, out_dir / "overlay",
                                            OverlayOptions.from_config(results, series("overlay", job.pipeline)))
    if "sr" in pipeline.outputs:
        for result in probabilities:
            written["sr"].append(write_classification_sr(result, sources, out_dir,
                                                         SrOptions(series("sr", job.pipeline))))
        for result in (r for r in involvements if r.lungs):  # no lung found: nothing measured, no report
            written["sr"].append(write_involvement_sr(result, sources, written["seg"][:1], out_dir,
                                                      SrOptions(series("sr", job.pipeline))))
    if "keyimage" in pipeline.outputs and label_map is not None:
        from dicom_node.results.keyimage import KeyImageOptions, write_key_images
        for result in involvements:  # numbered like the overlay series, which a SEG-making job does not export
            written["keyimage"] += write_key_images(result, label_map, pixels, sources, out_dir,
                                                    KeyImageOptions(series("overlay", job.pipeline)))
    exported = written["seg"] + written["sr"] + written["keyimage"]
    if "seg" not in pipeline.outputs or not written["seg"]:
        exported += written["overlay"]
    return exported
