"""The work of one pipeline job: load the series, run each step, write the result objects.

This runs in a worker process (dicom_node.pipeline.workers), so it touches neither
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

from dicom_node.config import Config
from dicom_node.config.pipelines import PipelineConfig, StepConfig
from dicom_node.store.journal import JobRecord, StepOutcome
from dicom_node.states import StepState
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
    steps: tuple[StepOutcome, ...] = ()  # each step's outcome, in pipeline order
    prepared_frames: int = 0  # of `frames`, decoded while the series arrived (dicom_node.pipeline.prepare)
    frames: int = 0  # slices of the loaded volume
    # Inference requests per (server, outcome: ok or failed) of a triton backend since the worker's
    # previous job; the node's process counts them in its metrics (the worker owns none).
    inference_requests: tuple[tuple[str, str, int], ...] = ()


log = logging.getLogger(__name__)

_opened: dict[str, object] = {}  # this process's model repository and backend, once opened


def open_inference(config: Config):
    """This process's model repository and backend, opened on first use and kept (a model load is
    seconds): a worker's for its jobs, the node's for its readiness checks. Not thread-safe."""
    if not _opened:
        from inference.backends import open_backend
        from inference.repository import ModelRepository
        repository = ModelRepository(config.inference.model_repository)
        backend = open_backend(config.inference.backend_settings())  # may raise: nothing kept, the next call tries again
        _opened.update(repository=repository, backend=backend)
    return _opened["repository"], _opened["backend"]


def close_inference() -> None:
    backend = _opened.pop("backend", None)
    _opened.clear()
    if backend is not None:
        backend.close()


def preload(config: Config) -> None:
    """Import what every job uses (numpy, SimpleITK, the pixel codecs, highdicom: about 1 s of CPU), build
    a made-up SEG in memory (the first result a process builds loads highdicom's tables, 0.3 s) and, with the
    embedded backend, load the models of the enabled pipelines (0.5 s or more each), so that a worker
    started with the node has paid for all of it before its first job. A model that does not load is
    left to its first job, which fails with the reason. The node's own process imports this module for
    JobRequest only, and keeps its memory small by not calling this."""
    for module in ("dicom_node.pipeline.volume", "inference.tasks", "dicom_node.results.seg", "dicom_node.results.sr",
                   "dicom_node.results.measurements", "inference.involvement",
                   "dicom_node.results.overlay"):
        importlib.import_module(module)
    from dicom_node.results.seg import warm_up
    try:
        warm_up()
    except Exception as error:  # only time is lost: the first job loads the tables itself
        log.warning("job worker: the result writers were not warmed up: %s", error)
    if config.inference.backend != "embedded":
        return
    from dicom_node.pipeline.health import configured_models
    for model in configured_models(config):
        try:
            repository, backend = open_inference(config)
            backend.load(repository.get(model))
        except Exception as error:
            log.warning("job worker: model %s not loaded ahead (its first job tries again): %s", model, error)


def produce(request: JobRequest) -> JobOutput:
    """Load, run each step, write the results of the steps that gave some under `request.out_dir`.

    A step that fails takes only itself and the steps that need its mask with it (`run_steps`); with
    no step left that gave a result there is nothing to write, and the caller fails the job."""
    from dicom_node.pipeline.prepare import prepared_store
    from dicom_node.pipeline.volume import load_series
    job, config = request.job, request.config
    pipeline = config.pipelines[job.pipeline]
    started = time.monotonic()
    loaded = load_series([Path(p) for p in request.instance_paths], prepared=prepared_store(config))
    loaded_at = time.monotonic()
    ran = run_steps(config, pipeline, loaded.volume, f"job {job.id} ({job.pipeline})")
    inferred_at = time.monotonic()
    exported: list[Path] = []
    if any(outcome.state == StepState.OK for outcome in ran.outcomes):
        sources, frame_numbers = source_headers(loaded)
        out_dir = Path(request.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        exported = write_results(config, job, pipeline, ran, sources, frame_numbers, loaded.volume, out_dir)
    encoded_at = time.monotonic()
    uids = tuple(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                 for path in exported)
    return JobOutput(tuple(str(p) for p in exported), uids,
                     {"load": loaded_at - started, "inference": inferred_at - loaded_at,
                      "encode": encoded_at - inferred_at}, ran.outcomes,
                     inference_requests=_inference_requests(),
                     prepared_frames=loaded.prepared_frames, frames=len(loaded.slices))


def _inference_requests() -> tuple[tuple[str, str, int], ...]:
    from inference.backends import TritonBackend
    backend = _opened.get("backend")
    if not isinstance(backend, TritonBackend):
        return ()
    return tuple((server, outcome, count) for (server, outcome), count in sorted(backend.drain_counts().items()))


def source_headers(loaded) -> tuple[list[pydicom.Dataset], list[int | None]]:
    """The header of each volume slice's instance and its frame number (None in a single-frame instance),
    each file's header read once: a multi-frame instance is the source of every slice."""
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True)
               for path in dict.fromkeys(s.path for s in loaded.slices)}
    return [headers[s.path] for s in loaded.slices], [s.frame_number for s in loaded.slices]


