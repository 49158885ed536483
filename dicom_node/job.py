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
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import Config, PipelineConfig
from dicom_node.journal import JobRecord
from dicom_node.results.outputs import Produced, write_outputs


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
    masks, probabilities = run_steps(config, pipeline, loaded.volume)
    inferred_at = time.monotonic()
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = write_results(config, job, pipeline, masks, probabilities, sources, loaded.volume, out_dir)
    encoded_at = time.monotonic()
    uids = tuple(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                 for path in exported)
    return JobOutput(tuple(str(p) for p in exported), uids,
                     {"load": loaded_at - started, "inference": inferred_at - loaded_at,
                      "encode": encoded_at - inferred_at})


def run_steps(config: Config, pipeline: PipelineConfig, volume):
    """Each step in order; a classifier crops by an earlier step's label map."""
    masks, probabilities = {}, []
    for step in pipeline.steps:
        if step.task == "lung_classical":
            from inference.lung import segment_lungs_classical
            masks[step.name] = segment_lungs_classical(volume)
            continue
        from inference import tasks
        repository, backend = open_inference(config)
        entry = repository.get(step.model)
        if step.task == "segmentation":
            masks[step.name] = tasks.segment(volume, entry, backend)
        else:
            probabilities.append(tasks.classify(volume, masks[step.input_mask], entry, backend))
    return masks, probabilities


def write_results(config: Config, job: JobRecord, pipeline: PipelineConfig, masks, probabilities, sources, pixels,
                  out_dir: Path) -> list[Path]:
    """The pipeline's outputs (SEG / SR / overlay, `results.outputs.OUTPUTS`) of the job; returns what gets
    exported. The label map written is the last mask a step produced."""
    produced = Produced(config.results, job.series_instance_uid, job.generation, job.pipeline,
                        list(masks.values())[-1] if masks else None, probabilities, sources, pixels, out_dir)
    return write_outputs(pipeline.outputs, produced)
