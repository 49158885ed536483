"""The node's front door: a Storage SCP (C-ECHO, C-STORE) with an AE allow-list and limits.

The wire protocol is upper_layer.Acceptor's; this module is the policy.
Durability contract: C-STORE success (0x0000) is sent only after the bytes
as received (never decoded and re-encoded) are in the spool, fsynced and
linked to their final name, and the instance row is committed in the journal. Failures to
persist answer 0xA700 (PS3.4 B.2.3 "Refused: Out of Resources"); a dataset
whose UIDs cannot name a spool path answers 0xC000 ("Cannot understand"); one
whose SOP Instance UID (or SOP Class UID, when it has one) is not the one the
C-STORE request names answers 0xA900 ("Data Set does not match SOP Class"),
as dcmtk's storescp does: the sender's records would otherwise say one
instance was stored while the node holds another.
An instance already in the spool (a re-send), or whose SOP Instance UID is
journaled under other study/series UIDs, is acknowledged with success, logged,
and neither kept twice nor counted again: the first copy stays (PS3.4 B.4.1
leaves duplicate handling to the SCP; success lets the sender's retry finish
instead of looping). It still counts as activity of its series
(`dicom_node.pipeline.complete`), so a re-send is one sending episode. When its content differs from the stored copy, the new
copy goes to the quarantine, with both digests in its note, the log, the audit
and a metric (dicom_node.receive.duplicate).

Every standard storage SOP class is accepted in every network transfer syntax
(dicom_node.sop_classes), narrowed by `node.sop_classes`; each presentation
context refused is logged once per association and abstract syntax, and
counted.

Association policy (PS3.8 7.1.1.9): an unknown calling AE title (or one
calling from a host it is not allowed from) gets A-ASSOCIATE-RJ rejected
permanent / service user / "calling AE title not recognized" (1, 1, 3); a
called AE title other than ours gets reason 7 "called AE title not
recognized"; one association over `node.max_associations` is rejected
transient / local limit exceeded (2, 3, 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pynetdicom import sop_class as sc
from pynetdicom.presentation import build_context
from pydicom import uid as tsuid

from dicom_node import sop_classes

from dicom_node.receive import duplicate

from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.config import Config
from dicom_node.receive.header import HeaderError, InstanceHeader, read_header
from dicom_node.store.journal import InstanceRecord, Journal, NewInstance
from dicom_node.metrics import NodeMetrics
from dicom_node.store.spool import InstanceKey, InvalidUID, QuarantinedFile, Spool, part10_header
from dicom_node.tls import server_context
from dicom_node.receive.upper_layer import (CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED,
                                    IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Acceptor,
                                    AcceptorSettings, Association, AssociationRequest, RefusedContext, Rejection,
                                    StoreRequest)

log = logging.getLogger("dicom_node.receive.scp")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATA_SET_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

VERIFICATION_SYNTAXES = (tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian)


@dataclass
class AssociationStats:
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    series: Counter[tuple[str, str]] = field(default_factory=Counter)  # (study, series) UIDs -> instances stored


def calling_ae_allowed(config: Config, request: AssociationRequest) -> bool:
    """An allow-list entry with a `host` admits its AE from that address only; one with a `tls_subject`
    only over DICOM TLS from a certificate of that common name, so a certificate of the hospital's CA
    cannot call as another device's AE title."""
    security = config.security
    if security.allow_any_calling_ae:
        return True
    return any(entry.ae_title.strip() == request.calling_ae and entry.host in (None, request.host)
               and entry.tls_subject in (None, request.certificate_subject) for entry in security.calling_aes)


