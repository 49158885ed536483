"""The console's routes: pages read the journal, the audit log and the node's status; forms act through
`dicom_node.pipeline.requeue` (the CLI's and the API's one path), audited with who did it."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dicom_node.config.console import USER_NAME_MAX
from dicom_node.ops.api import NodeHandles, list_models
from dicom_node.ops.console.access import (CSRF_FIELD, LOGIN_PATH, SESSION_COOKIE, Access, Caller, csrf_ok)
from dicom_node.ops.console.png import encode_png
from dicom_node.ops.model_admin import Actor, ModelRefused, audit_refusal
from dicom_node.ops.model_admin_api import install_upload
from dicom_node.ops.uploads import UploadRefused
from dicom_node.ops.console.preview import PLANES, WINDOWS, PreviewError, ResultCache, find_seg, legend, render
from dicom_node.ops.status import readiness, snapshot
from dicom_node.passwords import hash_password, verify_password
from dicom_node.pipeline.health import pipeline_health
from dicom_node.pipeline.requeue import NotRetryable, discard_export, discard_job, requeue, requeue_export
from dicom_node.states import ExportState, JobState, SeriesState
from dicom_node.store.audit import AuditEvent
from dicom_node.store.journal import ExportRecord, InstanceRecord, JobRecord, SeriesRecord, utcnow
from dicom_node.store.schema import exports, instances, jobs, series

log = logging.getLogger("dicom_node.ops.console")

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
REFRESH_S = 5  # the overview and a series still in progress reload themselves
SECRET_WORDS = ("token", "password", "secret")
VIA = "the console"


def redacted(value: Any, key: str = "") -> Any:
    """The effective config as JSON with secrets replaced: values under a key naming a token, password or
    secret, and the password in a journal URL."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if value is not None and any(word in key.lower() for word in SECRET_WORDS):
        return "(redacted)"
    if key == "journal_url" and isinstance(value, str):
        return make_url(value).render_as_string(hide_password=True)
    return value


