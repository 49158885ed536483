"""KServe's Python model server as an independent KServe v2 (Open Inference Protocol) peer.

The real tritonserver needs Docker and CUDA; KServe's ModelServer speaks the
same protocol over HTTP and gRPC, so the triton backend is tested against a
server it shares no code with. KServe lives in its own virtual environment
(`.venv-kserve` at the repository root, gitignored, created once and reused)
so its web stack stays out of the project's dependencies.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

from tests.peers import REPO, ManagedProcess, free_port, peer_env, peer_venv, wait_for_port

SERVER_SCRIPT = REPO / "tests" / "kserve_server.py"
REQUIREMENTS = ("kserve==0.21.*", "onnxruntime")
GRPC_MAX_MESSAGE = 256 * 1024 * 1024  # a batch of four 96^3 fp32 patches is 14 MB, over KServe's 8 MiB default


def kserve_python() -> Path:
    """The KServe venv's interpreter (`.venv-kserve`, built on first use)."""
    return peer_venv("kserve", REQUIREMENTS, "kserve, onnxruntime")


class KServeServer(ManagedProcess):
    """Serves every ONNX model of a Triton-layout repository on free loopback HTTP and gRPC ports."""

    def __init__(self, repository: Path, log: Path, timeout: float = 60.0,
                 ports: tuple[int, int] | None = None) -> None:
        self.http_port, self.grpc_port = ports or (free_port(), free_port())
        super().__init__(
            [kserve_python(), SERVER_SCRIPT, "--repository", repository,
             "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
             "--grpc_max_receive_message_length", str(GRPC_MAX_MESSAGE),
             "--grpc_max_send_message_length", str(GRPC_MAX_MESSAGE), "--enable_latency_logging", "false"],
            env=peer_env(PYTHONUNBUFFERED="1"), cwd=REPO, log=log)
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(self.http_port, timeout, self.process)
        wait_for_port(self.grpc_port, max(deadline - time.monotonic(), 1), self.process)
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"KServe server not ready after {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0, first_signal: int = signal.SIGINT) -> int | None:
        """KServe may ignore SIGTERM while serving: INT first, then TERM, then KILL, by pid."""
        return super().stop(timeout=timeout, first_signal=first_signal)