class Receiver:
    """The association handler behind the node's acceptor; `start()` binds the port."""

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
        contexts = [build_context(sc.Verification, list(VERIFICATION_SYNTAXES))]
        accepted = sop_classes.accepted_classes(node.sop_classes.allow, node.sop_classes.deny)
        contexts += [build_context(uid, list(sop_classes.TRANSFER_SYNTAXES)) for uid in accepted]
        tls_context = None if node.tls is None else server_context(
            node.tls.certificate, node.tls.private_key, node.tls.ca_certificates, node.tls.require_client_certificate)
        self.acceptor = Acceptor(AcceptorSettings(
            ae_title=node.ae_title, host=node.host, port=node.port, max_pdu=node.max_pdu,
            max_associations=node.max_associations, acse_timeout_s=node.acse_timeout_s,
            dimse_timeout_s=node.dimse_timeout_s, network_timeout_s=node.network_timeout_s, contexts=contexts,
            tls_port=None if node.tls is None else node.tls.port, tls_context=tls_context), self)

    def start(self) -> None:
        """Start listening (non-blocking)."""
        self.acceptor.start()
        node = self.config.node
        tls_note = "" if node.tls is None else f", DICOM TLS on port {node.tls.port}"
        log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port, tls_note)

    def stop(self) -> None:
        self.acceptor.stop()

    def listening(self) -> bool:
        return self.acceptor.listening()

    def open_associations(self) -> list[AssociationStats]:
        with self._lock:
            return list(self._stats.values())

    # --- association level -----------------------------------------------------------------------

    def requested(self, request: AssociationRequest) -> Rejection | None:
        if not calling_ae_allowed(self.config, request):
            certificate = ("" if request.certificate_subject is None
                           else f" with certificate {request.certificate_subject!r}")
            log.warning("association rejected: calling AE %r from %s%s not recognized (called %r)",
                        request.calling_ae, request.host, certificate, request.called_ae)
            self.metrics.associations_rejected.labels(reason="calling AE not recognized").inc()
            return CALLING_AE_NOT_RECOGNIZED
        if request.called_ae != self.config.node.ae_title.strip():
            log.warning("association rejected: called AE %r is not ours (%r); calling AE %r from %s",
                        request.called_ae, self.config.node.ae_title, request.calling_ae, request.host)
            self.metrics.associations_rejected.labels(reason="called AE not recognized").inc()
            return CALLED_AE_NOT_RECOGNIZED
        return None

    def accepted(self, association: Association) -> None:
        with self._lock:
            self._stats[association.id] = AssociationStats(
                calling_ae=association.calling_ae, called_ae=association.called_ae,
                peer=f"{association.host}:{association.port}")
        self.metrics.associations_open.inc()
        self._log_refused(association)

    def _log_refused(self, association: Association) -> None:
        """One line and one count per refused abstract syntax: a sender proposing a class in several
        contexts (one per transfer syntax, as storescu does) is told once, with every syntax it offered."""
        by_class: dict[str, list[RefusedContext]] = {}
        for refused in association.refused:
            by_class.setdefault(refused.abstract_syntax, []).append(refused)
        for uid, refusals in by_class.items():
            label, reason = self._refusal_reason(uid, {r.result for r in refusals})
            offered = list(dict.fromkeys(ts for r in refusals for ts in r.transfer_syntaxes))
            log.warning("presentation context refused: calling AE %s from %s:%d proposed %s (%s) with transfer "
                        "syntaxes [%s]: %s", association.calling_ae, association.host, association.port,
                        sop_classes.name(uid), uid, ", ".join(f"{sop_classes.name(ts)} ({ts})" for ts in offered),
                        reason)
            self.metrics.contexts_refused.labels(calling_ae=association.calling_ae, reason=label).inc()

    def _refusal_reason(self, uid: str, results: set[int]) -> tuple[str, str]:
        """(metric label, log text) of why the node refused every context proposing `uid` (PS3.8 9.3.3.2)."""
        if 0x03 not in results:
            if 0x04 in results:
                return ("transfer syntax not supported", "transfer-syntaxes-not-supported (none of them is a "
                                                         "DICOM network transfer syntax the node knows)")
            return "rejected", f"rejected (result {sorted(results)}: user rejection or no reason given)"
        allow, deny = self.config.node.sop_classes.allow, self.config.node.sop_classes.deny
        if uid in deny:
            return "denied", "abstract-syntax-not-supported (denied by node.sop_classes.deny)"
        if allow is not None and uid not in allow:
            return "not allowed", "abstract-syntax-not-supported (not in node.sop_classes.allow)"
        if uid.startswith(sop_classes.DICOM_ROOT):
            return ("not a storage class",
                    "abstract-syntax-not-supported (not a storage SOP class: the node is a Storage SCP)")
        return ("private class", "abstract-syntax-not-supported (a private SOP class; node.sop_classes.allow "
                                 "accepts one by UID)")

    def closed(self, association: Association, released: bool) -> None:
        with self._lock:
            stats = self._stats.pop(association.id, None)
        if stats is None:
            return
        duration = time.monotonic() - stats.started
        outcome = "released" if released else "aborted"
        self.metrics.associations_open.dec()
        self.metrics.associations.labels(calling_ae=stats.calling_ae, outcome=outcome).inc()
        for (study, series), count in stats.series.items():
            self.audit.record(AuditEvent("received", calling_ae=stats.calling_ae, host=association.host,
                                         study_instance_uid=study, series_instance_uid=series, instance_count=count,
                                         status=outcome, detail=f"called AE {stats.called_ae}"))
        log.info("association %s calling_ae=%s peer=%s instances=%d bytes=%d failures=%d duration=%.2fs",
                 outcome, stats.calling_ae, stats.peer, stats.instances,
                 stats.bytes, stats.failures, duration)
        self.tracker.association_closed(association.id, released=released)

    # --- C-STORE ---------------------------------------------------------------------------------

    def store(self, request: StoreRequest) -> int:
        stats = self._stats.get(request.association.id)
        status = self._store(request, stats)
        if stats is not None and status != STATUS_SUCCESS:
            stats.failures += 1
        return status

    def _store(self, request: StoreRequest, stats: AssociationStats | None) -> int:
        calling = request.association.calling_ae
        floor = self.config.node.min_free_disk_mb * 1024 * 1024
        free = self.spool.free_bytes()
        if free < floor:
            log.error("C-STORE refused (0xA700): %d MB free under %s, floor is %d MB; calling AE %s",
                      free // (1024 * 1024), self.spool.root, self.config.node.min_free_disk_mb, calling)
            return STATUS_OUT_OF_RESOURCES
        try:
            header = read_header(request.data_set, request.transfer_syntax)
            key = InstanceKey.of(header.study_instance_uid or None, header.series_instance_uid or None,
                                 header.sop_instance_uid or None)
        except InvalidUID as error:
            log.error("C-STORE refused (0xC000) from %s: %s", calling, error)
            return STATUS_CANNOT_UNDERSTAND
        except HeaderError as error:  # a data set whose UIDs cannot be found cannot be placed in the spool
            log.error("C-STORE refused (0xC000) from %s: unreadable dataset (%s)", calling, error)
            return STATUS_CANNOT_UNDERSTAND
        mismatch = _request_mismatch(request, header)
        if mismatch:
            log.error("C-STORE refused (0xA900) from %s: %s", calling, mismatch)
            return STATUS_DATA_SET_DOES_NOT_MATCH
        meta = part10_header(request.affected_sop_class_uid, key.sop_instance_uid, request.transfer_syntax,
                             IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, self.config.node.ae_title,
                             calling)
        with self.spool.series_lock(key.series_instance_uid):
            return self._persist(request, stats, key, header, meta)

    def _persist(self, request: StoreRequest, stats: AssociationStats | None, key: InstanceKey,
                 header: InstanceHeader, meta: bytes) -> int:
        """Spool file, then journal row (or, for a re-send, a note on the series that holds it)."""
        calling = request.association.calling_ae
        try:
            path = self.spool.write(key, (meta, request.data_set))
        except OSError as error:
            log.error("C-STORE refused (0xA700): writing %s failed: %s", key.sop_instance_uid, error)
            return STATUS_OUT_OF_RESOURCES
        size = len(meta) + len(request.data_set)
        if path is None:  # the instance's file is already in the spool
            try:
                existing = self.journal.find_instance(key.sop_instance_uid)
            except Exception as error:
                log.error("C-STORE refused (0xA700): journaling %s failed: %s", key.sop_instance_uid, error)
                return STATUS_OUT_OF_RESOURCES
            return self._duplicate(request, key, meta, self.spool.path_for(key), existing)
        try:
            new = NewInstance(
                sop_instance_uid=key.sop_instance_uid, sop_class_uid=request.affected_sop_class_uid,
                series_instance_uid=key.series_instance_uid, study_instance_uid=key.study_instance_uid,
                path=str(path), calling_ae=calling, called_ae=request.association.called_ae,
                transfer_syntax=request.transfer_syntax, size=size, modality=header.modality,
                series_description=header.series_description)
            record, is_new = self.journal.record_instance(new)
        except Exception as error:
            log.error("C-STORE refused (0xA700): journaling %s failed: %s", key.sop_instance_uid, error)
            path.unlink(missing_ok=True)
            return STATUS_OUT_OF_RESOURCES
        if not is_new:
            if record.path == str(path):  # its journaled file had gone missing: this copy takes its place
                log.warning("instance %s from %s re-stored: its journaled file was missing", key.sop_instance_uid,
                            calling)
                return STATUS_SUCCESS
            # The SOP Instance UID is journaled under other study/series UIDs: that copy stays.
            path.unlink(missing_ok=True)
            return self._duplicate(request, key, meta, Path(record.path), record)
        if stats is not None:
            stats.instances += 1
            stats.bytes += size
            stats.series[(key.study_instance_uid, key.series_instance_uid)] += 1
        self.metrics.instances_received.labels(calling_ae=calling).inc()
        self.metrics.bytes_received.labels(calling_ae=calling).inc(size)
        self.tracker.instance_received(request.association.id, record.series_instance_uid, record.generation)
        return STATUS_SUCCESS

    def _resent(self, request: StoreRequest, existing: InstanceRecord) -> None:
        """A re-sent copy is activity of the series generation that holds the instance, both for the
        stable timeout and for the release fast path of the association re-sending it."""
        self.journal.note_duplicate(existing)
        self.tracker.instance_received(request.association.id, existing.series_instance_uid, existing.generation)

    def _duplicate(self, request: StoreRequest, key: InstanceKey, meta: bytes, stored: Path,
                   record: InstanceRecord | None) -> int:
        """A SOP Instance UID the node holds (at `stored`): a re-send is acknowledged and counted once;
        another payload is acknowledged too, but kept in the quarantine, logged, audited and counted
        (dicom_node.receive.duplicate)."""
        calling, host = request.association.calling_ae, request.association.host
        series_uid = record.series_instance_uid if record is not None else key.series_instance_uid
        try:
            if record is not None:
                self._resent(request, record)
            found = duplicate.conflict(stored, meta, request.data_set)
            if found is None:
                log.info("duplicate instance %s (series %s) from %s acknowledged, stored and counted once",
                         key.sop_instance_uid, series_uid, calling)
                return STATUS_SUCCESS
            reason = (f"another payload under SOP Instance UID {key.sop_instance_uid}, already stored in series "
                      f"{series_uid} as {stored.name}: sha256 of the stored data set {found.stored_sha256}, of "
                      f"this one {found.received_sha256} ({sop_classes.name(request.transfer_syntax)}), sent by "
                      f"{calling} from {host}; the stored copy stays in the spool")
            kept = self.spool.keep_in_quarantine(f"{key.sop_instance_uid}.dcm", (meta, request.data_set), reason)
            try:
                self.audit.record(AuditEvent("quarantined", calling_ae=calling, host=host,
                                             study_instance_uid=key.study_instance_uid,
                                             series_instance_uid=series_uid, instance_count=1,
                                             status="conflicting duplicate", detail=f"{reason}; kept as {kept}"))
            except Exception:
                self.spool.remove_quarantined(QuarantinedFile(kept, datetime.now(timezone.utc)))
                raise
        except Exception as error:
            log.error("C-STORE refused (0xA700): keeping the re-sent %s failed: %s", key.sop_instance_uid, error)
            return STATUS_OUT_OF_RESOURCES
        log.warning("conflicting duplicate acknowledged and quarantined as %s: %s", kept, reason)
        self.metrics.conflicting_duplicates.labels(calling_ae=calling).inc()
        return STATUS_SUCCESS


def _request_mismatch(request: StoreRequest, header: InstanceHeader) -> str | None:
    """Why the data set is not the instance the C-STORE request names, or None when it is."""
    if request.affected_sop_instance_uid != header.sop_instance_uid:
        return (f"the request's Affected SOP Instance UID {request.affected_sop_instance_uid!r} is not the data set's "
                f"SOP Instance UID {header.sop_instance_uid!r}")
    if header.sop_class_uid and request.affected_sop_class_uid != header.sop_class_uid:
        return (f"the request's Affected SOP Class UID {request.affected_sop_class_uid!r} is not the data set's "
                f"SOP Class UID {header.sop_class_uid!r} (instance {header.sop_instance_uid})")
    return None
