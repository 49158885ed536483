"""The DICOMweb destination kind (`kind: dicomweb`): STOW-RS (PS3.18 10.5) with per-instance outcomes, and
a QIDO-RS query for `dicom-node echo`.

Instances go as their stored PS3.10 files, `batch_size` to a request, each request to
POST {url}/studies/{StudyInstanceUID} (a request holds one study, so the server can check every
instance against the URL) as multipart/related; type="application/dicom" (PS3.18 8.6.1.2). The
answer is read per instance from the PS3.18 10.5.3 response (application/dicom+json):
ReferencedSOPSequence (0008,1199) lists the stored ones, with a WarningReason (0008,1196) when the
server coerced or discarded something; FailedSOPSequence (0008,1198) the refused ones, with a
FailureReason (0008,1197) that carries the C-STORE statuses of PS3.4 Annex B, so it is classified
as `dimse.classify_status` classifies them (0x0122, SOP class not supported, refuses with
`Refusal.SOP_CLASS_NOT_SUPPORTED`: the overlay fallback). Only the failed instances of a
partly stored request are tried again, by the export loop's retry policy, as for C-STORE.

HTTP statuses without a per-instance answer decide for the whole request: 408, 429, 5xx, a refused
or broken connection and a timeout are transient (the server is busy or away); any other 4xx is
permanent (401/403 credentials, 404 a wrong url, 415 a server that does not take PS3.10 files), with
the server's status line and message as the reason. A 400 or 413, or a response that lists none of the
instances, can be caused by one instance of the batch (Orthanc answers a request holding a file it
cannot parse with 400, or with empty sequences): such a request is sent again one instance at a time,
so that only the instance at fault is dead-lettered.

An Outcome's `status` is the PS3.4 status the server gave the instance (0x0000 stored, the
WarningReason or FailureReason), None where it answered only for the whole request (the HTTP
status is then in the reason): the journal and the metrics' failure label mean the same as for
C-STORE. After a transient whole-request answer (the server is down or busy) the remaining
batches of the pass are not tried; the retry policy brings them back.
"""
from __future__ import annotations

import http.client
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config.destinations import DicomwebDestinationConfig
from dicom_node.dispatch.destinations import DispatchReport, EchoResult, Outcome, OutcomeKind, Refusal
from dicom_node.dispatch.dimse import SOP_CLASS_NOT_SUPPORTED, classify_status

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
DICOM_JSON = "application/dicom+json"
TRANSIENT_HTTP = {408, 429}  # request timeout, too many requests: the server asks us to come back
SPLIT_HTTP = {400, 413}  # may be one instance's fault (unparseable, too large): each is tried alone
QIDO = "QIDO-RS"  # what `dicom-node echo` reports it sent
REASON_CHARS = 300  # of a server's message kept in the reason


@dataclass(frozen=True)
class _Instance:
    path: Path
    study_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    content_type: str
    body: bytes

    def message(self) -> str:
        """The status line, and the server's own words when it sent some (other than the PS3.18 data set,
        which some servers send without its Content-Type)."""
        line = f"HTTP {self.status} {self.reason}".rstrip()
        if self.body and not self.content_type.startswith(DICOM_JSON) and _dataset(self.body) is None:
            text = " ".join(self.body[:REASON_CHARS].decode("utf-8", "replace").split())
            return f"{line}: {text}"
        return line


class _Connection:
    """One keep-alive HTTP(S) connection to the destination, opened again after the server closes it."""

    def __init__(self, destination: DicomwebDestinationConfig) -> None:
        self.destination = destination
        parts = urlsplit(destination.url)
        self.path = parts.path
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> _Response:
        """One request; on a kept-alive connection the server may have closed meanwhile, once more on a new
        one (a STOW-RS resend is safe: the same SOP Instance UIDs are the same instances, PS3.4 B.4.1)."""
        reused = self._conn is not None
        try:
            return self._request(method, path, body, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            return self._request(method, path, body, headers)

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> _Response:
        if self._conn is None:
            if self.https:
                tls = self.destination.tls
                context = tls.contexts()[0] if tls is not None else None
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.destination.timeout_s,
                                                         context=context)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.destination.timeout_s)
        headers = dict(headers)
        if self.destination.auth is not None:
            headers["Authorization"] = self.destination.auth.header()
        try:
            self._conn.request(method, self.path + path, body=body, headers=headers)
            response = self._conn.getresponse()
            answer = _Response(response.status, response.reason, response.getheader("Content-Type", ""),
                               response.read())
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return answer

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def describe(destination: DicomwebDestinationConfig) -> str:
    return f"STOW-RS {destination.url}"


