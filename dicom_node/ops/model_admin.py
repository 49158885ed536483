"""Installing and removing model versions while the node runs: `PUT` and `DELETE /admin/model/{name}`.

In the spirit of Clara AIAA's model admin API. The core is two functions,
`install_model` (or `install_model_zip`) and `remove_model`, that raise
`ModelRefused` with an HTTP status and a reason an admin can act on; the HTTP
routes (dicom_node.ops.model_admin_api) and any other admin page call them.

An upload becomes the model's **next version** (one above its latest; 1 for a
new model), with the uploaded config.pbtxt (and pipeline.yaml, which a new model
must bring; an existing one keeps its own otherwise). Before anything changes,
the new entry is assembled in a staging folder inside the repository (hard links
to the versions already there), read with the node's own repository parser, and
its model file loaded by ONNX Runtime in a child process, as `dicom-node models
check` does (inference.describe): the model's tensors must be the ones
config.pbtxt declares (name, data type, dims, batch axis when max_batch_size > 0)
and the ones pipeline.yaml feeds. Only then does the staged folder replace the
entry, in one atomic exchange of the two folders (Linux renameat2
RENAME_EXCHANGE; two renames where the filesystem lacks it). Job workers read
the repository at each job and load a model file they have not loaded
(inference.backends.EmbeddedBackend), so the next job runs the new version; a
Triton server sees it when it polls its repository (--model-control-mode=poll).

Only ONNX models are taken: the node can load nothing else to check it.

Removal rule: the node refuses (409) to remove the last version of a model, or
the whole model, while an enabled pipeline names it, since that pipeline's step
would then fail on every series; `force` removes it anyway (the pipeline goes
`degraded`, its other steps still deliver). Removing a version that is not the
last is always allowed: the previous version serves again (a rollback).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from fastapi import Request

from dicom_node.ops.uploads import MB, UploadRefused, extract, open_zip
from dicom_node.config import Config
from dicom_node.store.audit import AuditEvent, AuditLog

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ONNX_PLATFORMS = ("onnxruntime_onnx", "onnxruntime")
_changing = threading.Lock()  # one install or removal at a time per node


class ModelRefused(UploadRefused):
    """The install or removal did not happen; `status` (404, 409, 413, 415, 422) and the reason."""


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: int
    path: Path  # the model's folder in the repository
    model_file: Path
    sha256: str  # of the model file
    new_model: bool  # the repository had no entry of this name


@dataclass(frozen=True)
class RemovedModel:
    name: str
    versions: tuple[int, ...]  # the versions removed
    whole_model: bool  # the entry itself is gone
    degraded_pipelines: tuple[str, ...]  # enabled pipelines left without the model (only with force)


@dataclass(frozen=True)
class Actor:
    """Who asks (audited): "token" for the bearer token's holder, the client's address, the audit log."""

    who: str
    host: str | None
    audit: AuditLog | None

    @classmethod
    def of(cls, request: Request, config: Config, audit: AuditLog) -> Actor:
        """The HTTP client as the API's access check named it (a console user, `token`, or `anonymous` on a
        loopback API without a token)."""
        caller = getattr(request.state, "caller", None)
        who = caller.actor if caller is not None else ("token" if config.http.bearer_token else "anonymous")
        return cls(who, request.client.host if request.client else None, audit)


def install_model(repository: Path, name: str, config_pbtxt: Path, model: Path, pipeline_yaml: Path | None = None,
                  *, max_model_mb: float, actor: Actor | None = None) -> InstalledModel:
    """Install `model` (an ONNX file) as the next version of `name`, with its config.pbtxt."""
    def fill(version_dir: Path, filename: str) -> None:
        _check_size(model.stat().st_size, max_model_mb)
        shutil.copyfile(model, version_dir / filename)

    return _audited(actor, "model_installed", name,
                    lambda: _install(Path(repository), name, config_pbtxt, pipeline_yaml, fill))


def install_model_zip(repository: Path, name: str, archive_path: Path, *, max_model_mb: float,
                      actor: Actor | None = None) -> InstalledModel:
    """Install a zipped model folder: config.pbtxt, optionally pipeline.yaml, and one version folder
    (`<n>/model.onnx`, plus any file next to it such as external tensor data), at the top of the
    archive or inside one folder. The version folder's number is ignored: it becomes the next version."""
    def install() -> InstalledModel:
        check_name(name)
        Path(repository).mkdir(parents=True, exist_ok=True)
        archive, members = open_zip(archive_path, int(max_model_mb * MB), "http.admin.max_model_mb")
        with archive, tempfile.TemporaryDirectory(prefix=f".upload-{name}-", dir=repository) as unpacked:
            layout = _zip_layout([m.filename for m in members])
            files: dict[str, Path] = {}
            for number, member in enumerate(members):
                target = Path(unpacked) / str(number)  # never a name from the archive
                extract(archive, member, target)
                files[layout[member.filename]] = target
            versions = {relative.split("/")[0] for relative in files if "/" in relative}
            if len(versions) != 1:
                raise ModelRefused(422, f"the zip must hold exactly one version folder (<n>/model.onnx); it has "
                                        f"{len(versions) or 'none'}{': ' + ', '.join(sorted(versions)) if versions else ''}")
            if "config.pbtxt" not in files:
                raise ModelRefused(422, "the zip has no config.pbtxt")
            (version,) = versions

            def fill(version_dir: Path, filename: str) -> None:
                inside = {relative.split("/", 1)[1]: path for relative, path in files.items()
                          if relative.startswith(version + "/")}
                if filename not in inside:
                    raise ModelRefused(422, f"the zip's version folder {version}/ has no {filename} "
                                            f"(it has {', '.join(sorted(inside))})")
                for relative, path in inside.items():
                    (version_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, version_dir / relative)

            return _install(Path(repository), name, files["config.pbtxt"], files.get("pipeline.yaml"), fill)

    return _audited(actor, "model_installed", name, install)


