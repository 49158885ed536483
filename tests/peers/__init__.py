"""Real peers for the tests: processes started on free loopback ports and stopped by pid.

Every peer runs as a child process with `TCP_NODELAY=1` in its environment
(dcmtk and Orthanc leave Nagle on otherwise and each C-STORE stalls ~40 ms).

A test that needs a peer says so with `needs(available, reason)` (each peer
module has its `required()`): on a developer's machine without the peer the
test is skipped with the reason; with `CI=true` in the environment it fails,
so a CI image that lost a peer cannot go green by skipping what it should test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"
CT_J2K_SERIES = SHARED_DATA / "ct" / "abdomen_siemens_20slices_j2k"


_handed_out: set[int] = set()


def peer_venv(name: str, requirements: Sequence[str], imports: str) -> Path:
    """The interpreter of a peer's own venv (`.venv-<name>` at the repository root, gitignored), built on
    first use and rebuilt when `imports` (a comma-separated module list) fails there; a lock file beside
    it (`.venv-<name>.lock`, gitignored too) serialises builders. Peers' stacks (KServe's web server,
    torch) stay out of the project's venv."""
    import fcntl
    import sys

    venv = REPO / f".venv-{name}"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import {imports}"]
    with open(REPO / f".venv-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, timeout=1200)
    return python


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab CI and most others set it): every peer must be there."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_peer(reason: str) -> NoReturn:
    """Skip the running test for a peer this machine lacks, or fail it under CI=true."""
    if in_ci():
        pytest.fail(f"{reason}; CI=true: a missing peer fails the run instead of skipping", pytrace=False)
    pytest.skip(reason)


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) as needing a peer; tests/conftest.py acts on it at setup."""
    return pytest.mark.needs_peer(available=available, reason=reason)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and not one this test process was given before: the
    kernel may hand the same free port to two calls in a row (a node's DICOM and HTTP ports, say)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def peer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, TCP_NODELAY="1")
    env.update(extra)
    return env


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned), or fail the test saying `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None,
                  host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class ManagedProcess:
    """A child process that is always stopped by its pid: TERM, then KILL.

    Use as a context manager so a failing test never leaves a server running.
    """

    def __init__(self, args: Sequence[str | os.PathLike], *, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, log: Path | None = None):
        self.args = [str(a) for a in args]
        self.log = log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.args, env=env or peer_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if log:
            out.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0, first_signal: int = signal.SIGTERM) -> int | None:
        for sig in (first_signal, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout if sig != signal.SIGKILL else 30)
            except subprocess.TimeoutExpired:
                continue
        return self.process.returncode

    def kill(self) -> None:
        """kill -9: the crash the durability tests simulate."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
