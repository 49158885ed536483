"""The DIMSE destination kind (`kind: dimse`, the default): C-STORE (SCU side) with per-instance outcomes,
and C-ECHO.

Status meanings follow PS3.4 Annex B (B.2.3, Table B.2-1) and PS3.7 C.4.2: 0x0000 success;
0xB000/0xB006/0xB007 stored with a warning; 0xA7xx out of resources (transient: the PACS may
have room later); 0xA9xx data set does not match the SOP class, 0xC0xx cannot understand,
0x0122 SOP class not supported, 0x0124 not authorized and other failures are permanent (a
resend would get the same answer). Association outcomes follow PS3.8 9.3.4: an A-ASSOCIATE-RJ
with result 0x02 is "rejected-transient", 0x01 "rejected-permanent"; a refused connection, a
timeout or an A-ABORT are transient. A SOP class for which no presentation context was
accepted, and status 0x0122, are permanent with `Refusal.SOP_CLASS_NOT_SUPPORTED`, so the
pipeline can fall back to the overlay series.

A compressed object goes compressed where the destination accepts its syntax and decompressed
(explicit VR little endian, same SOP Instance UID) where it takes only uncompressed ones, so
`results.compress_frames` and forwarding of compressed originals never strand an object.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from dicom_node import sop_classes
from dicom_node.config.destinations import DestinationConfig
from dicom_node.dispatch.destinations import DispatchReport, EchoResult, Outcome, OutcomeKind, Refusal
from dicom_node.tls import client_context

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_CONTEXT = "SOP class not supported by destination (no accepted presentation context)"


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def classify_status(status: int) -> tuple[OutcomeKind, str]:
    """Map a C-STORE response status to an outcome kind (PS3.4 Table B.2-1)."""
    if status == 0x0000:
        return OutcomeKind.SENT, "stored"
    if status in WARNING_STATUSES:
        meaning = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
                   0xB007: "data set does not match SOP class"}[status]
        return OutcomeKind.WARNING, f"stored with warning 0x{status:04X} ({meaning})"
    if status & 0xFF00 == 0xA700:
        return OutcomeKind.TRANSIENT, f"refused: out of resources (0x{status:04X})"
    if status & 0xFF00 == 0xA900:
        return OutcomeKind.PERMANENT, f"error: data set does not match SOP class (0x{status:04X})"
    if status & 0xF000 == 0xC000:
        return OutcomeKind.PERMANENT, f"error: cannot understand (0x{status:04X})"
    if status == SOP_CLASS_NOT_SUPPORTED:
        return OutcomeKind.PERMANENT, "refused: SOP class not supported (0x0122)"
    if status == 0x0124:
        return OutcomeKind.PERMANENT, "refused: not authorized (0x0124)"
    return OutcomeKind.PERMANENT, f"failure status 0x{status:04X}"


def _read_headers(paths: Sequence[Path]) -> list[_Instance]:
    instances = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(_Instance(Path(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                   str(ds.file_meta.TransferSyntaxUID)))
    return instances


def _contexts(instances: Sequence[_Instance], allowed: Sequence[str]) -> list:
    """The contexts the files need: per SOP class, one context for each compressed syntax the
    files are in, and one offering the uncompressed syntaxes, the file's own first (compressed
    files fall back to it, decompressed, when the destination refuses their own syntax).
    Separate contexts let the destination accept the compressed syntax instead of having to
    choose one syntax from a mixed list. destination.transfer_syntaxes restricts both."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for inst in instances:
        if _is_compressed(inst.transfer_syntax):
            if not allowed or inst.transfer_syntax in allowed:
                wanted[(inst.sop_class_uid, (inst.transfer_syntax,))] = None
            preferred = list(UNCOMPRESSED)
        else:
            preferred = [inst.transfer_syntax] + [ts for ts in UNCOMPRESSED if ts != inst.transfer_syntax]
        uncompressed = tuple(ts for ts in preferred if not allowed or ts in allowed)
        if uncompressed:
            wanted[(inst.sop_class_uid, uncompressed)] = None
    return [build_context(sop, list(syntaxes)) for sop, syntaxes in wanted]


def _is_compressed(transfer_syntax: str) -> bool:
    return UID(transfer_syntax) not in UNCOMPRESSED and sop_classes.is_encapsulated(transfer_syntax)


def _decompressed(path: Path) -> pydicom.Dataset:
    """The file's dataset with native (uncompressed) Pixel Data, explicit VR little endian.

    1-bit data (BINARY SEG frames) is packed again after decoding, 8 pixels a byte with frames
    contiguous (PS3.5 8.1.1): pydicom's own decompress() would leave a byte per pixel.
    """
    ds = pydicom.dcmread(path)
    if int(ds.get("BitsAllocated", 0)) == 1:
        ds.PixelData = pack_bits(ds.pixel_array)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = False  # it was encapsulated
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        # The same instance in another transfer syntax keeps its identity; pydicom would
        # otherwise give the decompressed dataset a new SOP Instance UID.
        ds.decompress(generate_instance_uid=False)
    return ds


def _nodelay(event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(destination: DestinationConfig, calling_ae: str, contexts: list):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    ae.connection_timeout = destination.timeout_s
    ae.requested_contexts = contexts
    tls_args = None
    if destination.tls is not None:
        settings = destination.tls
        context = client_context(settings.ca_certificates, settings.certificate, settings.private_key,
                                 settings.check_hostname)
        tls_args = (context, destination.host if settings.check_hostname else None)
    return ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                        max_pdu=destination.max_pdu, tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])


