"""Pipeline health: can each enabled pipeline run all of its steps now?

Taking images and running pipelines are different promises. `/readyz` answers
the first (journal writable, disk above the floor, DICOM port listening:
`dicom_node.ops.status.readiness`), so a load balancer keeps sending studies to
a node whose spleen pipeline works while a classifier of its chest pipeline
is not installed. This module answers the second, once, for every view of it:
`/v1/status`, `dicom-node status`, the `dicom_node_pipeline_ready` metric and
`dicom-node models check` all call `pipeline_health`.

A pipeline is `ready` when the backend serves every model its steps name;
otherwise `degraded`, with a reason per unavailable model. A degraded pipeline
still runs: its steps fail alone (`dicom_node.pipeline.job.run_steps`), the others
deliver, and the SR says which did not run.

With the triton backend, each server of the pool is reported beside the
pipelines (`inference_servers`): up, or down with the reason. A pipeline stays
ready while one server serves its models; the server list says which is down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.config import Config
from inference.server_pool import ServerState

InferenceOpener = Callable[[], tuple[object, object]]  # () -> (ModelRepository, Backend)
READY, DEGRADED = "ready", "degraded"


@dataclass(frozen=True)
class PipelineHealth:
    pipeline: str
    state: str  # READY or DEGRADED
    reasons: list[str] = field(default_factory=list)  # one per step whose model is not available

    @property
    def ready(self) -> bool:
        return self.state == READY

    def describe(self) -> str:
        """`ready`, or `degraded (step covid: model covid19_ct: ...)`: what every view prints."""
        return self.state if self.ready else f"{self.state} ({'; '.join(self.reasons)})"


def configured_models(config: Config) -> dict[str, list[str]]:
    """Repository model name -> the enabled pipelines that use it."""
    used: dict[str, list[str]] = {}
    for name, pipeline in config.pipelines.items():
        if pipeline.enabled:
            for step in pipeline.steps:
                if step.model:
                    used.setdefault(step.model, []).append(name)
    return used


def model_problems(config: Config, open_inference: InferenceOpener) -> dict[str, str]:
    """Model name -> why the backend cannot serve it, for every model an enabled pipeline names
    (absent: it can). Each model is looked up and checked once, however many pipelines use it."""
    models = configured_models(config)
    if not models:
        return {}
    try:
        repository, backend = open_inference()
    except Exception as error:
        return {model: f"{config.inference.backend} backend: {error}" for model in models}
    problems = {}
    for model in models:
        try:
            backend.check(repository.get(model))
        except Exception as error:  # RepositoryError, BackendError, or the runtime's own
            problems[model] = str(error).replace("\n", "; ")
    return problems


def pipeline_health(config: Config, open_inference: InferenceOpener) -> list[PipelineHealth]:
    """The health of every enabled pipeline, in config order."""
    problems = model_problems(config, open_inference)
    health = []
    for name, pipeline in config.pipelines.items():
        if not pipeline.enabled:
            continue
        reasons = [f"step {step.name}: model {step.model} not available: {problems[step.model]}"
                   for step in pipeline.steps if step.model in problems]
        health.append(PipelineHealth(name, DEGRADED if reasons else READY, reasons))
    return health


def inference_servers(config: Config, open_inference: InferenceOpener) -> list[ServerState]:
    """Each server of the triton backend's pool, probed now: up, or down and why (a down server found
    ready here gets requests again); [] with the embedded backend."""
    if config.inference.backend != "triton":
        return []
    try:
        _, backend = open_inference()
    except Exception as error:  # no server ready: the error says, server by server, why
        return [ServerState(url, False, str(error).replace("\n", "; ")) for url in config.inference.triton.servers]
    return backend.servers()
