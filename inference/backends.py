"""Two ways to run a repository model behind one small interface.

- `embedded` (the default): ONNX Runtime in this process, CUDA execution
  provider when present, else CPU with a configurable thread count.
- `triton`: a Triton server (or any KServe v2 server) serving the same
  repository, over gRPC (default) or HTTP with binary tensors. Only the
  standard KServe v2 endpoints are used (server live/ready, model ready,
  model metadata, infer), so the node runs against any server that speaks
  the protocol.

Both check a model before the first job: the tensor names, data types and
ranks the model declares must be what its pipeline.yaml says, so a wrong
repository fails at start-up with a message an admin can act on, not in the
middle of a patient's job.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np

from inference.repository import ModelEntry
from inference.server_pool import ServerPool, ServerState

log = logging.getLogger(__name__)

T = TypeVar("T")

# ONNX Runtime element types as KServe v2 datatypes (the names Triton's metadata uses).
ONNX_DATATYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(int16)": "INT16",
    "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(bool)": "BOOL",
}
FLOAT_DATATYPES = ("FP32", "FP16", "FP64")
PROBE_TIMEOUT_S = 5.0  # a readiness probe (gRPC deadline): a server that cannot answer that is not ready
DESCRIBE_TIMEOUT_S = 300  # a large model on a busy CPU; only the first check of each model file waits


class BackendError(Exception):
    """The backend cannot serve a model (unreachable server, missing model, wrong signature)."""


class ModelFileMissing(BackendError):
    """The repository entry is there but its weights are not (not installed yet): an expected state of a
    node whose pipeline names a model the site has not imported, not a fault."""


@dataclass(frozen=True)
class BackendSettings:
    """What config.yaml's `inference` section says about the backend."""

    kind: Literal["embedded", "triton"] = "embedded"
    url: str = "127.0.0.1:8001"  # one triton server ...
    urls: tuple[str, ...] = ()  # ... or a pool of them (this wins when given)
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 5.0  # a failed server's first back-off (inference.server_pool)
    cpu_threads: int = 0
    providers: list[str] = field(default_factory=list)

    @property
    def servers(self) -> tuple[str, ...]:
        return self.urls or (self.url,)


