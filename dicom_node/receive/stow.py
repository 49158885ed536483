"""STOW-RS receive (PS3.18 10.5): `POST /dicomweb/studies[/{study}]` on the node's HTTP server.

A second front door to the same store path as C-STORE (dicom_node.receive.ingest):
the same spool, journal, duplicate handling, quarantine, metrics and completion.
An instance is listed in the response's ReferencedSOPSequence only once its
file and journal row are on disk, exactly when C-STORE would answer success.

- Access: `Authorization: Bearer <token>`, one token per sender under
  `http.stow.senders`; the sender's `name` is its calling AE (journal, audit,
  metrics, routing conditions). No sender configured: 403. Unknown token: 401.
- The request is `multipart/related; type="application/dicom"` (PS3.18
  8.6.1.2), each part one Part 10 file. Any other media type: 415; a body that
  is not multipart (no boundary, no closing delimiter, a broken header): 400.
- Limits: `http.stow.max_request_mb` (413 on the Content-Length, or once the
  streamed body passes it) and `http.stow.max_instances` parts (413).
- Streaming: the body is parsed as it arrives and each part written to an
  anonymous temporary file under the storage dir (gone with the process, even
  on a crash); the request is never held in memory, one instance at a time is.
  The parts are stored once the body has ended well-formed, so a body cut off
  or malformed stores nothing.
- Per part (PS3.18 Table 10.5.3-3 Failure Reason, PS3.4 B.2.3 statuses): not
  application/dicom, or not a Part 10 file: 0xC000; on a study URL, an
  instance of another study: 0xA900; otherwise what the store path answers.
- Response (application/dicom+json): ReferencedSOPSequence (0008,1199) with
  each stored instance's class, UID and RetrieveURL; FailedSOPSequence
  (0008,1198) with the failure reason per instance (a part whose UIDs cannot
  be read is listed with its reason alone). HTTP 200 when every instance was
  stored, 202 when some failed, 409 when all failed (PS3.18 Table 10.5.3-1);
  400 when no part was a usable DICOM instance at all.
- Shutdown: once the node stops, new requests are answered 503, as the
  DICOM port closes to new associations.
- Completion: each request is a sending episode of its own in the completion
  tracker, ended like a released association once its response is ready; the
  audit gets one `received` event per series, with the transport.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.concurrency import run_in_threadpool

from dicom_node.config import Config
from dicom_node.config.node import StowSender
from dicom_node.receive.header import HeaderError, InstanceHeader, read_header
from dicom_node.receive.ingest import (STATUS_CANNOT_UNDERSTAND, STATUS_DATA_SET_DOES_NOT_MATCH, Delivery, Ingest,
                                       Outcome)
from dicom_node.receive.multipart import MalformedMultipart, MultipartParser, PartData, PartEnd, PartStart, media_type
from dicom_node.store.audit import AuditEvent

log = logging.getLogger("dicom_node.receive.stow")

PREFIX = "/dicomweb"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# DICOM JSON tags (PS3.18 F.2) of the store instances response module (PS3.18 Table 10.5.3-2)
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class StowRefused(Exception):
    """The whole request is refused with an HTTP status (no instance stored)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


@dataclass
class Part:
    """One part of the body, spooled to an anonymous temporary file as it arrived."""

    number: int
    content_type: str | None
    file: IO[bytes]


@dataclass(frozen=True)
class Part10:
    """A Part 10 file's File Meta Information (PS3.10 7.1) and where its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_set: bytes


@dataclass
class InstanceResult:
    """What became of one part: its UIDs (as far as they could be read) and the store path's outcome."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    status: int
    reason: str = ""
    new: bool = False  # stored now, not a re-send of an instance the node held


@dataclass
class RequestResult:
    stored: list[InstanceResult] = field(default_factory=list)
    failed: list[InstanceResult] = field(default_factory=list)
    new_by_series: Counter[tuple[str, str]] = field(default_factory=Counter)