def remove_model(repository: Path, name: str, used_by: dict[str, list[str]], *, version: int | None = None,
                 force: bool = False, actor: Actor | None = None) -> RemovedModel:
    """Remove the model (every version) or one version of it; `used_by` maps model names to the enabled
    pipelines that name them (dicom_node.pipeline.health.configured_models). The module docstring gives
    the rule."""
    return _audited(actor, "model_removed", name,
                    lambda: _remove(Path(repository), name, used_by, version, force))


def _install(repository: Path, name: str, config_path: Path, pipeline_path: Path | None,
             fill_version: Callable[[Path, str], None]) -> InstalledModel:
    from inference.repository import ModelRepository, RepositoryError, parse_config_pbtxt

    check_name(name)
    try:
        config = parse_config_pbtxt(config_path)
    except RepositoryError as error:
        raise ModelRefused(422, _without_folder(error, config_path)) from None
    if config.name and config.name != name:
        raise ModelRefused(422, f"config.pbtxt names the model {config.name!r}, but it is uploaded as {name!r}")
    if config.platform not in ONNX_PLATFORMS:
        raise ModelRefused(415, f"config.pbtxt's platform is {config.platform or 'not set'!r}: only ONNX models "
                                f"({', '.join(ONNX_PLATFORMS)}) can be checked and installed here")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    with _changing:
        existing = target.is_dir()
        if pipeline_path is None and not (target / "pipeline.yaml").is_file():
            raise ModelRefused(422, f"{name} is a new model: upload its pipeline.yaml too (how the node feeds it)")
        staging = Path(tempfile.mkdtemp(prefix=f".install-{name}-", dir=repository))
        try:
            staged = staging / name
            if existing:
                shutil.copytree(target, staged, copy_function=_link_or_copy, symlinks=False)
            else:
                staged.mkdir()
            for source, file_name in ((config_path, "config.pbtxt"), (pipeline_path, "pipeline.yaml")):
                if source is not None:  # unlinked first: the staged copy is a hard link to the live file
                    (staged / file_name).unlink(missing_ok=True)
                    shutil.copyfile(source, staged / file_name)
            version = max(_versions(staged), default=0) + 1
            filename = config.default_model_filename or "model.onnx"
            (staged / str(version)).mkdir()
            fill_version(staged / str(version), filename)
            try:
                entry = ModelRepository(staging).get(name)
            except RepositoryError as error:
                raise ModelRefused(422, _without_folder(error, staging)) from None
            _check_loads(entry)
            digest = _sha256(entry.version_path)
            if existing:
                _replace(staged, target)
            else:
                staged.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("model %s: version %d installed (%s, sha256 %s)", name, version, filename, digest)
    return InstalledModel(name, version, target, target / str(version) / filename, digest, not existing)


