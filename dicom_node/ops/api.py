"""The node's HTTP API for admins and monitoring: health, readiness, Prometheus metrics, jobs.

Served by `dicom-node serve` (uvicorn in a thread) on `http.host:http.port`,
loopback by default. With `http.bearer_token` set (dicom_node.config.node requires it off
loopback) every path except `/healthz` and the STOW-RS endpoints under
`/dicomweb` (their senders have tokens of their own, dicom_node.receive.stow)
needs `Authorization: Bearer <token>`:
the API names studies, series and jobs. `/healthz` stays open because it says
nothing but "the process answers", and container health checks carry no token.
The OpenAPI description is at `/openapi.json`, browsable at `/docs` with Swagger UI's files served
by the node itself (from the swagger-ui-py package): a node next to a PACS often has no internet,
and a script from a CDN would run with the console's origin, next to its session.

Who may call what (Host names, Origin, bearer token, the console's login
sessions and CSRF tokens) is one check for the API and the console, before
every route: `dicom_node.ops.console.access`. `dicom-node serve` mounts the
console's pages on this app (`dicom_node.ops.console.mount_console`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import select

from dicom_node import ListenError, __version__
from dicom_node.store.audit import AUDIT_EVENTS, AuditLog, AuditRecord
from dicom_node.store.cluster import ClusterStatus
from dicom_node.config import Config
from dicom_node.config.node import HttpTlsConfig
from dicom_node.ops.console.access import Access, Caller
from dicom_node.store.journal import ExportRecord, JobRecord, Journal, SeriesRecord, StepOutcome
from dicom_node.store.schema import exports, jobs, series
from dicom_node.metrics import CONTENT_TYPE, NodeMetrics
from dicom_node.pipeline.health import InferenceOpener, configured_models, inference_servers, pipeline_health
from dicom_node.states import JobKind, JobState
from dicom_node.pipeline.requeue import NotRetryable, requeue
from dicom_node.ops.infer_api import RunInWorker, infer_routes
from dicom_node.ops.model_admin_api import admin_routes
from dicom_node.ops.status import NodeStatus, OpenAssociation, readiness, snapshot
from dicom_node.receive.stow import DICOM_JSON, PREFIX as STOW_PREFIX, StowReceiver

log = logging.getLogger("dicom_node.ops.api")

OPEN_PATHS = frozenset({"/healthz"})
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}  # what /docs loads, from swagger-ui-py's static folder
AuditEventKind = Literal[AUDIT_EVENTS]


@dataclass(frozen=True)
class NodeHandles:
    """What the API reads from the running node (built by `dicom_node.ops.server.serve`)."""

    config: Config
    journal: Journal
    metrics: NodeMetrics
    audit: AuditLog
    open_inference: InferenceOpener
    associations: Callable[[], list[OpenAssociation]]
    dicom_listening: Callable[[], bool]  # the DICOM port's accept loop runs
    pick_up_queued: Callable[[], None]  # the pipeline runs a requeued job without waiting for its next pass
    stow: StowReceiver  # STOW-RS receive: its own sender tokens, not the admin bearer token
    run_in_worker: RunInWorker  # an inference request of the API, in a job worker (JobRunner.run_infer)
    cluster: Callable[[], ClusterStatus | None] = lambda: None  # the nodes sharing the journal, if it is shared


@dataclass(frozen=True)
class ModelInfo:
    """One repository entry, in the spirit of Clara AIAA's model list."""

    name: str
    task: str | None
    platform: str | None
    version: int | None
    labels: list[str]
    pipelines: list[str]
    ready: bool
    error: str | None


@dataclass(frozen=True)
class JobDetail:
    job: JobRecord
    steps: list[StepOutcome]  # of its last run: ok, failed (reason) or skipped (reason: the step it needs)
    exports: list[ExportRecord]
    # The lung involvement figures of the job (from its SR's JSON copy), when it made some.
    lung_involvement: dict | None = None


@dataclass(frozen=True)
class SeriesDetail:
    generations: list[SeriesRecord]
    jobs: list[JobRecord]
    audit: list[AuditRecord]