def read_part10(data: bytes) -> Part10:
    """Split a Part 10 file into its meta's UIDs and its data set (the meta is explicit VR little endian,
    group 0002 elements up to the first element of another group)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no \"DICM\" after the 128-byte preamble, PS3.10 7.1)")
    values: dict[int, bytes] = {}
    at = 132
    while at + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, at)
        if group != 0x0002:
            break
        vr = bytes(data[at + 4:at + 6])
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, at + 8)[0]
            start = at + 12
        else:
            length = struct.unpack_from("<H", data, at + 6)[0]
            start = at + 8
        if start + length > len(data):
            raise ValueError("the File Meta Information ends inside an element")
        values[element] = bytes(data[start:start + length])
        at = start + length
    uid = {name: values.get(element, b"").rstrip(b"\x00 ").decode("ascii", errors="replace")
           for name, element in (("class", 0x0002), ("instance", 0x0003), ("syntax", 0x0010))}
    if not uid["syntax"]:
        raise ValueError("the File Meta Information has no Transfer Syntax UID (0002,0010)")
    return Part10(uid["class"], uid["instance"], uid["syntax"], data[at:])


class StowReceiver:
    """The STOW-RS endpoints' work; `ingest` is the store path the Storage SCP uses."""

    def __init__(self, config: Config, ingest: Ingest):
        self.config = config
        self.ingest = ingest
        self._ids = itertools.count(1)
        self.accepting = True  # False once the node shuts down: as the DICOM port closes, STOW-RS is refused

    def stop(self) -> None:
        """No new STOW-RS request from now (503), as no new association once the DICOM port closes."""
        self.accepting = False

    # --- the request as a whole ----------------------------------------------------------------

    def sender(self, authorization: str) -> StowSender:
        senders = self.config.http.stow.senders
        if not senders:
            raise StowRefused(403, "STOW-RS is not enabled on this node: no sender is configured under "
                                   "http.stow.senders")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer":
            for candidate in senders:
                if hmac.compare_digest(given.strip().encode(), candidate.token.encode()):
                    return candidate
        raise StowRefused(401, "a bearer token of a STOW-RS sender (http.stow.senders) is required",
                          {"WWW-Authenticate": "Bearer"})

    async def receive(self, request: Request, study: str | None) -> Response:
        host = request.client.host if request.client else ""
        try:
            if not self.accepting:
                raise StowRefused(503, "the node is shutting down; send again once it is back",
                                  {"Retry-After": "30"})
            sender = self.sender(request.headers.get("authorization", ""))
            parts = await self._spool_parts(request)
        except ClientDisconnect:
            log.warning("STOW-RS request from %s: the client went away before the body ended; nothing stored", host)
            return Response(status_code=400)
        except StowRefused as refused:
            log.warning("STOW-RS request from %s refused with HTTP %d: %s", host, refused.status, refused.detail)
            return JSONResponse({"detail": refused.detail}, status_code=refused.status, headers=refused.headers)
        try:
            session = f"stow-{next(self._ids)}"
            result = await run_in_threadpool(self._store_parts, parts, sender, host, study, session)
        finally:
            for part in parts:
                part.file.close()
        base = str(request.base_url).rstrip("/") + PREFIX
        return await run_in_threadpool(self._response, base, study, result, sender, host)  # it writes the audit

    async def _spool_parts(self, request: Request) -> list[Part]:
        limits = self.config.http.stow
        max_bytes = int(limits.max_request_mb * 1024 * 1024)
        content_type, params = media_type(request.headers.get("content-type", ""))
        if content_type != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
            raise StowRefused(415, f"the node stores multipart/related; type=\"{DICOM}\" (PS3.18 10.5.1.2), "
                                   f"not {request.headers.get('content-type')!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise StowRefused(413, f"the request has {int(declared)} bytes, over http.stow.max_request_mb "
                                   f"({limits.max_request_mb:g} MB)")
        parts: list[Part] = []
        try:
            parser = MultipartParser(params.get("boundary", ""))
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise StowRefused(413, f"the request passed http.stow.max_request_mb ({limits.max_request_mb:g} "
                                           "MB) while it was read")
                for event in parser.feed(chunk):
                    self._spool_event(event, parts, params.get("type"))
            parser.close()
        except MalformedMultipart as error:
            for part in parts:
                part.file.close()
            raise StowRefused(400, f"malformed multipart body: {error}") from None
        except BaseException:
            for part in parts:
                part.file.close()
            raise
        if not parts:
            raise StowRefused(400, "the multipart body has no part")
        return parts

    def _spool_event(self, event: PartStart | PartData | PartEnd, parts: list[Part], root_type: str | None) -> None:
        if isinstance(event, PartStart):
            if len(parts) >= self.config.http.stow.max_instances:
                raise StowRefused(413, f"the request has more than http.stow.max_instances "
                                       f"({self.config.http.stow.max_instances}) parts")
            parts.append(Part(len(parts) + 1, event.content_type or root_type,
                              tempfile.TemporaryFile(dir=self.ingest.spool.storage_dir, prefix=".stow-")))
        elif isinstance(event, PartData):
            parts[-1].file.write(event.data)

    # --- each instance ---------------------------------------------------------------------------

    def _store_parts(self, parts: list[Part], sender: StowSender, host: str, study: str | None,
                     session: str) -> RequestResult:
        result = RequestResult()
        released = False
        try:
            for part in parts:
                outcome = self._store_part(part, sender, host, study, session)
                (result.stored if outcome.status == 0 else result.failed).append(outcome)
                if outcome.new:
                    result.new_by_series[(outcome.study_instance_uid, outcome.series_instance_uid)] += 1
            released = True
        finally:
            self.ingest.tracker.association_closed(session, released=released)
        return result

    def _store_part(self, part: Part, sender: StowSender, host: str, study: str | None,
                    session: str) -> InstanceResult:
        part.file.seek(0)
        data = part.file.read()
        part.file.close()
        try:
            part10 = read_part10(data)
            header: InstanceHeader | None = read_header(part10.data_set, part10.transfer_syntax)
        except (ValueError, HeaderError, struct.error) as error:
            part10, header, why = None, None, str(error)
        else:
            why = ""
        result = InstanceResult(
            part10.sop_class_uid if part10 else None, part10.sop_instance_uid if part10 else None,
            header.study_instance_uid if header else None, header.series_instance_uid if header else None,
            STATUS_CANNOT_UNDERSTAND)
        kind = (part.content_type or "").split(";", 1)[0].strip().lower()
        if kind != DICOM:
            result.reason = f"part {part.number} is {part.content_type or 'without a Content-Type'}, not {DICOM}"
        elif part10 is None or header is None:
            result.reason = f"part {part.number} is not a readable DICOM Part 10 file: {why}"
        elif study is not None and header.study_instance_uid != study:
            result.status = STATUS_DATA_SET_DOES_NOT_MATCH
            result.reason = (f"study instance UID does not match: the instance's {header.study_instance_uid!r}, "
                             f"the request's {study!r}")
        else:
            outcome: Outcome = self.ingest.store(Delivery(
                "stow", session, sender.name, self.config.node.ae_title, host, part10.sop_class_uid,
                part10.sop_instance_uid, part10.transfer_syntax, part10.data_set), header)
            result.status, result.reason, result.new = outcome.status, outcome.reason, outcome.new
            return result
        log.error("STOW-RS refused (0x%04X) from %s: %s", result.status, sender.name, result.reason)
        return result

    # --- the response ----------------------------------------------------------------------------

    def _response(self, base: str, study: str | None, result: RequestResult, sender: StowSender,
                  host: str) -> Response:
        readable = [r for r in result.failed if r.sop_instance_uid]
        if not result.stored and not readable:
            reasons = "; ".join(r.reason for r in result.failed)
            log.warning("STOW-RS request from %s (%s) refused with HTTP 400: %s", sender.name, host, reasons)
            return JSONResponse({"detail": f"no part is a usable DICOM instance: {reasons}"}, status_code=400)
        body: dict = {}
        studies = {r.study_instance_uid for r in result.stored} | ({study} if study else set())
        if len(studies) == 1:
            body[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/studies/{next(iter(studies))}"]}
        if result.stored:
            body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
                {**_uids(r), RETRIEVE_URL: {"vr": "UR", "Value": [
                    f"{base}/studies/{r.study_instance_uid}/series/{r.series_instance_uid}/instances/"
                    f"{r.sop_instance_uid}"]}} for r in result.stored]}
        if result.failed:
            body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
                {**_uids(r), FAILURE_REASON: {"vr": "US", "Value": [r.status]}} for r in result.failed]}
        status = 200 if not result.failed else 202 if result.stored else 409
        self._audit(result, sender, host, status)
        log.info("STOW-RS request from %s (%s): %d stored, %d failed, HTTP %d", sender.name, host,
                 len(result.stored), len(result.failed), status)
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)

    def _audit(self, result: RequestResult, sender: StowSender, host: str, status: int) -> None:
        for (study, series), count in result.new_by_series.items():
            self.ingest.audit.record(AuditEvent(
                "received", calling_ae=sender.name, host=host, study_instance_uid=study,
                series_instance_uid=series, instance_count=count, status="stored",
                detail=f"over STOW-RS (HTTP {status}: {len(result.stored)} stored, {len(result.failed)} failed)"))


def _uids(result: InstanceResult) -> dict:
    uids = {}
    if result.sop_class_uid:
        uids[REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [result.sop_class_uid]}
    if result.sop_instance_uid:
        uids[REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [result.sop_instance_uid]}
    return uids