def _remove(repository: Path, name: str, used_by: dict[str, list[str]], version: int | None,
            force: bool) -> RemovedModel:
    check_name(name)
    target = repository / name
    with _changing:
        if not target.is_dir():
            raise ModelRefused(404, f"no model {name!r} in the model repository")
        versions = _versions(target)
        if version is not None and version not in versions:
            raise ModelRefused(404, f"model {name!r} has no version {version} (it has "
                                    f"{', '.join(map(str, versions)) or 'none'})")
        removing = (version,) if version is not None else tuple(versions)
        pipelines = tuple(used_by.get(name, ()))
        last = version is None or set(versions) <= {version}
        if last and pipelines and not force:
            what = "the model" if version is None else f"version {version}, its last version,"
            raise ModelRefused(409, f"enabled pipeline(s) {', '.join(pipelines)} use {name}: removing {what} "
                                    "would fail their step on every series; disable the pipeline first, or "
                                    "pass force=true")
        doomed = Path(tempfile.mkdtemp(prefix=f".remove-{name}-", dir=repository))
        (target if version is None else target / str(version)).rename(doomed / "removed")  # atomic
        shutil.rmtree(doomed, ignore_errors=True)
    log.info("model %s: %s removed%s", name, "every version" if version is None else f"version {version}",
             f"; pipeline(s) {', '.join(pipelines)} now degraded" if last and pipelines else "")
    return RemovedModel(name, removing, version is None, pipelines if last else ())


def _check_loads(entry) -> None:
    """Load the staged model file in a child process (as `models check` does) and compare its tensors with
    pipeline.yaml and with config.pbtxt."""
    from inference.backends import BackendError, compare_signature, describe_in_child

    try:
        inputs, outputs = describe_in_child(entry)
        compare_signature(entry, inputs, outputs, f"in {entry.version_path.name}")
    except BackendError as error:
        raise ModelRefused(422, str(error).replace(str(entry.version_path.parent.parent.parent) + "/", "")) from None
    config = entry.config
    for kind, declared, served in (("input", config.inputs, inputs), ("output", config.outputs, outputs)):
        found = {t.name: t for t in served}
        if kind == "input" and declared and set(found) - {t.name for t in declared}:
            raise ModelRefused(422, f"the model has inputs config.pbtxt does not declare: "
                                    f"{', '.join(sorted(set(found) - {t.name for t in declared}))}")
        for tensor in declared:
            model = found.get(tensor.name)
            if model is None:
                raise ModelRefused(422, f"config.pbtxt declares {kind} {tensor.name!r}, which the model does not "
                                        f"have (it has {', '.join(found) or 'none'})")
            if tensor.data_type.removeprefix("TYPE_") != model.datatype:
                raise ModelRefused(422, f"config.pbtxt declares {kind} {tensor.name!r} as {tensor.data_type}; "
                                        f"the model's is {model.datatype}")
            dims = ((-1,) if config.max_batch_size > 0 else ()) + tuple(tensor.dims)
            if model.shape is not None and (len(dims) != len(model.shape) or any(
                    a != b and a >= 0 and b >= 0 for a, b in zip(dims, model.shape))):
                raise ModelRefused(422, f"config.pbtxt declares {kind} {tensor.name!r} with dims {list(tensor.dims)}"
                                        f" (max_batch_size {config.max_batch_size}); the model's shape is "
                                        f"{list(model.shape)}")


