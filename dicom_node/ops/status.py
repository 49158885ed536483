"""What state the node is in: readiness checks and the status snapshot behind `/readyz`,
`/v1/status` and `dicom-node status`.

Ready means the node takes images (journal writable, disk above the floor,
DICOM port listening); each pipeline's health (ready or degraded) is reported
beside it (`dicom_node.pipeline.health`). `dicom-node status` exits 1 when the node is
not ready, and with `--strict` also when a pipeline is degraded.

`dicom-node status` asks the running node's API first (only the running
process knows its open associations and its loaded backend); when nothing
answers on the configured HTTP address it reads the journal and checks the
models itself, and says so (`source: journal`, associations unknown).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sqlalchemy import func, select

from dicom_node.store.cluster import ClusterStatus
from dicom_node.config import Config
from dicom_node.pipeline.health import PipelineHealth, inference_servers, pipeline_health
from dicom_node.store.journal import Journal
from dicom_node.store.schema import exports, jobs, series
from dicom_node.store.spool import Spool
from dicom_node.states import ExportState
from inference.server_pool import ServerState

Counts = dict[str, dict[tuple[str, ...], int]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{check.name}: {check.detail}" for check in self.checks if not check.ok]


@dataclass(frozen=True)
class DiskUse:
    storage_dir: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    min_free_bytes: int


@dataclass(frozen=True)
class OpenAssociation:
    calling_ae: str
    peer: str
    instances: int
    bytes: int


@dataclass(frozen=True)
class DestinationExports:
    """One configured destination's exports by state, with its transport (`dimse` or `dicomweb`)."""

    destination: str
    transport: str
    exports: dict[str, int]


@dataclass(frozen=True)
class NodeStatus:
    source: str  # "node" (its API answered) or "journal" (read directly; the node may be down)
    associations_open: int | None
    associations: list[OpenAssociation]
    series: dict[str, int]
    jobs: dict[str, int]
    jobs_by_pipeline: dict[str, dict[str, int]]
    dead_letters: int
    quarantined_files: int  # in <storage_dir>/quarantine: files restart reconciliation could not journal
    disk: DiskUse
    ready: bool  # takes images: `checks` (what /readyz answers)
    checks: list[Check] = field(default_factory=list)
    pipelines: list[PipelineHealth] = field(default_factory=list)  # ready or degraded (dicom_node.pipeline.health)
    # Instances and bytes stored since the node started, by transport (dimse: C-STORE, stow: STOW-RS);
    # None when read from the journal (only the running node counts them).
    received: dict[str, dict[str, int]] | None = None
    destinations: list[DestinationExports] = field(default_factory=list)
    # On a journal shared by several nodes: this node, the singletons it runs, the live nodes.
    cluster: ClusterStatus | None = None
    inference_servers: list[ServerState] = field(default_factory=list)  # triton backend: each server up or down


def journal_counts(journal: Journal) -> Counts:
    """Row counts grouped by state (and pipeline/destination), one query a table."""
    def grouped(conn, table, *columns: str) -> dict[tuple[str, ...], int]:
        cols = [table.c[name] for name in columns]
        return {tuple(row[:-1]): row[-1] for row in conn.execute(select(*cols, func.count()).group_by(*cols))}

    with journal.engine.connect() as conn:
        return {"jobs": grouped(conn, jobs, "pipeline", "state"), "series": grouped(conn, series, "state"),
                "exports": grouped(conn, exports, "destination", "state")}


def disk_use(config: Config) -> DiskUse:
    usage = shutil.disk_usage(config.node.storage_dir)
    return DiskUse(str(config.node.storage_dir), usage.total, usage.used, usage.free,
                   config.node.min_free_disk_mb * 1024 * 1024)


def check_journal_writable(journal: Journal) -> Check:
    """A write statement that changes nothing still needs SQLite's write lock and a writable file."""
    try:
        with journal.write() as conn:
            conn.execute(jobs.delete().where(jobs.c.id < 0))
    except Exception as error:
        return Check("journal", False, f"not writable: {error}")
    return Check("journal", True, "writable")


