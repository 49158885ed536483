"""The HTTP face of dicom_node.ops.model_admin: `PUT` and `DELETE /admin/model/{name}`.

The upload is spooled (bounded by `http.admin.max_model_mb`) into a hidden folder of
the model repository, then parsed: a form from the spooled file, a zip as is.
Refusals are JSON `{"detail": ...}` with the status `ModelRefused` carries.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node.config import Config
from dicom_node.ops.model_admin import (Actor, InstalledModel, ModelRefused, audit_refusal, check_name, install_model,
                                        install_model_zip, remove_model)
from dicom_node.ops.uploads import MB, UploadRefused, spool_stream
from dicom_node.store.audit import AuditLog

FORM_OVERHEAD = MB  # multipart boundaries, headers, config.pbtxt and pipeline.yaml beside the model file
FORM_FILES = ("config", "model", "pipeline", "archive")
FORM_FIELDS = ("name", "csrf_token")  # the console's form: which model, and the session's CSRF token


def admin_routes(config: Config, audit: AuditLog) -> APIRouter:
    """`PUT` and `DELETE /admin/model/{name}` over install_model, install_model_zip and remove_model."""
    from dicom_node.pipeline.health import configured_models

    router = APIRouter()
    repository = Path(config.inference.model_repository)
    refusals = {status: {"description": text} for status, text in (
        (404, "no such model or version"), (409, "an enabled pipeline needs it (see force)"),
        (408, "the upload did not arrive within http.admin.upload_timeout_s"), (413, "over http.admin.max_model_mb"), (415, "neither multipart/form-data nor a zip, or not ONNX"),
        (422, "bad config.pbtxt or pipeline.yaml, name mismatch, a model that does not load or does not match "
              "its config, an unsafe zip"))}

    @router.put("/admin/model/{name}", status_code=201, responses=refusals,
                summary="Install the next version of a model: multipart/form-data with files `config` "
                        "(config.pbtxt), `model` (model.onnx) and optionally `pipeline` (pipeline.yaml), or "
                        "a zip of the model folder (as the form file `archive` or the body, application/zip)")
    async def put_model(name: str, request: Request) -> JSONResponse:
        actor = Actor.of(request, config, audit)
        try:
            check_name(name)
            installed = await install_upload(request, config, actor, lambda fields: name)
        except ModelRefused as refused:  # audited where it was raised
            return JSONResponse({"detail": refused.detail}, status_code=refused.status)
        except UploadRefused as refused:
            audit_refusal(actor, "model_installed", name, refused)
            return JSONResponse({"detail": refused.detail}, status_code=refused.status)
        return JSONResponse(jsonable_encoder(installed), status_code=201)

    @router.delete("/admin/model/{name}", responses=refusals,
                   summary="Remove a model (every version) or one version; refused while an enabled pipeline "
                           "would be left without it, unless force=true")
    def delete_model(name: str, request: Request, version: int | None = Query(None, ge=1),
                     force: bool = False) -> JSONResponse:
        try:
            removed = remove_model(repository, name, configured_models(config), version=version, force=force,
                                   actor=Actor.of(request, config, audit))
        except ModelRefused as refused:
            return JSONResponse({"detail": refused.detail}, status_code=refused.status)
        return JSONResponse(jsonable_encoder(removed))

    return router


async def install_upload(request: Request, config: Config, actor: Actor,
                         name_of: Callable[[dict[str, str]], str]) -> InstalledModel:
    """Spool the request body (bounded by `http.admin.max_model_mb`), read it as a zip or a form, and install
    it as the next version of the model `name_of` names, given the form's text fields (the API takes the
    name from its URL; the console from a field, once it has checked the field with its CSRF token).
    Raises ModelRefused (audited where raised) or UploadRefused (not yet audited)."""
    repository = Path(config.inference.model_repository)
    max_mb = config.http.admin.max_model_mb
    repository.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=repository) as folder:
        body = Path(folder) / "body"
        timeout_s = config.http.admin.upload_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await spool_stream(request.stream(), body, int(max_mb * MB) + FORM_OVERHEAD,
                                   request.headers.get("content-length"), "http.admin.max_model_mb")
        except TimeoutError:
            raise UploadRefused(408, f"the upload did not arrive within http.admin.upload_timeout_s "
                                     f"({timeout_s:g} s)") from None
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, str] = {}
        if media in ("application/zip", "application/x-zip-compressed"):
            files = {"archive": body}
        elif media == "multipart/form-data":
            files, fields = await _form(request, body, Path(folder))
        else:
            raise UploadRefused(415, f"Content-Type {media or 'none'}: send multipart/form-data (config, "
                                     "model, pipeline) or application/zip")
        name = name_of(fields)
        check_name(name)
        if "archive" in files:
            return await run_in_threadpool(install_model_zip, repository, name, files["archive"],
                                           max_model_mb=max_mb, actor=actor)
        if {"config", "model"} <= files.keys():
            return await run_in_threadpool(install_model, repository, name, files["config"], files["model"],
                                           files.get("pipeline"), max_model_mb=max_mb, actor=actor)
        raise UploadRefused(422, "the form needs the files config (config.pbtxt) and model "
                                 f"(model.onnx), or archive (a zip); it has {', '.join(files) or 'none'}")


async def _form(request: Request, body: Path, folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The form's files saved under `folder`, and its text fields (the console's model name and CSRF token),
    from the spooled body (the size was bounded while spooling)."""
    from starlette.requests import Request as StarletteRequest

    with body.open("rb") as handle:
        async def receive() -> dict:
            chunk = handle.read(MB)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        try:
            form = await StarletteRequest(request.scope, receive).form(max_files=len(FORM_FILES), max_fields=8)
        except Exception as error:  # python-multipart's and Starlette's own parse errors
            raise UploadRefused(422, f"unreadable multipart/form-data: {error}") from None
        files: dict[str, Path] = {}
        fields = {key: value for key in FORM_FIELDS if isinstance(value := form.get(key), str)}
        for key in FORM_FILES:
            value = form.get(key)
            if value is None or isinstance(value, str) or not (value.filename or value.size):
                continue  # a browser sends a file input left empty as an empty part without a file name
            files[key] = folder / key
            with files[key].open("wb") as out:
                shutil.copyfileobj(value.file, out)
        await form.close()
        unknown = set(form.keys()) - set(FORM_FILES) - set(FORM_FIELDS)
    if unknown:
        raise UploadRefused(422, f"unknown form field(s) {', '.join(sorted(unknown))}; the files are "
                                 f"{', '.join(FORM_FILES)}")
    return files, fields
