"""The inference API viewers use (in the spirit of Clara AIAA): `POST /v1/infer/{pipeline_or_model}`,
and the node's recent log lines: `GET /logs`.

The body is the volume itself: a NIfTI file (.nii or .nii.gz) or a zip of one
DICOM series; which one is told from its first bytes, not its Content-Type.
`{pipeline_or_model}` names a configured, enabled pipeline (all its steps run,
as for a received series) or, failing that, a segmentation model of the
repository (its one step runs). The answer follows `Accept`:

- anything else (`*/*`, `application/gzip`): the label map as NIfTI
  (`mask.nii.gz`, uint8, 0 = background, on the input's grid: the pipeline's
  last segmenting step), with the measurements as compact JSON in the
  `X-Measurements` header;
- `application/dicom`: the DICOM SEG the pipeline would send (DICOM input only,
  406 for NIfTI: a SEG references its source images), measurements in the same
  header;
- `application/json`: the measurements only.

A mask or SEG answer is 204 (with the header) when there is none to send: no SEG
is written for an empty mask, and no mask is made when the segmenting step
failed while another step ran.

The measurements: each segment's voxels and volume (mL) with the algorithm the
SEG names, lung involvement figures, class probabilities, each step's outcome.

Requests run in the job workers, first come first served with the jobs of
received series (dicom_node.pipeline.workers); at most
`http.infer.max_concurrent` run and `http.infer.max_queued` wait, further ones
get 503 with Retry-After before their body is read. Every request is audited
(`inferred`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import pydicom
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from dicom_node import logs
from dicom_node.config.pipelines import PipelineConfig, StepConfig
from dicom_node.ops.model_admin import Actor
from dicom_node.ops.uploads import MB, UploadRefused, extract, open_zip, sniff, spool_stream
from dicom_node.pipeline.infer import InferOutput, InferRequest, InputUnusable, nifti_voxels
from dicom_node.pipeline.runner import NodeStopping
from dicom_node.pipeline.workers import JobError, WorkerDied
from dicom_node.config import Config
from dicom_node.store.audit import AuditEvent, AuditLog

RunInWorker = Callable[[InferRequest, float | None], InferOutput]  # JobRunner.run_infer

log = logging.getLogger(__name__)

NIFTI, DICOM, JSON = "application/gzip", "application/dicom", "application/json"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR's SOP class (PS3.10 8.6): an index, not an image


class _Admission:
    """At most `limit` requests admitted (running or waiting for a worker) at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._guard = threading.Lock()

    def enter(self) -> bool:
        with self._guard:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._guard:
            self.count -= 1


@dataclass(frozen=True)
class _Upload:
    nifti: str | None
    dicom_files: tuple[str, ...]
    series_instance_uid: str | None


