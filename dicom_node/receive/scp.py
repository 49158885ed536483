"""The node's front door: a Storage SCP (C-ECHO, C-STORE) with an AE allow-list and limits.

The wire protocol is upper_layer.Acceptor's; this module is the policy.
Each C-STORE goes through the store path every transport shares
(dicom_node.receive.ingest: durability, statuses, duplicates); its status is
the C-STORE response's.

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

from pynetdicom import sop_class as sc
from pynetdicom.presentation import build_context
from pydicom import uid as tsuid

from dicom_node import sop_classes
from dicom_node.config import Config
from dicom_node.metrics import NodeMetrics
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.receive.ingest import Delivery, Ingest
from dicom_node.receive.upper_layer import (CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED, Acceptor,
                                            AcceptorSettings, Association, AssociationRequest, RefusedContext,
                                            Rejection, StoreRequest)
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import Journal
from dicom_node.store.spool import Spool
from dicom_node.tls import server_context

log = logging.getLogger("dicom_node.receive.scp")

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
        self.ingest = Ingest(config, spool, journal, tracker, self.metrics, self.audit)
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
                                         status=outcome, detail=f"over DIMSE (C-STORE), called AE {stats.called_ae}"))
        log.info("association %s calling_ae=%s peer=%s instances=%d bytes=%d failures=%d duration=%.2fs",
                 outcome, stats.calling_ae, stats.peer, stats.instances,
                 stats.bytes, stats.failures, duration)
        self.tracker.association_closed(association.id, released=released)

    # --- C-STORE ---------------------------------------------------------------------------------

    def store(self, request: StoreRequest) -> int:
        association = request.association
        stats = self._stats.get(association.id)
        outcome = self.ingest.store(Delivery(
            "dimse", association.id, association.calling_ae, association.called_ae, association.host,
            request.affected_sop_class_uid, request.affected_sop_instance_uid, request.transfer_syntax,
            request.data_set))
        if stats is not None:
            if not outcome.stored:
                stats.failures += 1
            elif outcome.new:
                stats.instances += 1
                stats.bytes += outcome.size
                stats.series[(outcome.key.study_instance_uid, outcome.key.series_instance_uid)] += 1
        return outcome.status