def check_disk(config: Config) -> Check:
    disk = disk_use(config)
    mb = disk.free_bytes // (1024 * 1024)
    if disk.free_bytes < disk.min_free_bytes:
        return Check("disk", False, f"{mb} MB free under {disk.storage_dir}, floor is {config.node.min_free_disk_mb} MB "
                                    "(C-STOREs are refused with 0xA700)")
    return Check("disk", True, f"{mb} MB free")


def check_dicom_port(config: Config, listening: Callable[[], bool] | None) -> Check:
    """`listening` is the running node's own answer (its acceptor's loop runs); None: not the node."""
    if listening is None:
        return Check("dicom port", False, f"unknown: the node's API at {api_base(config)} does not answer "
                                          "(is the node running?)")
    if not listening():
        return Check("dicom port", False, f"not listening on {config.node.host}:{config.node.port}")
    return Check("dicom port", True, f"listening on {config.node.host}:{config.node.port}")


def readiness(config: Config, journal: Journal, listening: Callable[[], bool] | None) -> Readiness:
    """Can the node take images? Pipelines do not enter into it: a node whose chest classifier is not
    installed still stores every study, and its spleen pipeline still runs (`dicom_node.pipeline.health`)."""
    return Readiness((check_journal_writable(journal), check_disk(config), check_dicom_port(config, listening)))


def snapshot(config: Config, journal: Journal, ready: Readiness, pipelines: list[PipelineHealth], *, source: str,
             associations: Iterable[OpenAssociation] | None,
             received: dict[str, dict[str, int]] | None = None, cluster: ClusterStatus | None = None,
             servers: list[ServerState] | None = None) -> NodeStatus:
    counts = journal_counts(journal)
    job_states: dict[str, int] = {}
    by_pipeline: dict[str, dict[str, int]] = {}
    for (pipeline, state), count in counts["jobs"].items():
        job_states[state] = job_states.get(state, 0) + count
        by_pipeline.setdefault(pipeline, {})[state] = count
    open_list = list(associations) if associations is not None else []
    return NodeStatus(
        source=source, associations_open=len(open_list) if associations is not None else None,
        associations=open_list, series={state: count for (state,), count in counts["series"].items()},
        jobs=job_states, jobs_by_pipeline=by_pipeline,
        dead_letters=sum(count for (_, state), count in counts["exports"].items() if state == ExportState.DEAD),
        quarantined_files=len(Spool(Path(config.node.storage_dir)).quarantined()), disk=disk_use(config),
        ready=ready.ready, checks=list(ready.checks), pipelines=pipelines, received=received,
        destinations=[DestinationExports(name, destination.kind, {
            state: count for (exported_to, state), count in counts["exports"].items() if exported_to == name})
            for name, destination in config.destinations.items()], cluster=cluster,
        inference_servers=servers or [])


# --- `dicom-node status` -----------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("status", help="associations, series, jobs, dead letters, disk, model readiness")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 also when a pipeline is degraded (default: only when the node cannot take images)")
    return parser


def api_base(config: Config) -> str:
    """Where the node's API answers this machine (a wildcard bind is reached on loopback)."""
    host = config.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else "::1" if host == "::" else host
    scheme = "https" if config.http.tls else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{config.http.port}"


def api_get(config: Config, path: str, timeout: float = 10) -> dict:
    """GET a JSON document from the running node's API (with the configured bearer token). Over HTTPS
    the node's certificate must chain to `http.tls.ca_certificates` (or be `http.tls.certificate`)."""
    request = urllib.request.Request(api_base(config) + path)
    if config.http.bearer_token:
        request.add_header("Authorization", f"Bearer {config.http.bearer_token}")
    context = None if config.http.tls is None else config.http.tls.client_context()
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.load(response)