def _association_failure(assoc) -> tuple[OutcomeKind, str, Refusal | None]:
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        result = assoc.acceptor.primitive.result
        source, diag = assoc.acceptor.primitive.result_source, assoc.acceptor.primitive.diagnostic
        kind = OutcomeKind.TRANSIENT if result == 0x02 else OutcomeKind.PERMANENT
        return kind, f"association rejected ({kind}, source {source}, reason {diag})", None
    primitive = assoc.acceptor.primitive
    if primitive is not None and primitive.result == 0x00:
        # A-ASSOCIATE-AC with every proposed context rejected: pynetdicom then aborts.
        return OutcomeKind.PERMANENT, NO_CONTEXT, Refusal.SOP_CLASS_NOT_SUPPORTED
    return OutcomeKind.TRANSIENT, "no association: connection refused, timed out or aborted", None


def describe(destination: DestinationConfig) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def send(destination: DestinationConfig, paths: Sequence[Path], calling_ae: str,
         on_outcome: Callable[[Outcome], None] | None = None) -> DispatchReport:
    """Send every file in one association; each file gets exactly one Outcome.

    `on_outcome` sees each outcome as it is decided (the CLI's progress bar).
    """
    name = describe(destination)
    instances = _read_headers(paths)
    if not instances:
        return DispatchReport(name, ())
    contexts = _contexts(instances, destination.transfer_syntaxes)
    if not contexts:
        return _report(name, [Outcome(i.sop_instance_uid, None, OutcomeKind.PERMANENT,
                                      "no allowed transfer syntax for SOP class") for i in instances], on_outcome)
    assoc = _associate(destination, calling_ae, contexts)
    if not assoc.is_established:
        kind, reason, refusal = _association_failure(assoc)
        return _report(name, [Outcome(i.sop_instance_uid, None, kind, reason, refusal) for i in instances],
                       on_outcome)
    outcomes: list[Outcome] = []

    def add(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        classes = {sop for sop, _ in accepted}
        for inst in instances:
            if inst.sop_class_uid not in classes:
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.PERMANENT, NO_CONTEXT,
                            Refusal.SOP_CLASS_NOT_SUPPORTED))
                continue
            if not assoc.is_established:
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, "association lost"))
                continue
            try:
                payload = _payload(inst, accepted)
            except (ValueError, RuntimeError, NotImplementedError) as exc:
                # Its pixels do not decode, or pydicom has no decoder for its syntax: no retry changes that.
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.PERMANENT, f"cannot send: {exc}"))
                continue
            try:
                rsp = assoc.send_c_store(payload)
            except (ValueError, AttributeError) as exc:  # cannot be encoded in the accepted syntax, or lacks
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.PERMANENT, f"cannot send: {exc}"))  # UIDs
                continue
            except RuntimeError as exc:  # pynetdicom: the association is no longer established
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, f"association lost: {exc}"))
                continue
            status = getattr(rsp, "Status", None)
            if status is None:
                add(Outcome(inst.sop_instance_uid, None, OutcomeKind.TRANSIENT, "no response (timeout or abort)"))
                continue
            kind, reason = classify_status(int(status))
            if kind == OutcomeKind.WARNING:
                log.warning("%s: %s for %s", name, reason, inst.sop_instance_uid)
            add(Outcome(inst.sop_instance_uid, int(status), kind, reason,
                        Refusal.SOP_CLASS_NOT_SUPPORTED if status == SOP_CLASS_NOT_SUPPORTED else None))
    finally:
        if assoc.is_established:
            assoc.release()
    return DispatchReport(name, tuple(outcomes))


def _payload(inst: _Instance, accepted: set[tuple[str, str]]):
    """What to send for `inst`: the stored file when the destination accepted its syntax, else its data
    set decompressed, or re-encoded by pynetdicom in the other uncompressed syntax."""
    if (inst.sop_class_uid, inst.transfer_syntax) in accepted:
        return inst.path  # the stored bytes as they are
    if _is_compressed(inst.transfer_syntax):
        return _decompressed(inst.path)
    return pydicom.dcmread(inst.path)


def _report(name: str, outcomes: list[Outcome], on_outcome: Callable[[Outcome], None] | None) -> DispatchReport:
    for outcome in outcomes if on_outcome is not None else ():
        on_outcome(outcome)
    return DispatchReport(name, tuple(outcomes))


def echo(destination: DestinationConfig, calling_ae: str) -> EchoResult:
    """C-ECHO (Verification, PS3.4 Annex A) to check a destination is reachable and accepts us."""
    assoc = _associate(destination, calling_ae, [build_context("1.2.840.10008.1.1")])
    if not assoc.is_established:
        _, reason, _ = _association_failure(assoc)
        return EchoResult(False, None, reason)
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
        return EchoResult(status == 0x0000, None if status is None else int(status),
                          "ok" if status == 0x0000 else "no or failed response")
    finally:
        if assoc.is_established:
            assoc.release()


class Dimse:
    """The DIMSE kind for the registry (`dicom_node.dispatch.registry.KINDS`)."""

    name = "dimse"
    send = staticmethod(send)
    echo = staticmethod(echo)
    describe = staticmethod(describe)
