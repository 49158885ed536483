"""dcmtk's storescu / echoscu / storescp (Debian package `dcmtk`) as real peers.

Always the system binaries (`/usr/bin`), never pynetdicom's same-named apps
that the venv puts first on PATH, and always with TCP_NODELAY=1 (Debian's dcmtk
leaves Nagle on, and each C-STORE would then stall ~40 ms).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import ManagedProcess, needs, peer_env, wait_for_port

_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def tool(name: str) -> str:
    found = shutil.which(name, path=_SYSTEM_PATH)
    if found is None:
        raise FileNotFoundError(f"dcmtk {name} not found (apt-get install dcmtk)")
    return found


def available() -> bool:
    return shutil.which("storescu", path=_SYSTEM_PATH) is not None


def required() -> pytest.MarkDecorator:
    return needs(available(), "dcmtk not installed (apt-get install dcmtk)")


@dataclass(frozen=True)
class StoreResult:
    returncode: int
    output: str

    @property
    def acknowledged(self) -> list[Path]:
        """Files storescu saw answered with Success (from its -v log: "Sending file" then the response)."""
        files = []
        sending = None
        for line in self.output.splitlines():
            if m := re.search(r"Sending file: (.+)$", line):
                sending = Path(m.group(1).strip())
            elif "Received Store Response (Success)" in line and sending is not None:
                files.append(sending)
                sending = None
        return files

    def statuses(self) -> list[str]:
        return re.findall(r"Received Store Response \(([^)]*)\)", self.output)


def storescu_args(port: int, files: Sequence[Path | str], *, called_ae: str = "DICOMNODE",
                  calling_ae: str = "STORESCU", extra: Sequence[str] = ()) -> list[str]:
    return [tool("storescu"), "-v", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port),
            *[str(f) for f in files]]


def storescu(port: int, files: Sequence[Path | str], *, called_ae: str = "DICOMNODE", calling_ae: str = "STORESCU",
             extra: Sequence[str] = (), timeout: float = 120) -> StoreResult:
    """Send `files` in one association; -v logs each file and its response."""
    result = subprocess.run(storescu_args(port, files, called_ae=called_ae, calling_ae=calling_ae, extra=extra),
                            env=peer_env(), capture_output=True, text=True, timeout=timeout)
    return StoreResult(result.returncode, result.stdout + result.stderr)


def echoscu(port: int, *, called_ae: str = "DICOMNODE", calling_ae: str = "ECHOSCU",
            timeout: float = 30) -> StoreResult:
    result = subprocess.run([tool("echoscu"), "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                            env=peer_env(), capture_output=True, text=True, timeout=timeout)
    return StoreResult(result.returncode, result.stdout + result.stderr)


def storescp(port: int, out_dir: Path, *, ae_title: str = "STORESCP", log: Path | None = None,
             extra: Sequence[str] = ()) -> ManagedProcess:
    """dcmtk's Storage SCP writing every instance under `out_dir` (uncompressed syntaxes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess([tool("storescp"), "-aet", ae_title, "-od", str(out_dir), *extra, str(port)], log=log)
    wait_for_port(port, process=process.process)
    return process


def dsrdump(path: Path | str) -> subprocess.CompletedProcess:
    """dcmtk's SR reader: its text rendering of the document tree, long values in full (returncode 0 when it parsed)."""
    return subprocess.run([tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, env=peer_env(), timeout=60)
