"""The node's front door: a pynetdicom Storage SCP (C-ECHO, C-STORE) with an AE allow-list and limits.

Durability contract: C-STORE success (0x0000) is sent only after the bytes
as received (never decoded and re-encoded) are in the spool, fsynced and
renamed, and the instance row is committed in the journal. Failures to
persist answer 0xA700 (PS3.4 B.2.3 "Refused: Out of Resources"); a dataset
whose UIDs cannot name a spool path answers 0xC000 ("Cannot understand").
A SOP Instance UID already in the journal (a re-send) is acknowledged with
success, logged, and neither written nor counted again: the first copy stays
(PS3.4 B.4.1 leaves duplicate handling to the SCP; success lets the sender's
retry finish instead of looping).

Association policy (PS3.8 7.1.1.9): an unknown calling AE title (or one
calling from a host it is not allowed from) gets A-ASSOCIATE-RJ rejected
permanent / service user / "calling AE title not recognized" (1, 1, 3); a
called AE title other than ours gets reason 7 "called AE title not
recognized".
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc
from pydicom import uid as tsuid

from dicom_node.audit import AuditEvent, AuditLog
from dicom_node.complete import CompletionTracker
from dicom_node.config import Config
from dicom_node.journal import Journal, NewInstance
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import InstanceKey, InvalidUID, Spool

log = logging.getLogger("dicom_node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

STORAGE_CLASSES = (
    sc.CTImageStorage, sc.EnhancedCTImageStorage, sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage, sc.EnhancedMRImageStorage, sc.EnhancedMRColorImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.SecondaryCaptureImageStorage, sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage, sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sc.SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    sc.BasicTextSRStorage, sc.EnhancedSRStorage, sc.ComprehensiveSRStorage, sc.Comprehensive3DSRStorage,
)

# Accepted as-is: the node stores what it is sent and never transcodes.
TRANSFER_SYNTAXES = (
    tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian, tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit, tsuid.JPEGExtended12Bit, tsuid.JPEGLossless, tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless, tsuid.JPEGLSNearLossless, tsuid.JPEG2000Lossless, tsuid.JPEG2000,
    tsuid.RLELossless,
)

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                "SeriesDescription"]


@dataclass
class AssociationStats:
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    released: bool = False
    series: Counter[tuple[str, str]] = field(default_factory=Counter)  # (study, series) UIDs -> instances stored


def calling_ae_allowed(config: Config, calling_ae: str, host: str) -> bool:
    security = config.security
    if security.allow_any_calling_ae:
        return True
    return any(entry.ae_title.strip() == calling_ae and (entry.host is None or entry.host == host)
               for entry in security.calling_aes)


class Receiver:
    """Owns the AE and the per-association bookkeeping; `start()` binds the port."""

    def __init__(self, config: Config, spool: Spool, journal: Journal, tracker: CompletionTracker,
                 metrics: NodeMetrics | None = None):
        self.config = config
        self.spool = spool
        self.journal = journal
        self.tracker = tracker
        self.metrics = metrics or NodeMetrics()
        self.audit = AuditLog(journal)
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        node = config.node
        self.ae = AE(ae_title=node.ae_title)
        self.ae.maximum_associations = node.max_associations
        self.ae.maximum_pdu_size = node.max_pdu
        self.ae.acse_timeout = node.acse_timeout_s
        self.ae.dimse_timeout = node.dimse_timeout_s
        self.ae.network_timeout = node.network_timeout_s
        self.ae.add_supported_context(sc.Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self.server = None

    def start(self):
        """Start listening (non-blocking); returns pynetdicom's server."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_c_store), (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        node = self.config.node
        self.server = self.ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def open_associations(self) -> list[AssociationStats]:
        with self._lock:
            return list(self._stats.values())

    # --- association level -----------------------------------------------------------------------

    def _on_conn_open(self, event) -> None:
        """Nagle off: otherwise each C-STORE-RSP can wait for the peer's delayed ACK (~40 ms).

        And a read timeout: an accepted socket blocks forever by default, and
        pynetdicom reads a whole PDU in one blocking call, so a peer that
        announces a PDU length and stops sending would hold its thread (and an
        association slot) until it hangs up; ARTIM cannot interrupt a read.
        """
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.config.node.network_timeout_s)

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = request.calling_ae_title.strip()
        called = request.called_ae_title.strip()
        host = assoc.requestor.address
        if not calling_ae_allowed(self.config, calling, host):
            log.warning("association rejected: calling AE %r from %s not recognized (called %r)",
                        calling, host, called)
            self._reject(assoc, 0x03)
            self.metrics.associations_rejected.labels(reason="calling AE not recognized").inc()
        elif called != self.config.node.ae_title.strip():
            log.warning("association rejected: called AE %r is not ours (%r); calling AE %r from %s",
                        called, self.config.node.ae_title, calling, host)
            self._reject(assoc, 0x07)
            self.metrics.associations_rejected.labels(reason="called AE not recognized").inc()

    @staticmethod
    def _reject(assoc, reason: int) -> None:
        """A-ASSOCIATE-RJ rejected-permanent by the service user, then wait for the PDU to leave
        before the connection closes (as pynetdicom's own ACSE rejection does)."""
        assoc.acse.send_reject(0x01, 0x01, reason)
        assoc.kill()

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        with self._lock:
            self._stats[id(assoc)] = AssociationStats(
                calling_ae=request.calling_ae_title.strip(), called_ae=request.called_ae_title.strip(),
                peer=f"{assoc.requestor.address}:{assoc.requestor.port}")
        self.metrics.associations_open.inc()

    def _on_released(self, event) -> None:
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            stats.released = True

    def _on_conn_close(self, event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:  # rejected or never negotiated
            return
        duration = time.monotonic() - stats.started
        outcome = "released" if stats.released else "aborted"
        self.metrics.associations_open.dec()
        self.metrics.associations.labels(calling_ae=stats.calling_ae, outcome=outcome).inc()
        for (study, series), count in stats.series.items():
            self.audit.record(AuditEvent("received", calling_ae=stats.calling_ae, host=stats.peer.rpartition(":")[0],
                                         study_instance_uid=study, series_instance_uid=series, instance_count=count,
                                         status=outcome, detail=f"called AE {stats.called_ae}"))
        log.info("association %s calling_ae=%s peer=%s instances=%d bytes=%d failures=%d duration=%.2fs",
                 outcome, stats.calling_ae, stats.peer, stats.instances,
                 stats.bytes, stats.failures, duration)
        self.tracker.association_closed(id(event.assoc), released=stats.released)

    # --- C-STORE ---------------------------------------------------------------------------------

    def _on_c_store(self, event) -> int:
        stats = self._stats.get(id(event.assoc))
        status = self._store(event, stats)
        if stats is not None and status != STATUS_SUCCESS:
            stats.failures += 1
        return status

    def _store(self, event, stats: AssociationStats | None) -> int:
        calling = stats.calling_ae if stats else ""
        called = stats.called_ae if stats else self.config.node.ae_title
        floor = self.config.node.min_free_disk_mb * 1024 * 1024
        free = self.spool.free_bytes()
        if free < floor:
            log.error("C-STORE refused (0xA700): %d MB free under %s, floor is %d MB; calling AE %s",
                      free // (1024 * 1024), self.spool.root, self.config.node.min_free_disk_mb, calling)
            return STATUS_OUT_OF_RESOURCES
        encoded = event.encoded_dataset()
        try:
            header = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            key = InstanceKey.of(header.get("StudyInstanceUID"), header.get("SeriesInstanceUID"),
                                 header.get("SOPInstanceUID"))
        except InvalidUID as error:
            log.error("C-STORE refused (0xC000) from %s: %s", calling, error)
            return STATUS_CANNOT_UNDERSTAND
        except Exception as error:  # a dataset pydicom cannot parse cannot be placed in the spool
            log.error("C-STORE refused (0xC000) from %s: unreadable dataset (%s)", calling, error)
            return STATUS_CANNOT_UNDERSTAND
        existing = self.journal.find_instance(key.sop_instance_uid)
        if existing is not None:
            log.info("duplicate instance %s (series %s) from %s acknowledged, not stored again",
                     key.sop_instance_uid, key.series_instance_uid, calling)
            return STATUS_SUCCESS
        try:
            path = self.spool.write(key, (encoded,))
        except OSError as error:
            log.error("C-STORE refused (0xA700): writing %s failed: %s", key.sop_instance_uid, error)
            return STATUS_OUT_OF_RESOURCES
        new = NewInstance(
            sop_instance_uid=key.sop_instance_uid, sop_class_uid=str(event.request.AffectedSOPClassUID),
            series_instance_uid=key.series_instance_uid, study_instance_uid=key.study_instance_uid,
            path=str(path), calling_ae=calling, called_ae=called, transfer_syntax=str(event.context.transfer_syntax),
            size=len(encoded), modality=str(header.get("Modality", "") or ""),
            series_description=str(header.get("SeriesDescription", "") or ""))
        try:
            record, is_new = self.journal.record_instance(new)
        except Exception as error:
            log.error("C-STORE refused (0xA700): journaling %s failed: %s", key.sop_instance_uid, error)
            path.unlink(missing_ok=True)
            return STATUS_OUT_OF_RESOURCES
        if not is_new:
            log.info("duplicate instance %s (series %s) from %s acknowledged, counted once",
                     key.sop_instance_uid, key.series_instance_uid, calling)
            return STATUS_SUCCESS
        if stats is not None:
            stats.instances += 1
            stats.bytes += len(encoded)
            stats.series[(key.study_instance_uid, key.series_instance_uid)] += 1
        self.metrics.instances_received.labels(calling_ae=calling).inc()
        self.metrics.bytes_received.labels(calling_ae=calling).inc(len(encoded))
        self.tracker.instance_received(id(event.assoc), record.series_instance_uid, record.generation)
        return STATUS_SUCCESS