@dataclass(frozen=True)
class StepResults:
    """What the steps of one run gave: label maps by step name, classifier outputs, each step's outcome."""

    masks: dict
    probabilities: list
    involvements: list  # each lung_involvement step's LungInvolvement
    outcomes: tuple[StepOutcome, ...]


def run_steps(config: Config, pipeline: PipelineConfig, volume, what: str) -> StepResults:
    """Each step in order; a classifier crops by an earlier step's label map. `what` names the run in log
    lines ("job 12 (spleen_ct)", "inference request ...").

    A step that raises fails alone: the steps whose `input_mask` it should have made are skipped, the
    others run. A model that is not there (no repository entry, an entry that does not parse, no
    weights file) is a state the site chose, logged as one WARNING line; anything else is a fault and
    keeps its traceback in the log.
    """
    from inference.backends import ModelFileMissing
    from inference.repository import RepositoryError
    masks, probabilities, involvements, outcomes = {}, [], [], []
    not_run: set[str] = set()
    for step in pipeline.steps:
        if step.input_mask in not_run:
            not_run.add(step.name)
            outcomes.append(StepOutcome(step.name, StepState.SKIPPED,
                                        f"needs step {step.input_mask}, which did not run"))
            continue
        try:
            _run_step(config, step, volume, masks, probabilities, involvements, what)
        except (RepositoryError, ModelFileMissing) as error:
            reason = f"model {step.model} is not installed or not usable: {error}"
            log.warning("%s: step %s not run: %s", what, step.name, reason.replace("\n", "; "))
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            log.exception("%s: step %s failed", what, step.name)
        else:
            outcomes.append(StepOutcome(step.name, StepState.OK))
            continue
        not_run.add(step.name)
        outcomes.append(StepOutcome(step.name, StepState.FAILED, reason))
    return StepResults(masks, probabilities, involvements, tuple(outcomes))


def _run_step(config: Config, step: StepConfig, volume, masks: dict, probabilities: list,
              involvements: list, what: str) -> None:
    """One step; its label map, probabilities or involvement figures go where the outputs look for them.
    The model version it runs is logged: the repository's latest at this moment (a version installed
    since the last job is loaded now, inference.backends), so a log line says which version made a result."""
    if step.task == "lung_classical":
        from inference.lung import segment_lungs_classical
        masks[step.name] = segment_lungs_classical(volume, step.parameters())
        return
    if step.task == "lung_involvement":
        from inference.involvement import quantify_involvement
        involvements.append(quantify_involvement(volume, masks[step.input_mask], step.parameters()))
        return
    from inference import tasks
    repository, backend = open_inference(config)
    entry = repository.get(step.model)
    log.info("%s: step %s runs model %s version %s", what, step.name, entry.name, entry.version)
    if step.task == "segmentation":
        masks[step.name] = tasks.segment(volume, entry, backend)
    else:
        probabilities.append(tasks.classify(volume, masks[step.input_mask], entry, backend))


def write_results(config: Config, job: JobRecord, pipeline: PipelineConfig, ran: StepResults, sources, frame_numbers,
                  pixels, out_dir: Path) -> list[Path]:
    """The pipeline's outputs (SEG / SR / overlay, `results.outputs.OUTPUTS`) of the job; returns what gets
    exported. The label map written is the last mask a step produced.

    `sources[k]` is the header of the instance volume slice k comes from, `frame_numbers[k]` its frame in a
    multi-frame instance (None for a single-frame one): results reference the exact frame.
    """
    produced = Produced(config.results, job.series_instance_uid, job.generation, job.pipeline,
                        list(config.pipelines).index(job.pipeline),
                        list(ran.masks.values())[-1] if ran.masks else None, ran.probabilities,
                        ran.involvements, ran.outcomes,
                        sources, frame_numbers, pixels, out_dir)
    return write_outputs(pipeline.outputs, produced)