def _involvement(output_dir: str | None) -> dict | None:
    """The lung involvement figures of the job's SR, from its JSON copy `SR_<SOP Instance UID>.json` in the
    job folder (dicom_node.results.sr.write_report), with the SR's and the referenced SEG's UIDs: the first
    lung_involvement step's (a pipeline has one). None when the job wrote no SR, had no such step, or the
    copy is unreadable."""
    if not output_dir:
        return None
    try:
        (path,) = Path(output_dir).glob("SR_*.json")  # one SR per job
        report = json.loads(path.read_text())
        figures = report["lung_involvement"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    uids = {key: report.get(key) for key in ("sop_instance_uid", "series_instance_uid",
                                             "referenced_seg_sop_instance_uid")}
    return {**uids, **figures[0]} if figures else None


def create_app(node: NodeHandles) -> FastAPI:
    app = FastAPI(title="dicom-node", version=__version__, docs_url=None, redoc_url=None,
                  description="Status, metrics and jobs of a DICOM node that runs AI pipelines on CT series.")
    access = Access(node.config.http)

    @app.middleware("http")
    async def access_control(request: Request, call_next):
        path = request.url.path
        caller = access.check(request, open_path=path in OPEN_PATHS or path.startswith(STOW_PREFIX + "/"))
        if not isinstance(caller, Caller):
            return caller
        request.state.caller = caller
        return await call_next(request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """A request that fails on something no route expected is logged with its traceback: without this,
        uvicorn answers 500 and the node's log says nothing."""
        log.error("HTTP %s %s failed: %s", request.method, request.url.path, error, exc_info=error)
        return JSONResponse({"detail": "internal error; the node's log has the details"}, status_code=500)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="dicom-node API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            raise HTTPException(404, "not a file of /docs")
        return Response(_docs_asset(name), media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness to take images: journal writable, disk above the floor, DICOM port "
             "listening (pipeline health is in /v1/status)", responses={503: {"description": "not ready; `reasons` says why"}})
    def readyz() -> JSONResponse:
        result = readiness(node.config, node.journal, node.dicom_listening)
        body = {"ready": result.ready, "reasons": result.reasons,
                "checks": [dataclasses.asdict(check) for check in result.checks]}
        return JSONResponse(body, status_code=200 if result.ready else 503)

    @app.get("/metrics", summary="Prometheus text exposition", response_class=Response)
    def metrics() -> Response:
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/status", summary="What `dicom-node status` shows, with each pipeline ready or degraded")
    def status() -> NodeStatus:
        return snapshot(node.config, node.journal, readiness(node.config, node.journal, node.dicom_listening),
                        pipeline_health(node.config, node.open_inference), source="node",
                        associations=node.associations(), received=node.metrics.received_by_transport(),
                        cluster=node.cluster(),
                        servers=inference_servers(node.config, node.open_inference))

    @app.get("/v1/models", summary="Models of the repository and the pipelines that use them")
    def models() -> list[ModelInfo]:
        return list_models(node.config, node.open_inference)

    @app.get("/v1/jobs", summary="Jobs, newest first")
    def list_jobs(state: JobState | None = None, kind: JobKind | None = None, pipeline: str | None = None,
                  series_instance_uid: str | None = None, limit: int = Query(100, ge=1, le=10000)) -> list[JobRecord]:
        query = select(jobs)
        for column, value in (("state", state), ("kind", kind), ("pipeline", pipeline),
                              ("series_instance_uid", series_instance_uid)):
            if value is not None:
                query = query.where(jobs.c[column] == value)
        return node.journal.select(JobRecord, query.order_by(jobs.c.id.desc()).limit(limit))

    @app.get("/v1/jobs/{job_id}", summary="One job with its exports", responses={404: {"description": "no such job"}})
    def get_job(job_id: int) -> JobDetail:
        job = _job_or_404(node.journal, job_id)
        return JobDetail(job, node.journal.job_steps(job_id)[job_id], node.journal.select(
            ExportRecord, select(exports).where(exports.c.job_id == job_id).order_by(exports.c.id)),
            _involvement(job.output_dir))

    @app.post("/v1/jobs/{job_id}/retry", status_code=202, summary="Requeue a failed (or done) job",
              responses={404: {"description": "no such job"}, 409: {"description": "the job is queued or running, or its series was purged"}})
    def retry_job(job_id: int, request: Request) -> JobRecord:
        try:
            job = requeue(node.audit, _job_or_404(node.journal, job_id), "the HTTP API",
                          host=request.client.host if request.client else None, actor=request.state.caller.actor)
        except NotRetryable as error:
            raise HTTPException(409, str(error)) from None
        log.info("job %d (%s) requeued through the API", job_id, job.pipeline)
        node.pick_up_queued()
        return job

    @app.get("/v1/series/{series_instance_uid}", summary="Every generation of a series, its jobs and audit trail",
             responses={404: {"description": "the journal has no such series"}})
    def get_series(series_instance_uid: str) -> SeriesDetail:
        generations = node.journal.select(SeriesRecord, select(series).where(
            series.c.series_instance_uid == series_instance_uid).order_by(series.c.generation))
        if not generations:
            raise HTTPException(404, f"no series {series_instance_uid} in the journal")
        return SeriesDetail(generations, node.journal.select(JobRecord, select(jobs).where(
            jobs.c.series_instance_uid == series_instance_uid).order_by(jobs.c.id)),
            node.audit.query(series_instance_uid=series_instance_uid, limit=1000))

    @app.get("/v1/audit", summary="Audit log, newest first: who sent what, what was produced, where it went")
    def audit(series_instance_uid: str | None = None, study_instance_uid: str | None = None,
              job_id: int | None = None, event: AuditEventKind | None = None,
              limit: int = Query(100, ge=1, le=10000)) -> list[AuditRecord]:
        return node.audit.query(series_instance_uid=series_instance_uid, study_instance_uid=study_instance_uid,
                                job_id=job_id, event=event, limit=limit)

    stow_responses = {
        200: {"description": "every instance stored (ReferencedSOPSequence)", "content": {DICOM_JSON: {}}},
        202: {"description": "some instances stored, some failed (FailedSOPSequence with FailureReason)"},
        400: {"description": "malformed multipart body, or no part is a usable DICOM instance"},
        401: {"description": "no or unknown sender token"}, 403: {"description": "STOW-RS not enabled"},
        409: {"description": "no instance stored; FailedSOPSequence says why for each"},
        413: {"description": "over http.stow.max_request_mb or http.stow.max_instances"},
        415: {"description": "not multipart/related; type=\"application/dicom\""},
        503: {"description": "the node is shutting down"}}

    @app.post(f"{STOW_PREFIX}/studies", summary="STOW-RS: store instances (PS3.18 10.5)", responses=stow_responses)
    async def stow_instances(request: Request) -> Response:
        return await node.stow.receive(request, None)

    @app.post(f"{STOW_PREFIX}/studies/{{study}}", summary="STOW-RS: store instances of one study (PS3.18 10.5)",
              responses=stow_responses)
    async def stow_study_instances(study: str, request: Request) -> Response:
        return await node.stow.receive(request, study)

    app.include_router(admin_routes(node.config, node.audit))  # PUT/DELETE /admin/model/{name}
    app.include_router(infer_routes(node.config, node.audit, node.run_in_worker))  # /v1/infer/..., /logs
    app.state.access = access  # the console's login shares its sessions (dicom_node.ops.console)
    return app


def list_models(config: Config, open_inference: InferenceOpener) -> list[ModelInfo]:
    """Every entry of the repository (a broken one listed with its error) plus models pipelines name but lack."""
    from inference.repository import RepositoryError

    used = configured_models(config)
    root = Path(config.inference.model_repository)
    names = set(used)
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / "config.pbtxt").exists() or (p / "pipeline.yaml").exists())}
    try:
        repository, backend = open_inference()
    except Exception as error:
        return [ModelInfo(name, None, None, None, [], used.get(name, []), False, f"backend: {error}")
                for name in sorted(names)]
    infos = []
    for name in sorted(names):
        try:
            entry = repository.get(name)
        except RepositoryError as error:
            infos.append(ModelInfo(name, None, None, None, [], used.get(name, []), False, str(error)))
            continue
        spec = entry.pipeline
        labels = [label.name for label in spec.labels] or (
            [c.name for c in spec.classification.classes] if spec.classification else [])
        try:
            backend.check(entry)
            error = None
        except Exception as failure:
            error = str(failure)
        infos.append(ModelInfo(name, spec.task, entry.platform, entry.version, labels, used.get(name, []),
                               error is None, error))
    return infos


def _job_or_404(journal: Journal, job_id: int) -> JobRecord:
    job = journal.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@functools.cache
def _docs_asset(name: str) -> bytes:
    return (importlib.resources.files("swagger_ui") / "static" / name).read_bytes()


class ApiServer:
    """uvicorn serving the app on a thread of `serve` (its signal handling stays with `serve`)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: HttpTlsConfig | None = None) -> None:
        self.address = f"{host}:{port}"
        self.url = f"{'https' if tls else 'http'}://{self.address}"
        certificate = {} if tls is None else {"ssl_certfile": str(tls.certificate), "ssl_keyfile": str(tls.private_key)}
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off", **certificate))
        self._thread = threading.Thread(target=self.server.run, name="http-api", daemon=True)

    def start(self, timeout: float = 30) -> None:
        """Return once listening; raise if the address cannot be bound (uvicorn's thread then ends)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ListenError(f"HTTP API could not listen on {self.address} (address in use or not local?)")
            time.sleep(0.02)
        log.info("HTTP API on %s (/healthz /readyz /metrics /v1/... /docs)", self.url)

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