def _replace(staged: Path, target: Path) -> None:
    """Put `staged` where `target` is, in one step where the kernel can: renameat2(RENAME_EXCHANGE) swaps
    the two folders atomically (the old entry then sits in the staging folder, removed with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(staged), at_fdcwd, os.fsencode(target),
                                           rename_exchange) == 0:
        return
    old = staged.with_name(staged.name + ".old")
    target.rename(old)
    staged.rename(target)


def _zip_layout(names: list[str]) -> dict[str, str]:
    """Member name -> its path inside the model folder: the members may sit in one top folder."""
    parts = {name: PurePosixPath(name.replace("\\", "/")).parts for name in names}
    tops = {p[0] for p in parts.values() if len(p) > 1}
    strip = len(tops) == 1 and all(len(p) > 1 for p in parts.values()) and not next(iter(tops)).isdigit()
    layout = {name: "/".join(p[1:] if strip else p) for name, p in parts.items()}
    for name, relative in layout.items():
        top, _, rest = relative.partition("/")
        if not (relative in ("config.pbtxt", "pipeline.yaml") or (top.isdigit() and rest)):
            raise ModelRefused(422, f"zip member {name!r} is not config.pbtxt, pipeline.yaml or a file of a "
                                    "version folder (<n>/model.onnx)")
    return layout


def _audited(actor: Actor | None, event: str, name: str, action: Callable):
    """Run the admin action; the audit log gets what happened, or why it was refused, and who asked."""
    try:
        result = action()
    except UploadRefused as refused:
        audit_refusal(actor, event, name, refused)
        raise ModelRefused(refused.status, refused.detail) from None
    if actor is not None and actor.audit is not None:
        if isinstance(result, InstalledModel):
            detail = f"by {actor.who}: {name} version {result.version} (sha256 {result.sha256})"
        else:
            detail = (f"by {actor.who}: {name} version(s) {', '.join(map(str, result.versions)) or 'none'}"
                      + (f"; degraded pipeline(s) {', '.join(result.degraded_pipelines)}"
                         if result.degraded_pipelines else ""))
        actor.audit.record(AuditEvent(event, host=actor.host, actor=actor.who, status="ok", detail=detail))
    return result


def audit_refusal(actor: Actor | None, event: str, name: str, refused: UploadRefused) -> None:
    """Audit and log a refused install or removal: a refusal is an admin action too (who tried what)."""
    if actor is not None and actor.audit is not None:
        actor.audit.record(AuditEvent(event, host=actor.host, actor=actor.who, status="refused",
                                      detail=f"by {actor.who}: {name}: {refused.detail}"))
    action = {"model_installed": "install", "model_removed": "removal"}[event]
    log.warning("model %s: %s refused (%d): %s", name, action, refused.status, refused.detail)


def check_name(name: str) -> None:
    if not NAME.match(name):
        raise ModelRefused(422, f"model name {name!r} must be a plain folder name: letters, digits, '_', '.', "
                                "'-', at most 64, not starting with '.'")


def _check_size(size: int, max_model_mb: float) -> None:
    if size > max_model_mb * MB:
        raise ModelRefused(413, f"the model file has {size} bytes, over http.admin.max_model_mb ({max_model_mb:g} MB)")


def _versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _link_or_copy(source: str, destination: str) -> None:
    """Versions already installed enter the staged entry as hard links: no copy of large weights, and the
    same inode, so a worker that loaded them does not load them again."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def _without_folder(error: Exception, folder: Path) -> str:
    """The parser's message without the staging folder's path (the admin never saw that folder)."""
    return str(error).replace(f"{folder}/", "").replace(str(folder), "config.pbtxt")