def infer_routes(config: Config, audit: AuditLog, run_in_worker: RunInWorker) -> APIRouter:
    router = APIRouter()
    settings = config.http.infer
    admission = _Admission(settings.max_concurrent + settings.max_queued)
    running = threading.BoundedSemaphore(settings.max_concurrent)
    work_root = Path(config.node.storage_dir) / "infer"

    @router.post("/v1/infer/{pipeline_or_model}", summary="Run a pipeline or a segmentation model on an uploaded "
                 "NIfTI volume or zipped DICOM series", response_class=Response, responses={
                     200: {"content": {NIFTI: {}, DICOM: {}, JSON: {}},
                           "description": "the mask (NIfTI), the SEG, or the measurements; X-Measurements header"},
                     204: {"description": "no SEG (empty mask) or no mask (its step failed); X-Measurements"},
                     404: {"description": "no such pipeline or model"},
                     406: {"description": "the answer asked for cannot be made from this input or pipeline"},
                     408: {"description": "the upload did not arrive within http.infer.timeout_s"},
                     413: {"description": "over http.infer.max_upload_mb or max_unzipped_mb"},
                     415: {"description": "neither NIfTI nor zip"},
                     422: {"description": "unreadable volume, not one series, not 3-D"},
                     503: {"description": "too many requests (Retry-After), or the node is shutting down"},
                     504: {"description": "inference passed http.infer.timeout_s"}})
    async def infer(pipeline_or_model: str, request: Request) -> Response:
        actor = Actor.of(request, config, audit)
        try:
            answer = _answer_kind(request.headers.get("accept", ""))
            pipeline, position = _target(config, pipeline_or_model)
            if answer == "nifti" and not any(s.task in ("segmentation", "lung_classical") for s in pipeline.steps):
                raise UploadRefused(406, f"{pipeline_or_model} makes no mask; ask for {JSON}")
        except UploadRefused as refused:
            return _refusal(refused)
        if not admission.enter():
            return JSONResponse({"detail": f"{admission.limit} inference requests are already running or waiting "
                                           "(http.infer.max_concurrent + max_queued); try again later"},
                                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        request_id = uuid.uuid4().hex
        folder = work_root / request_id
        upload: _Upload | None = None
        try:
            folder.mkdir(parents=True)
            body = folder / "upload"
            try:
                async with asyncio.timeout(settings.timeout_s):  # a trickling client holds an admission
                    await spool_stream(request.stream(), body, int(settings.max_upload_mb * MB),
                                       request.headers.get("content-length"), "http.infer.max_upload_mb")
            except TimeoutError:
                raise UploadRefused(408, f"the upload did not arrive within http.infer.timeout_s "
                                         f"({settings.timeout_s:g} s)") from None
            upload = await run_in_threadpool(_unpack, body, folder, int(settings.max_unzipped_mb * MB))
            if answer == "dicom" and upload.nifti is not None:
                raise UploadRefused(406, "a DICOM SEG references its source images: send a zip of the DICOM "
                                         "series for application/dicom")
            work = InferRequest(config, pipeline_or_model, pipeline, position, request_id, upload.nifti,
                                upload.dicom_files, str(folder / "out"), seg=answer == "dicom")
            output = await run_in_threadpool(_run, run_in_worker, running, work, settings.timeout_s)
            response = _response(answer, output)
            _audit(actor, pipeline_or_model, upload, f"{response.status_code}", f"{output.seconds:.1f} s")
            return response
        except UploadRefused as refused:
            _audit(actor, pipeline_or_model, upload, str(refused.status), refused.detail)
            return _refusal(refused)
        finally:
            admission.leave()
            shutil.rmtree(folder, ignore_errors=True)

    @router.get("/logs", summary="The node's recent log lines (job workers' included), oldest first",
                response_class=PlainTextResponse)
    def recent_logs(lines: int = Query(200, ge=1, description=f"at most {logs.RECENT_LINES} are kept")
                    ) -> PlainTextResponse:
        return PlainTextResponse("".join(line + "\n" for line in logs.recent.tail(min(lines, logs.RECENT_LINES))))

    return router


def _answer_kind(accept: str) -> str:
    """The first media type of `Accept` the API answers with (q-values are not weighed)."""
    for item in accept.split(",") if accept.strip() else ["*/*"]:
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", NIFTI, "application/octet-stream", "application/x-nifti"):
            return "nifti"
        if media == DICOM:
            return "dicom"
        if media == JSON:
            return "json"
    raise UploadRefused(406, f"Accept {accept!r}: the answer is NIfTI ({NIFTI}), {DICOM} or {JSON}")


def _target(config: Config, name: str) -> tuple[PipelineConfig, int]:
    """The pipeline to run and its place in the config: an enabled pipeline of that name, else a one-step
    pipeline of the repository's segmentation model of that name."""
    pipelines = config.pipelines
    if name in pipelines:
        if not pipelines[name].enabled:
            raise UploadRefused(404, f"pipeline {name!r} is disabled in the config")
        return pipelines[name], list(pipelines).index(name)
    from inference.repository import ModelRepository, RepositoryError
    try:
        entry = ModelRepository(config.inference.model_repository).get(name)
    except RepositoryError:
        raise UploadRefused(404, f"no pipeline or model {name!r} (pipelines: {', '.join(pipelines) or 'none'}; "
                                 "models: GET /v1/models)") from None
    if entry.pipeline.task != "segmentation":
        raise UploadRefused(422, f"model {name!r} is a {entry.pipeline.task} model: it needs a mask from an "
                                 "earlier step; call a pipeline that has one")
    step = StepConfig(name=name, task="segmentation", model=name)
    return PipelineConfig.model_construct(enabled=True, match={}, destinations=[], steps=[step],
                                          outputs=["seg"]), len(pipelines)


def _unpack(body: Path, folder: Path, max_unzipped: int) -> _Upload:
    """The uploaded NIfTI file renamed so SimpleITK knows it, or the files of the zip's one DICOM series."""
    kind = sniff(body)
    if kind in ("nii", "nii.gz"):
        nifti = body.rename(folder / f"volume.{kind}")
        try:
            voxels = nifti_voxels(nifti)
        except InputUnusable as error:
            raise UploadRefused(422, str(error)) from None
        if voxels * 4 > max_unzipped:  # float32, as the steps compute
            raise UploadRefused(413, f"the NIfTI volume has {voxels} voxels, over http.infer.max_unzipped_mb "
                                     f"({max_unzipped / MB:g} MB as float32)")
        return _Upload(str(nifti), (), None)
    if kind != "zip":
        raise UploadRefused(415, "the body is neither a NIfTI volume (.nii, .nii.gz) nor a zip of a DICOM series")
    archive, members = open_zip(body, max_unzipped, "http.infer.max_unzipped_mb")
    dicom = folder / "dicom"
    dicom.mkdir()
    by_series: dict[str, list[str]] = {}
    with archive:
        for number, member in enumerate(members):
            target = dicom / f"{number}.dcm"  # never a name from the archive
            extract(archive, member, target)
            try:
                header = pydicom.dcmread(target, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, ValueError, EOFError, OSError):
                target.unlink()  # a README, a __MACOSX entry: not part of the series
                continue
            if str(header.get("SOPClassUID", "")) == MEDIA_DIRECTORY or "SeriesInstanceUID" not in header:
                target.unlink()
                continue
            by_series.setdefault(str(header.SeriesInstanceUID), []).append(str(target))
    if len(by_series) != 1:
        found = f"{len(by_series)} series ({', '.join(sorted(by_series))})" if by_series else "no DICOM instance"
        raise UploadRefused(422, f"the zip must hold the instances of one DICOM series; it holds {found}")
    ((series_uid, files),) = by_series.items()
    return _Upload(None, tuple(sorted(files)), series_uid)


def _run(run_in_worker: RunInWorker, running: threading.BoundedSemaphore, work: InferRequest,
         timeout_s: float) -> InferOutput:
    """Run the request in a job worker; the worker's failures as the client's status."""
    with running:
        started = time.monotonic()
        try:
            return run_in_worker(work, timeout_s)
        except JobError as error:
            if error.series_unusable or error.kind == "InputUnusable":
                raise UploadRefused(422, str(error)) from None
            log.error("inference request %s (%s) failed: %s: %s", work.request_id, work.target, error.kind, error)
            raise UploadRefused(500, f"inference failed: {error.kind}: {error}") from None
        except NodeStopping:
            raise UploadRefused(503, "the node is shutting down") from None
        except WorkerDied as died:
            if time.monotonic() - started >= timeout_s:
                raise UploadRefused(504, f"inference did not finish within http.infer.timeout_s ({timeout_s:g} s)") \
                    from None
            raise UploadRefused(500, f"inference failed: {died}") from None


def _response(answer: str, output: InferOutput) -> Response:
    measurements = json.dumps(output.measurements, separators=(",", ":"))
    if answer == "json":
        return Response(measurements, media_type=JSON)
    headers = {"X-Measurements": measurements}
    made, name, media = (output.seg, "seg.dcm", DICOM) if answer == "dicom" else (output.mask, "mask.nii.gz", NIFTI)
    if made is None:  # an empty mask makes no SEG; a segmenting step that failed while others ran, no mask
        return Response(status_code=204, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return Response(Path(made).read_bytes(), media_type=media, headers=headers)


def _refusal(refused: UploadRefused) -> JSONResponse:
    log.warning("inference request refused (%d): %s", refused.status, refused.detail)
    return JSONResponse({"detail": refused.detail}, status_code=refused.status)


def _audit(actor: Actor, target: str, upload: _Upload | None, status: str, detail: str) -> None:
    kind = "no volume" if upload is None else "NIfTI" if upload.nifti else f"DICOM ({len(upload.dicom_files)} files)"
    actor.audit.record(AuditEvent("inferred", host=actor.host, actor=actor.who, status=status,
                                  series_instance_uid=upload.series_instance_uid if upload else None,
                                  detail=f"by {actor.who}: {target}, {kind}: {detail}"))