class Backend(Protocol):
    def infer(self, entry: ModelEntry, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model `entry` names (its version as the repository has it now: the one a result's
        algorithm version records) on named float32 tensors; returns its outputs by name."""

    def check(self, entry: ModelEntry) -> None:
        """Raise BackendError unless the backend can serve `entry` as its pipeline.yaml feeds it."""

    def close(self) -> None: ...


def open_backend(settings: BackendSettings) -> Backend:
    """The backend config.yaml selects; a Triton server is checked live and ready here."""
    if settings.kind == "embedded":
        return EmbeddedBackend(settings)
    if settings.kind == "triton":
        return TritonBackend(settings)
    raise BackendError(f"unknown inference backend {settings.kind!r} (embedded or triton)")


@dataclass(frozen=True)
class TensorSignature:
    """A tensor as the serving side declares it: KServe v2 datatype, shape with -1 for dynamic axes."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None


def compare_signature(entry: ModelEntry, inputs: list[TensorSignature], outputs: list[TensorSignature],
                      where: str) -> None:
    """The pipeline.yaml tensors must exist on the served model with a float type and the layout's rank."""
    spec = entry.pipeline
    for kind, tensor, layout, declared in (("input", spec.input, spec.input_layout, inputs),
                                           ("output", spec.output, spec.output_layout, outputs)):
        found = {t.name: t for t in declared}
        if tensor.name not in found:
            raise BackendError(f"model {entry.name!r} has no {kind} {tensor.name!r} {where} "
                               f"(it has {', '.join(found) or 'none'})")
        served = found[tensor.name]
        wanted = ("FP32",) if kind == "input" else FLOAT_DATATYPES
        if served.datatype not in wanted:
            raise BackendError(f"model {entry.name!r} {kind} {tensor.name!r} is {served.datatype} {where}; "
                               f"the node {'sends FP32' if kind == 'input' else 'reads float outputs'}")
        if served.shape is not None and len(served.shape) != len(layout):
            raise BackendError(f"model {entry.name!r} {kind} {tensor.name!r} has shape {list(served.shape)} {where}, "
                               f"but pipeline.yaml's layout {layout} has {len(layout)} axes")
        channels = served.shape[layout.index("C")] if served.shape is not None else -1
        if kind == "input" and channels not in (-1, 1):
            raise BackendError(f"model {entry.name!r} input {tensor.name!r} takes {channels} channels {where}; "
                               "the node feeds one (the CT)")


class EmbeddedBackend:
    """ONNX Runtime sessions in this process, one per model, created by its first inference and again
    when its file changes (a new version installed, or the file replaced): a job never runs a model
    other than the one its results name. `check` never creates one: it reads the model in a child
    process."""

    def __init__(self, settings: BackendSettings) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.settings = settings
        available = ort.get_available_providers()
        if settings.providers:
            missing = [p for p in settings.providers if p not in available]
            if missing:
                raise BackendError(f"ONNX Runtime has no {', '.join(missing)} here (it has {', '.join(available)})")
            self.providers = list(settings.providers)
        elif "CUDAExecutionProvider" in available:
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self._sessions: dict[str, tuple[tuple, object]] = {}  # model -> (its file's identity, session)
        self._lock = threading.Lock()
        self._signatures: dict[tuple, tuple[list[TensorSignature], list[TensorSignature]]] = {}
        self._check_lock = threading.Lock()

    def _session(self, entry: ModelEntry):
        _require_onnx_file(entry)
        identity = _file_identity(entry)
        with self._lock:
            cached = self._sessions.get(entry.name)
            if cached is None or cached[0] != identity:
                options = self._ort.SessionOptions()
                options.intra_op_num_threads = self.settings.cpu_threads
                try:
                    session = self._ort.InferenceSession(str(entry.version_path), sess_options=options,
                                                         providers=self.providers)
                except Exception as error:  # ONNX Runtime raises its own exception types
                    raise BackendError(f"model {entry.name!r}: ONNX Runtime cannot load "
                                       f"{entry.version_path}: {error}") from None
                if cached is not None:
                    log.info("model %s: %s changed since it was loaded; loaded again", entry.name,
                             entry.version_path)
                cached = self._sessions[entry.name] = (identity, session)
            return cached[1]

    def check(self, entry: ModelEntry) -> None:
        """Loads the model in a child process (inference.describe says why), once per model file:
        the answer is kept while the file's size, modification time and inode stay the same."""
        _require_onnx_file(entry)
        path = entry.version_path
        key = _file_identity(entry)
        with self._check_lock:
            if key not in self._signatures:
                self._signatures[key] = describe_in_child(entry)
        inputs, outputs = self._signatures[key]
        compare_signature(entry, inputs, outputs, f"in {path.name}")

    def load(self, entry: ModelEntry) -> None:
        """Create the model's session now rather than in its first inference (benchmarks time inference alone)."""
        self._session(entry)

    def infer(self, entry: ModelEntry, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(entry)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


def _require_onnx_file(entry: ModelEntry) -> None:
    if not entry.version_path.name.endswith(".onnx"):
        raise BackendError(f"model {entry.name!r} is {entry.platform}: only the triton backend serves "
                           "that platform; the embedded backend runs ONNX models")
    if not entry.version_path.is_file():
        raise ModelFileMissing(f"model {entry.name!r}: {entry.version_path} is missing "
                           "(import the weights with `dicom-node models import`)")


def _file_identity(entry: ModelEntry) -> tuple:
    """Path, size, modification time and inode of the model file: any of them changes when a new version
    is installed or the file is replaced."""
    path = entry.version_path
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def describe_in_child(entry: ModelEntry) -> tuple[list[TensorSignature], list[TensorSignature]]:
    """The model's tensors as `python -m inference.describe` reports them."""
    command = [sys.executable, "-m", "inference.describe", str(entry.version_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DESCRIBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendError(f"model {entry.name!r}: ONNX Runtime did not load {entry.version_path} "
                           f"within {DESCRIBE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        reason = (f"the loader was killed by signal {-done.returncode}" if done.returncode < 0
                  else lines[-1] if lines else f"the loader exited with status {done.returncode}")
        raise BackendError(f"model {entry.name!r}: ONNX Runtime cannot load {entry.version_path}: {reason}")
    described = json.loads(done.stdout)

    def signature(tensors: list[dict]) -> list[TensorSignature]:
        return [TensorSignature(t["name"], ONNX_DATATYPES.get(t["type"], t["type"]),
                                None if t["shape"] is None else tuple(t["shape"])) for t in tensors]

    return signature(described["inputs"]), signature(described["outputs"])


class TritonBackend:
    """tritonclient against one KServe v2 server (Triton, KServe, MLServer) or a pool of them, over gRPC
    or HTTP.

    One client per thread and server (tritonclient's HTTP client is not thread-safe). Each request
    (one sliding-window batch, one classifier input) goes to the next server that is up
    (inference.server_pool); a transient failure (server unavailable, connection refused or reset)
    marks that server down and sends the same request to the next one, so a server stopped mid-series
    does not fail the job. When every server failed, the request is tried again `retries` times with
    exponential backoff, down servers included (probed first); anything else fails at once.
    """

    def __init__(self, settings: BackendSettings) -> None:
        if settings.protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module
        from tritonclient.utils import InferenceServerException

        self._module = client_module
        self._server_error = InferenceServerException
        self.settings = settings
        self.pool = ServerPool(settings.servers, settings.backoff_s)
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (server, ok|failed) -> requests since the last drain
        for attempt in range(settings.retries + 1):
            if any(self._probe(url) is None for url in self.pool.urls):
                return
            if attempt < settings.retries:
                time.sleep(min(0.5 * 2 ** attempt, 10.0))
        raise BackendError(self._none_ready("server live", settings.retries + 1))

    def _none_ready(self, what: str, attempts: int) -> str:
        states = self.pool.states()
        unreachable = all(not s.reason.startswith("not ") for s in states)
        reasons = "; ".join(s.reason if len(states) == 1 else f"{s.url}: {s.reason}" for s in states)
        return (f"triton at {', '.join(self.pool.urls)} is {'unreachable' if unreachable else 'not ready'} "
                f"({what}, {attempts} attempts): {reasons}")

    def _timeout(self) -> dict[str, float]:
        """gRPC takes a per-call deadline; the HTTP client has its network timeout set once."""
        return {"client_timeout": self.settings.timeout_s} if self.settings.protocol == "grpc" else {}

    def _client(self, url: str):
        clients = self._local.__dict__.setdefault("clients", {})
        client = clients.get(url)
        if client is None:
            if self.settings.protocol == "grpc":
                client = self._module.InferenceServerClient(url, channel_args=_grpc_channel_args())
            else:
                client = self._module.InferenceServerClient(
                    url, connection_timeout=self.settings.timeout_s, network_timeout=self.settings.timeout_s)
            clients[url] = client
            with self._lock:
                self._clients.append(client)
        return client

    def _discard_client(self, url: str) -> None:
        client = self._local.__dict__.get("clients", {}).pop(url, None)
        if client is not None:
            with self._lock:
                self._clients.remove(client)
            client.close()

    def _transient(self, error: Exception) -> bool:
        """A failure of the server, not of the request: the next server is tried. A request that ran past
        `timeout_s` counts as one (a hung server, a stuck GPU), so a pool does not wait it out on every
        request of a series; with one server the job fails after `retries` rounds, as for a dead one."""
        if isinstance(error, self._server_error):
            status = str(error.status() or "")
            text = str(error).lower()
            return (status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "504")
                    or "connection" in text or "deadline exceeded" in text or "timed out" in text)
        return isinstance(error, OSError)

    def _probe(self, url: str) -> str | None:
        """Readiness of one server (KServe v2 server live, then server ready); None when ready, else why
        not. Marks the server up or down accordingly."""
        timeout = {"client_timeout": min(self.settings.timeout_s, PROBE_TIMEOUT_S)} if self._timeout() else {}
        try:
            client = self._client(url)
            reason = (None if client.is_server_ready(**timeout) else "not ready") if client.is_server_live(**timeout) \
                else "not live"
        except Exception as error:  # tritonclient raises its own and the transport's exceptions
            self._discard_client(url)
            reason = _message(error)
        if reason is None:
            if self.pool.mark_up(url):
                log.info("triton at %s is ready again: it gets requests", url)
        elif self.pool.mark_down(url, reason):
            log.warning("triton at %s is down (%s): requests go to the other servers", url, reason)
        return reason

    def _call(self, request: Callable[[object], T], what: str, counted: bool = False) -> T:
        """One request on the first server in the pool's order that answers (`counted`: in the per-server
        request counts, which are a job's inference requests)."""
        return self._sweep(request, what, first=True, counted=counted)[0][1]

    def _sweep(self, request: Callable[[object], T], what: str, *, first: bool,
               counted: bool = False) -> list[tuple[str, T]]:
        """(server, answer) of the first server that answers, or of every one that does (`first` False):
        a server failing transiently is marked down and the next tried; when none answered, the round
        again after a backoff, `retries` times, down servers included; BackendError after the last."""
        for attempt in range(self.settings.retries + 1):
            answers: list[tuple[str, T]] = []
            for candidate in self.pool.candidates(every=attempt > 0):
                if candidate.probe and self._probe(candidate.url) is not None:
                    continue
                try:
                    result = request(self._client(candidate.url))
                except Exception as error:  # tritonclient raises its own and the transport's exceptions
                    if not self._transient(error):
                        raise BackendError(f"{what} failed on triton at {candidate.url}: {_message(error)}") from None
                    self._discard_client(candidate.url)
                    if counted:
                        self._count(candidate.url, "failed")
                    if self.pool.mark_down(candidate.url, _message(error)):
                        log.warning("triton at %s is down (%s: %s): requests go to the other servers",
                                    candidate.url, what, _message(error))
                    continue
                if counted:
                    self._count(candidate.url, "ok")
                answers.append((candidate.url, result))
                if first:
                    return answers
            if answers:
                return answers
            if attempt < self.settings.retries:
                time.sleep(min(0.5 * 2 ** attempt, 10.0))
        raise BackendError(self._none_ready(what, self.settings.retries + 1))

    def _count(self, url: str, outcome: str) -> None:
        with self._lock:
            self._counts[url, outcome] = self._counts.get((url, outcome), 0) + 1

    def drain_counts(self) -> dict[tuple[str, str], int]:
        """Requests per (server, outcome `ok` or `failed`) since the last call: a job's worker hands them to
        the node's process, which owns the metrics (dicom_node.pipeline.job)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def servers(self) -> list[ServerState]:
        """Every server probed now: what health views and the server metric report."""
        for url in self.pool.urls:
            self._probe(url)
        return self.pool.states()

    def check(self, entry: ModelEntry) -> None:
        """The model ready with the pipeline.yaml signature on every server that answers (a pool serves
        one repository: a server that lacks the model would fail the jobs it gets)."""
        grpc = self.settings.protocol == "grpc"

        def metadata(client) -> dict | None:
            try:
                if not client.is_model_ready(entry.name, **self._timeout()):
                    return None
            except self._server_error as error:
                if str(error.status()) in ("StatusCode.NOT_FOUND", "404"):
                    return None  # gRPC answers an unknown model with NOT_FOUND, HTTP with a 404 status
                raise
            return (client.get_model_metadata(entry.name, as_json=True, **self._timeout()) if grpc
                    else client.get_model_metadata(entry.name))

        def signature(described: dict, key: str) -> list[TensorSignature]:
            # gRPC's JSON form writes int64 dims as strings; `versions` may be [] or absent.
            return [TensorSignature(t["name"], t["datatype"],
                                    tuple(int(d) for d in t["shape"]) if t.get("shape") is not None else None)
                    for t in described.get(key) or []]

        for url, described in self._sweep(metadata, "model metadata", first=False):
            if described is None:
                raise BackendError(f"model {entry.name!r} is not ready on triton at {url}")
            compare_signature(entry, signature(described, "inputs"), signature(described, "outputs"),
                              f"on triton at {url}")
        with self._lock:
            self._entries[entry.name] = entry

    def infer(self, entry: ModelEntry, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            checked = self._entries.get(entry.name) == entry
        if not checked:
            self.check(entry)
        model = entry.name
        module = self._module
        http = self.settings.protocol == "http"

        def request(client):
            tensors = []
            for name, array in inputs.items():
                array = np.ascontiguousarray(array, dtype=np.float32)
                tensor = module.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array, **({"binary_data": True} if http else {}))
                tensors.append(tensor)
            outputs = [module.InferRequestedOutput(entry.pipeline.output.name, **({"binary_data": True} if http else {}))]
            result = client.infer(model, tensors, outputs=outputs, **self._timeout())
            return {entry.pipeline.output.name: result.as_numpy(entry.pipeline.output.name)}

        return self._call(request, f"inference of model {model!r}", counted=True)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _grpc_channel_args() -> list[tuple[str, object]]:
    """tritonclient's default channel options, and a subchannel pool of the channel's own: gRPC otherwise
    shares one connection per address between channels, with its reconnect back-off, so a client made
    afresh for a restarted server would wait out the back-off the dead one's failures had grown."""
    from tritonclient.grpc import KeepAliveOptions
    from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE

    keepalive = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.use_local_subchannel_pool", 1)]


def _message(error: Exception) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return text or error.__class__.__name__
