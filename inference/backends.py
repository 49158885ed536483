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

log = logging.getLogger(__name__)

T = TypeVar("T")

# ONNX Runtime element types as KServe v2 datatypes (the names Triton's metadata uses).
ONNX_DATATYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(int16)": "INT16",
    "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(bool)": "BOOL",
}
FLOAT_DATATYPES = ("FP32", "FP16", "FP64")
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
    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = 60.0
    retries: int = 3
    cpu_threads: int = 0
    providers: list[str] = field(default_factory=list)


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
    """tritonclient against a KServe v2 server (Triton, KServe, MLServer) over gRPC or HTTP.

    One client per thread (tritonclient's HTTP client is not thread-safe);
    transient failures (server unavailable, connection refused or reset) are
    retried `retries` times with exponential backoff, anything else fails at once.
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
        self.where = f"on triton at {settings.url}"
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        live = self._call(lambda c: c.is_server_live(**self._timeout()), "server live")
        ready = live and self._call(lambda c: c.is_server_ready(**self._timeout()), "server ready")
        if not ready:
            raise BackendError(f"triton at {settings.url} is {'not ready' if live else 'not live'}")

    def _timeout(self) -> dict[str, float]:
        """gRPC takes a per-call deadline; the HTTP client has its network timeout set once."""
        return {"client_timeout": self.settings.timeout_s} if self.settings.protocol == "grpc" else {}

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.settings.protocol == "grpc":
                client = self._module.InferenceServerClient(self.settings.url)
            else:
                client = self._module.InferenceServerClient(
                    self.settings.url, connection_timeout=self.settings.timeout_s,
                    network_timeout=self.settings.timeout_s)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _transient(self, error: Exception) -> bool:
        if isinstance(error, self._server_error):
            status = str(error.status() or "")
            return status in ("StatusCode.UNAVAILABLE", "503") or "connection" in str(error).lower()
        return isinstance(error, OSError)

    def _call(self, request: Callable[[object], T], what: str) -> T:
        """One request with bounded retry on transient errors; BackendError after the last attempt."""
        for attempt in range(self.settings.retries + 1):
            try:
                return request(self._client())
            except Exception as error:  # tritonclient raises its own and the transport's exceptions
                if not self._transient(error):
                    raise BackendError(f"{what} failed {self.where}: {_message(error)}") from None
                if attempt == self.settings.retries:
                    raise BackendError(f"triton at {self.settings.url} is unreachable ({what}, "
                                       f"{attempt + 1} attempts): {_message(error)}") from None
                self._discard_client()
                time.sleep(min(0.5 * 2 ** attempt, 10.0))
        raise AssertionError("unreachable")

    def _discard_client(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            self._local.client = None
            with self._lock:
                self._clients.remove(client)
            client.close()

    def check(self, entry: ModelEntry) -> None:
        def ready(client) -> bool:
            try:
                return client.is_model_ready(entry.name, **self._timeout())
            except self._server_error as error:
                if str(error.status()) in ("StatusCode.NOT_FOUND", "404"):
                    return False  # gRPC answers an unknown model with NOT_FOUND, HTTP with a 404 status
                raise

        if not self._call(ready, "model ready"):
            raise BackendError(f"model {entry.name!r} is not ready {self.where}")
        if self.settings.protocol == "grpc":
            metadata = self._call(lambda c: c.get_model_metadata(entry.name, as_json=True, **self._timeout()),
                                  "model metadata")
        else:
            metadata = self._call(lambda c: c.get_model_metadata(entry.name), "model metadata")

        def signature(key: str) -> list[TensorSignature]:
            # gRPC's JSON form writes int64 dims as strings; `versions` may be [] or absent.
            return [TensorSignature(t["name"], t["datatype"],
                                    tuple(int(d) for d in t["shape"]) if t.get("shape") is not None else None)
                    for t in metadata.get(key) or []]

        compare_signature(entry, signature("inputs"), signature("outputs"), self.where)
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

        return self._call(request, f"inference of model {model!r}")

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _message(error: Exception) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return text or error.__class__.__name__