def sr_figures(output_dir: str | None) -> dict | None:
    """The figures of the job's SR from its JSON copy `SR_<SOP Instance UID>.json` (dicom_node.results.sr):
    classifications and lung involvement; None when the job wrote no SR."""
    if not output_dir:
        return None
    for path in sorted(Path(output_dir).glob("SR_*.json")):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def job_timings(job: JobRecord) -> dict[str, float]:
    """Seconds of each stage of the job's last run (load, inference, encode), from `timings.json` in its folder."""
    if not job.output_dir:
        return {}
    try:
        return {k: float(v) for k, v in json.loads((Path(job.output_dir) / "timings.json").read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def router(node: NodeHandles, access: Access) -> APIRouter:
    routes = APIRouter(include_in_schema=False)
    previews = ResultCache()
    users = {user.name: user.password_hash for user in node.config.http.console.users}
    # An unknown name is checked against this, so a login takes as long whether or not the name exists.
    nobody = hash_password(secrets.token_urlsafe(16))

    def page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
        caller: Caller = request.state.caller
        return TEMPLATES.TemplateResponse(request, template, {
            "viewer": caller, "csrf_token": caller.session.csrf_token if caller.session else "",
            "csrf_field": CSRF_FIELD, "ae_title": node.config.node.ae_title, **context}, status_code=status_code)

    def acting(request: Request, csrf_token: str | None) -> Caller:
        caller: Caller = request.state.caller
        if not caller.may_act or not csrf_ok(caller, csrf_token):
            log.warning("console: %s %s refused: missing or wrong CSRF token", request.method, request.url.path)
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return caller

    def client_host(request: Request) -> str | None:
        return request.client.host if request.client else None

    def back(message: str) -> RedirectResponse:
        return RedirectResponse(f"/console/failures?message={quote(message)}", status_code=303)

    # --- login ---------------------------------------------------------------------------------------

    @routes.get(LOGIN_PATH, response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", next=_local(next), failed=False, users=bool(users))

    @routes.post(LOGIN_PATH)
    def login(request: Request, username: str = Form(...), password: str = Form(...), next: str = Form("/")):
        host = client_host(request) or ""
        name = username[:USER_NAME_MAX]  # no user's name is longer: what the failure count and the logs key on
        wait_s = access.failed_logins.retry_after(name, host)
        if wait_s > 0:  # refused whatever the password: a guess that would be right is not told apart
            log.warning("console: login for %r from %s refused: too many failed logins", name, host)
            minutes = max(1, round(wait_s / 60))
            response = page(request, "login.html", status_code=429, next=_local(next), failed=False,
                            users=bool(users), locked_minutes=minutes)
            response.headers["Retry-After"] = str(max(1, round(wait_s)))
            return response
        stored = users.get(username)
        if not verify_password(password, stored or nobody) or stored is None:
            node.audit.record(AuditEvent("login-failed", host=host, actor=name,
                                         detail="unknown user or wrong password"))
            log.warning("console: failed login for %r from %s", name, host)
            if access.failed_logins.failed(name, host):
                limits = node.config.http.console
                detail = (f"{limits.failed_logins} failed logins within {limits.lockout_minutes:g} min: this name "
                          f"is refused from this host until the oldest is {limits.lockout_minutes:g} min old")
                node.audit.record(AuditEvent("login-locked", host=host, actor=name, detail=detail))
                log.warning("console: %r from %s: %s", name, host, detail)
            return page(request, "login.html", status_code=401, next=_local(next), failed=True, users=bool(users))
        access.failed_logins.succeeded(name, host)
        session = access.sessions.start(username)
        node.audit.record(AuditEvent("login", host=client_host(request), actor=username))
        response = RedirectResponse(_local(next), status_code=303)
        access.session_cookie(response, session)
        return response

    @routes.post("/logout")
    def logout(request: Request, csrf_token: str | None = Form(None)):
        caller = acting(request, csrf_token)
        if caller.session is not None:
            access.sessions.end(caller.session.id)
            node.audit.record(AuditEvent("logout", host=client_host(request), actor=caller.actor))
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- overview ------------------------------------------------------------------------------------

    @routes.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> HTMLResponse:
        status = snapshot(node.config, node.journal, readiness(node.config, node.journal, node.dicom_listening),
                          pipeline_health(node.config, node.open_inference), source="node",
                          associations=node.associations(), received=node.metrics.received_by_transport())
        now = utcnow()
        with node.journal.engine.connect() as conn:
            def count(query) -> int:
                return conn.execute(query).scalar() or 0
            rates = {
                "instances_5min": count(select(func.count()).select_from(instances).where(
                    instances.c.received_at >= now - timedelta(minutes=5))),
                "instances_1h": count(select(func.count()).select_from(instances).where(
                    instances.c.received_at >= now - timedelta(hours=1))),
                "jobs_1h": count(select(func.count()).select_from(jobs).where(
                    (jobs.c.finished_at >= now - timedelta(hours=1)) & (jobs.c.state == JobState.DONE))),
                "failed_1h": count(select(func.count()).select_from(jobs).where(
                    (jobs.c.finished_at >= now - timedelta(hours=1)) & (jobs.c.state == JobState.FAILED))),
            }
        failed_jobs = node.journal.select(JobRecord, select(jobs).where(jobs.c.state == JobState.FAILED)
                                          .order_by(jobs.c.id.desc()).limit(10))
        dead = node.journal.select(ExportRecord, select(exports).where(exports.c.state == ExportState.DEAD)
                                   .order_by(exports.c.id.desc()).limit(10))
        return page(request, "overview.html", refresh=REFRESH_S, status=status, rates=rates,
                    queue_depth=status.jobs.get(JobState.QUEUED, 0), running=status.jobs.get(JobState.RUNNING, 0),
                    backend=node.config.inference.backend, failed_jobs=failed_jobs, dead=dead)

    # --- studies and series --------------------------------------------------------------------------

    @routes.get("/console/series", response_class=HTMLResponse)
    def series_list(request: Request, patient_id: str = "", accession_number: str = "", study_date: str = "",
                    calling_ae: str = "", state: str = "", limit: int = Query(200, ge=1, le=5000)) -> HTMLResponse:
        filters = {"patient_id": patient_id.strip(), "accession_number": accession_number.strip(),
                   "study_date": study_date.strip().replace("-", ""), "calling_ae": calling_ae.strip(),
                   "state": state.strip()}
        query = select(series)
        for column, value in filters.items():
            if value:
                query = query.where(series.c[column] == value)
        found = node.journal.select(SeriesRecord, query.order_by(series.c.first_received_at.desc()).limit(limit))
        return page(request, "series_list.html", series=found, filters=filters, limit=limit,
                    states=[s.value for s in SeriesState])

    @routes.get("/console/series/{series_instance_uid}", response_class=HTMLResponse)
    def series_page(request: Request, series_instance_uid: str) -> HTMLResponse:
        generations = node.journal.select(SeriesRecord, select(series).where(
            series.c.series_instance_uid == series_instance_uid).order_by(series.c.generation))
        if not generations:
            raise HTTPException(404, f"no series {series_instance_uid} in the journal")
        job_list = node.journal.select(JobRecord, select(jobs).where(
            jobs.c.series_instance_uid == series_instance_uid).order_by(jobs.c.id))
        steps = node.journal.job_steps(*(job.id for job in job_list)) if job_list else {}
        job_exports = {job.id: node.journal.select(ExportRecord, select(exports).where(
            exports.c.job_id == job.id).order_by(exports.c.id)) for job in job_list}
        listed = node.journal.select(InstanceRecord, select(instances).where(
            instances.c.series_instance_uid == series_instance_uid).order_by(instances.c.received_at).limit(1000))
        latest = generations[-1]
        in_progress = latest.state in (SeriesState.RECEIVING, SeriesState.COMPLETE) or any(
            job.state in (JobState.QUEUED, JobState.RUNNING) for job in job_list) or any(
            e.state == ExportState.PENDING for es in job_exports.values() for e in es)
        purged = {g.generation for g in generations if g.state == SeriesState.PURGED}
        segs = {job.id: find_seg(job.output_dir) for job in job_list}
        results = {job.id: {"seg": segs[job.id] is not None, "report": sr_figures(job.output_dir),
                            "legend": legend(segs[job.id]) if segs[job.id] else [],
                            "purged": job.generation in purged,
                            "timings": job_timings(job), "lung": _has_involvement_step(node, job)}
                   for job in job_list}
        return page(request, "series.html", refresh=REFRESH_S if in_progress else None, uid=series_instance_uid,
                    generations=generations, latest=latest, jobs=job_list, steps=steps, exports=job_exports,
                    instances=listed, results=results, planes=PLANES, windows=WINDOWS,
                    audit=node.audit.query(series_instance_uid=series_instance_uid, limit=500))

    @routes.get("/console/jobs/{job_id}/preview/{plane}.png")
    def preview(job_id: int, plane: str, window: str = "soft", bands: bool = False) -> Response:
        if plane not in PLANES or window not in WINDOWS:
            raise HTTPException(404, f"plane is one of {', '.join(PLANES)}; window one of {', '.join(WINDOWS)}")
        job = node.journal.get_job(job_id)
        seg_path = find_seg(job.output_dir) if job else None
        if job is None or seg_path is None:
            raise HTTPException(404, f"job {job_id} has no SEG to preview")
        paths = [Path(i.path) for i in node.journal.series_instances(job.series_instance_uid, job.generation)]
        try:
            result = previews.get(seg_path, paths, _involvement_parameters(node, job))
        except PreviewError as error:
            raise HTTPException(409, str(error)) from None
        centre = dict(zip(("k", "j", "i"), result.centre))
        headers = {"Cache-Control": "no-store", "X-Preview-Slice-Index": str(centre["k"]),
                   "X-Preview-Source-SOP-Instance-UID": result.source_uids[centre["k"]]}
        return Response(encode_png(render(result, plane, window, bands)), media_type="image/png", headers=headers)

    # --- failures ------------------------------------------------------------------------------------

    @routes.get("/console/failures", response_class=HTMLResponse)
    def failures(request: Request, message: str = "") -> HTMLResponse:
        failed_jobs = node.journal.select(JobRecord, select(jobs).where(jobs.c.state == JobState.FAILED)
                                          .order_by(jobs.c.id.desc()).limit(500))
        dead = node.journal.select(ExportRecord, select(exports).where(exports.c.state == ExportState.DEAD)
                                   .order_by(exports.c.id.desc()).limit(500))
        return page(request, "failures.html", failed_jobs=failed_jobs, dead=dead, message=message)

    def act(request: Request, csrf_token: str | None, action, record, what: str, done: str,
            after=None) -> RedirectResponse:
        """Run a requeue or discard `action` on `record` for the caller (CSRF checked), then back to failures."""
        caller = acting(request, csrf_token)
        if record is None:
            raise HTTPException(404, f"no {what}")
        try:
            action(node.audit, record, VIA, host=client_host(request), actor=caller.actor)
        except NotRetryable as error:
            return back(str(error))
        if after is not None:
            after()
        log.info("console: %s %s by %s", what, done, caller.actor)
        return back(f"{what} {done}")

    @routes.post("/console/jobs/{job_id}/retry")
    def retry_job(request: Request, job_id: int, csrf_token: str | None = Form(None)):
        return act(request, csrf_token, requeue, node.journal.get_job(job_id), f"job {job_id}", "requeued",
                   node.pick_up_queued)

    @routes.post("/console/jobs/{job_id}/discard")
    def discard_failed_job(request: Request, job_id: int, csrf_token: str | None = Form(None)):
        return act(request, csrf_token, discard_job, node.journal.get_job(job_id), f"job {job_id}", "discarded")

    def export(export_id: int) -> ExportRecord | None:
        found = node.journal.select(ExportRecord, select(exports).where(exports.c.id == export_id))
        return found[0] if found else None

    @routes.post("/console/exports/{export_id}/retry")
    def retry_export(request: Request, export_id: int, csrf_token: str | None = Form(None)):
        return act(request, csrf_token, requeue_export, export(export_id), f"export {export_id}", "requeued")

    @routes.post("/console/exports/{export_id}/discard")
    def discard_dead_export(request: Request, export_id: int, csrf_token: str | None = Form(None)):
        return act(request, csrf_token, discard_export, export(export_id), f"export {export_id}", "discarded")

    # --- models and config ---------------------------------------------------------------------------

    @routes.get("/console/models", response_class=HTMLResponse)
    def models(request: Request, message: str = "") -> HTMLResponse:
        return page(request, "models.html", models=list_models(node.config, node.open_inference),
                    repository=str(node.config.inference.model_repository), backend=node.config.inference.backend,
                    message=message, max_model_mb=node.config.http.admin.max_model_mb)

    @routes.post("/console/models")
    async def upload_model(request: Request):
        """A new version of a model from the page's form: the API's one install path (checked in a child
        process before it replaces anything), once the form's CSRF token is the session's."""
        actor = Actor.of(request, node.config, node.audit)
        name = "(unnamed)"

        def checked(fields: dict[str, str]) -> str:
            nonlocal name
            acting(request, fields.get("csrf_token"))
            name = fields.get("name", "").strip()
            return name

        try:
            installed = await install_upload(request, node.config, actor, checked)
        except ModelRefused as refused:  # audited where it was raised
            message = f"{name}: not installed: {refused.detail}"
        except UploadRefused as refused:
            audit_refusal(actor, "model_installed", name, refused)
            message = f"{name}: not installed: {refused.detail}"
        else:
            message = f"{installed.name}: version {installed.version} installed (sha256 {installed.sha256[:12]}…)"
            log.info("console: model %s version %d installed by %s", installed.name, installed.version, actor.who)
        return RedirectResponse(f"/console/models?message={quote(message)}", status_code=303)

    @routes.get("/console/config", response_class=HTMLResponse)
    def config(request: Request) -> HTMLResponse:
        effective = redacted(node.config.model_dump(mode="json"))
        return page(request, "config.html", source=str(node.config.source_path or "(defaults)"),
                    text=json.dumps(effective, indent=2))

    return routes


def _local(target: str) -> str:
    """A redirect target on this server only (`next` comes from the query string)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _involvement_parameters(node: NodeHandles, job: JobRecord):
    """The band limits of the job's pipeline's lung involvement step, None without one."""
    pipeline = node.config.pipelines.get(job.pipeline)
    for step in pipeline.steps if pipeline else ():
        if step.task == "lung_involvement":
            return step.parameters()
    return None


def _has_involvement_step(node: NodeHandles, job: JobRecord) -> bool:
    pipeline = node.config.pipelines.get(job.pipeline)
    return pipeline is not None and any(step.task == "lung_involvement" for step in pipeline.steps)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


TEMPLATES.env.filters["when"] = when
