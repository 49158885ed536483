"""Orthanc 1.10 (Debian package) as a real PACS for tests: own JSON config, loopback ports.

`DicomAlwaysAllowStore: false` with `DicomModalities` makes Orthanc accept C-STORE only from
the listed AEs, so a node calling with another AE title is refused at association time.
`dicomweb=True` loads the Debian orthanc-dicomweb plugin (STOW-RS, WADO-RS and QIDO-RS under
`dicomweb_url`); `users` turns on HTTP basic authentication for the REST and DICOMweb API alike.
"""
from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.peers import ManagedProcess, free_port, needs, peer_env, wait_for_port


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def available() -> bool:
    return shutil.which("Orthanc") is not None


def dicomweb_required() -> pytest.MarkDecorator:
    return needs(available() and DICOMWEB_PLUGIN.exists(),
                 "Orthanc or its DICOMweb plugin not installed (apt-get install orthanc orthanc-dicomweb)")


def required() -> pytest.MarkDecorator:
    return needs(available(), "Orthanc not installed (apt-get install orthanc)")


class Orthanc:
    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC", allowed_aes: dict[str, int] | None = None,
                 restrict_calling_aes: bool = False, unknown_sop_class_accepted: bool = False, verbose: bool = False,
                 dicomweb: bool = False, users: dict[str, str] | None = None):
        self.workdir = workdir
        self.verbose = verbose  # --verbose logs every C-STORE it is sent: store_requests() counts them
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = workdir / "orthanc.json"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
            "DicomAet": ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "DicomModalities": {ae.lower(): [ae, "127.0.0.1", port] for ae, port in (allowed_aes or {}).items()},
            "DicomAlwaysAllowStore": not restrict_calling_aes, "DicomAlwaysAllowEcho": not restrict_calling_aes,
            "UnknownSopClassAccepted": unknown_sop_class_accepted,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        }
        # The tests' own REST calls log in as the first user, when there are users.
        self._authorization = None if not users else "Basic " + base64.b64encode(
            ":".join(next(iter(users.items()))).encode()).decode()
        self.config_path.write_text(json.dumps(config, indent=1))
        self.process: ManagedProcess | None = None

    def start(self) -> Orthanc:
        self.process = ManagedProcess(["Orthanc", *(["--verbose"] if self.verbose else []), self.config_path],
                                      env=peer_env(TCP_NODELAY="1"), log=self.workdir / "orthanc.log")
        wait_for_port(self.dicom_port, process=self.process.process)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.get("/system")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop by pid; storage stays in workdir so start() brings back the same PACS (outage tests)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (studies are under {dicomweb_url}/studies)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _open(self, path: str, data: bytes | None = None, timeout: float = 10, method: str | None = None,
              headers: dict[str, str] | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                         headers=headers or {})
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        return urllib.request.urlopen(request, timeout=timeout)

    def put(self, path: str, body: dict) -> None:
        self._open(path, json.dumps(body).encode(), method="PUT").close()

    def fetch(self, path: str, accept: str) -> tuple[str, bytes]:
        """GET `path` with an Accept header (WADO-RS): the response's Content-Type and body."""
        with self._open(path, headers={"Accept": accept}) as response:
            return response.headers["Content-Type"], response.read()

    def log_text(self) -> str:
        log = self.workdir / "orthanc.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def post(self, path: str, body: bytes, timeout: float = 10):
        """POST `body` (a DICOM file to /instances, JSON elsewhere); the JSON answer."""
        with self._open(path, body, timeout) as response:
            return json.loads(response.read())

    def get(self, path: str):
        with self._open(path) as response:
            return json.loads(response.read())

    def studies(self) -> list[str]:
        return self.get("/studies")

    def series(self) -> list[dict]:
        return self.get("/series?expand")

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_file(self, orthanc_id: str) -> bytes:
        with self._open(f"/instances/{orthanc_id}/file") as response:
            return response.read()

    def store_requests(self) -> int:
        """C-STORE requests received over every start so far (needs verbose): a resend of an instance
        Orthanc already holds is counted here although /instances lists it once."""
        return self.log_text().count("Incoming Store request")

    def find_study(self, study_instance_uid: str) -> list[str]:
        body = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}}).encode()
        with self._open("/tools/find", body) as response:
            return json.loads(response.read())