def run(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    try:
        document = api_get(config, "/v1/status")
    except urllib.error.HTTPError as error:  # a node answered but refused: say so, never fall back silently
        print(f"the node's API at {api_base(config)} answered {error.code}: {error.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLError):  # a node answered, but not as the configured certificate
            print(f"the node's API at {api_base(config)}: TLS failed: {error.reason}", file=sys.stderr)
            return 1
        document = None
    except (ConnectionError, TimeoutError):
        document = None
    if document is None:  # not running (or not reachable): what the journal says
        document = dataclasses.asdict(_offline_status(config))
    if args.json:
        print(json.dumps(document), file=out)
    else:
        _print_status(document, out)
    degraded = any(pipeline["state"] != "ready" for pipeline in document["pipelines"])
    return 0 if document["ready"] and not (args.strict and degraded) else 1


def _offline_status(config: Config) -> NodeStatus:

    Path(config.node.storage_dir).mkdir(parents=True, exist_ok=True)
    journal = Journal(config.node.journal_url)
    backends: list = []

    def open_inference():
        from inference.backends import open_backend
        from inference.repository import ModelRepository
        repository = ModelRepository(config.inference.model_repository)
        if not backends:  # opened once for the pipelines and the servers
            backends.append(open_backend(config.inference.backend_settings()))
        return repository, backends[-1]

    try:
        return snapshot(config, journal, readiness(config, journal, None), pipeline_health(config, open_inference),
                        source="journal", associations=None, servers=inference_servers(config, open_inference))
    finally:
        for backend in backends:
            backend.close()
        journal.close()


def _print_status(status: dict, out: TextIO) -> None:
    def line(label: str, value: object) -> None:
        print(f"{label:22} {value}", file=out)

    def states(counts: dict[str, int]) -> str:
        return ", ".join(f"{state} {count}" for state, count in sorted(counts.items())) or "none"

    line("source", "running node (API)" if status["source"] == "node" else "journal (node API not answering)")
    open_count = status["associations_open"]
    line("associations open", "unknown" if open_count is None else open_count)
    for assoc in status["associations"]:
        line("", f"{assoc['calling_ae']} from {assoc['peer']}: {assoc['instances']} instances, {assoc['bytes']} bytes")
    for transport, counts in sorted((status.get("received") or {}).items()):
        line(f"received ({transport})", f"{counts['instances']} instances, {counts['bytes']} bytes since the start")
    line("series", states(status["series"]))
    line("jobs", states(status["jobs"]))
    for pipeline, counts in sorted(status["jobs_by_pipeline"].items()):
        line(f"  {pipeline}", states(counts))
    line("dead letters", status["dead_letters"])
    if status.get("destinations"):  # a node of an earlier version does not report them
        print("exports", file=out)
    for destination in status.get("destinations", []):
        line(f"  {destination['destination']} ({destination['transport']})", states(destination["exports"]))
    if status["quarantined_files"]:
        line("quarantined files", f"{status['quarantined_files']} in {status['disk']['storage_dir']}/quarantine "
                                  "(not journaled at restart; each with a .reason.txt)")
    disk = status["disk"]
    line("disk", f"{disk['used_bytes'] / 2**30:.1f} GiB used, {disk['free_bytes'] / 2**30:.1f} GiB free of "
                 f"{disk['total_bytes'] / 2**30:.1f} GiB ({disk['storage_dir']}; floor {disk['min_free_bytes'] // 2**20} MB)")
    line("ready", "yes" if status["ready"] else "NO")
    for check in status["checks"]:
        line(f"  {check['name']}", f"{'ok' if check['ok'] else 'FAILED'}: {check['detail']}")
    if status["pipelines"]:
        print("pipelines", file=out)
    else:
        line("pipelines", "none enabled")
    for pipeline in status["pipelines"]:
        line(f"  {pipeline['pipeline']}", PipelineHealth(**pipeline).describe())
    if status.get("inference_servers"):  # triton backend only (and not from a node of an earlier version)
        print("inference servers", file=out)
    for server in status.get("inference_servers", []):
        line(f"  {server['url']}", ServerState(**server).describe())