def send(destination: DicomwebDestinationConfig, paths: Sequence[Path], calling_ae: str,
         on_outcome: Callable[[Outcome], None] | None = None) -> DispatchReport:
    """STOW-RS every file, `batch_size` a request, one study a request; each file gets exactly one Outcome.

    `calling_ae` is not used: STOW-RS has no AE titles (the kind interface is the same for every kind).
    """
    outcomes: list[Outcome] = []

    def add(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    instances = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            instances.append(_Instance(Path(path), str(ds.get("StudyInstanceUID", "")), str(ds.SOPInstanceUID)))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            add(Outcome(Path(path).name, None, OutcomeKind.PERMANENT, f"cannot read the file: {exc}"))
    connection = _Connection(destination)
    unreachable: str | None = None
    try:
        for batch in _batches(instances, destination.batch_size):
            if unreachable is not None:  # the server is down or busy: the rest wait for the retry policy too
                for inst in batch:
                    add(Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, unreachable))
                continue
            for outcome in _store(connection, batch):
                if outcome.status is None and outcome.kind == OutcomeKind.TRANSIENT:
                    unreachable = outcome.reason
                add(outcome)
    finally:
        connection.close()
    return DispatchReport(describe(destination), tuple(outcomes))


def _batches(instances: Sequence[_Instance], size: int) -> Iterator[list[_Instance]]:
    """Up to `size` instances of one study each, in the order given."""
    by_study: dict[str, list[_Instance]] = {}
    for inst in instances:
        by_study.setdefault(inst.study_instance_uid, []).append(inst)
    for study in by_study.values():
        for start in range(0, len(study), size):
            yield study[start:start + size]


def _store(connection: _Connection, batch: list[_Instance]) -> list[Outcome]:
    """One STOW-RS request for `batch` (one study); split into single-instance requests where the answer
    may be one instance's fault."""
    study = batch[0].study_instance_uid
    try:
        body, content_type = _multipart([inst.path.read_bytes() for inst in batch])
    except OSError as exc:
        return [Outcome(inst.sop_instance_uid, None, OutcomeKind.PERMANENT, f"cannot read the file: {exc}")
                for inst in batch]
    # A file without a Study Instance UID goes to /studies: the server then says what it makes of it.
    path = f"/studies/{quote(study, safe='')}" if study else "/studies"
    try:
        response = connection.request("POST", path, body, {"Content-Type": content_type, "Accept": DICOM_JSON})
    except (OSError, http.client.HTTPException) as exc:
        reason = f"no response from the server: {exc or type(exc).__name__}"
        return [Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, reason) for inst in batch]
    if len(batch) > 1 and _may_be_one_instance(response, batch):
        log.info("STOW-RS %s: %s for %d instances; trying each alone", path, response.message(), len(batch))
        return [outcome for inst in batch for outcome in _store(connection, [inst])]
    return _outcomes(batch, response)


def _may_be_one_instance(response: _Response, batch: list[_Instance]) -> bool:
    """A 400 or 413, or an answer that names none of the instances: one of them may be the cause."""
    if response.status in SPLIT_HTTP:
        return True
    if response.status == 200 and not response.body.strip():
        return False  # all stored
    if 200 <= response.status < 300 or response.status == 409:
        stored, failed = _read_response(response.body)
        return not any(inst.sop_instance_uid in stored or inst.sop_instance_uid in failed for inst in batch)
    return False


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """The request body and its Content-Type (RFC 2046 5.1, PS3.18 8.6.1.2): a boundary that occurs in no
    part, each part a PS3.10 file as application/dicom."""
    while True:
        boundary = uuid.uuid4().hex
        delimiter = f"--{boundary}".encode()
        if not any(delimiter in part for part in parts):
            break
    chunks = []
    for part in parts:
        chunks += [delimiter, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _outcomes(batch: list[_Instance], response: _Response) -> list[Outcome]:
    """Each instance's outcome from the response: its own entry in the PS3.18 data set where there is one,
    else what the HTTP status says for the whole request."""
    status = response.status
    if status in TRANSIENT_HTTP or status >= 500:
        return [Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, response.message()) for inst in batch]
    if not 200 <= status < 300 and status != 409:  # 409: none stored, each failure in FailedSOPSequence
        where = " (check url)" if status in (301, 302, 307, 308, 404) else ""
        return [Outcome(inst.sop_instance_uid, None, OutcomeKind.PERMANENT, response.message() + where)
                for inst in batch]
    if status == 200 and not response.body.strip():  # "stored all instances" (PS3.18 10.5.3), no details
        return [Outcome(inst.sop_instance_uid, 0x0000, OutcomeKind.SENT, "stored (HTTP 200 without a response body)")
                for inst in batch]
    stored, failed = _read_response(response.body)
    outcomes = []
    for inst in batch:
        uid = inst.sop_instance_uid
        if uid in failed:
            code = failed[uid]
            kind, meaning = classify_status(code) if code is not None else (OutcomeKind.PERMANENT, "failed")
            outcomes.append(Outcome(uid, code, kind, f"{response.message()}: {meaning} (FailureReason)",
                                    Refusal.SOP_CLASS_NOT_SUPPORTED if code == SOP_CLASS_NOT_SUPPORTED else None))
        elif uid in stored:
            warning = stored[uid]
            if warning is None:
                outcomes.append(Outcome(uid, 0x0000, OutcomeKind.SENT, "stored"))
            else:
                outcomes.append(Outcome(uid, warning, OutcomeKind.WARNING, f"stored with warning 0x{warning:04X}"))
                log.warning("STOW-RS: %s stored with WarningReason 0x%04X", uid, warning)
        else:
            outcomes.append(Outcome(uid, None, OutcomeKind.PERMANENT,
                                    f"{response.message()}, the response lists it neither as stored nor as failed "
                                    "(the server could not read it: its log says why)"))
    return outcomes


def _read_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """SOP Instance UID -> WarningReason (None: none) of the stored, -> FailureReason of the failed
    (PS3.18 10.5.3, the data set in DICOM JSON, PS3.18 F.2)."""
    dataset = _dataset(body) or {}
    return (_items(dataset, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
            _items(dataset, FAILED_SOP_SEQUENCE, FAILURE_REASON))


def _dataset(body: bytes) -> dict | None:
    """The body as a DICOM JSON data set (keys are tags, 8 hex digits), or None."""
    try:
        dataset = json.loads(body)
    except ValueError:
        return None
    if isinstance(dataset, list) and len(dataset) == 1:  # some servers wrap the data set in an array
        dataset = dataset[0]
    if isinstance(dataset, dict) and dataset and all(re.fullmatch(r"[0-9A-Fa-f]{8}", key) for key in dataset):
        return dataset
    return None


def _items(dataset: dict, sequence: str, code_tag: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for item in (dataset.get(sequence) or {}).get("Value") or []:
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid is not None:
            code = _first(item, code_tag)
            found[str(uid)] = int(code) if isinstance(code, int) else None
    return found


def _first(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def echo(destination: DicomwebDestinationConfig, calling_ae: str) -> EchoResult:
    """A QIDO-RS query for one study (GET {url}/studies?limit=1, PS3.18 10.6): it reaches the service
    under its base URL, with the credentials and TLS the sends use. No STOW-RS request stores nothing, and
    OPTIONS is not served by every archive (Orthanc answers it 404), so a query is the C-ECHO's stand-in."""
    connection = _Connection(destination)
    try:
        response = connection.request("GET", "/studies?limit=1", None, {"Accept": DICOM_JSON})
    except (OSError, http.client.HTTPException) as exc:
        return EchoResult(False, None, f"no response from the server: {exc or type(exc).__name__}", QIDO)
    finally:
        connection.close()
    ok = response.status in (200, 204)
    return EchoResult(ok, response.status, "ok" if ok else response.message(), QIDO)


class Dicomweb:
    """The DICOMweb kind for the registry (`dicom_node.dispatch.registry.KINDS`)."""

    name = "dicomweb"
    send = staticmethod(send)
    echo = staticmethod(echo)
    describe = staticmethod(describe)
