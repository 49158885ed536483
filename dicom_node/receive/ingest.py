"""The store path every transport shares: one instance in, spool file and journal row out.

C-STORE (dicom_node.receive.scp) and STOW-RS (dicom_node.receive.stow) hand
each instance over as a `Delivery`; `Ingest.store` answers the status the
transport reports to its sender. Success (0x0000) is answered only after the
bytes as received (never decoded and re-encoded) are in the spool, fsynced and
linked to their final name, and the instance row is committed in the journal.
The statuses are PS3.4 B.2.3's, which PS3.18 10.5.3 reuses for STOW-RS
Failure Reasons: 0xA700 "Refused: Out of Resources" (disk under the floor, a
write or journal failure), 0xC000 "Cannot understand" (UIDs that cannot name a
spool path, an unreadable data set), 0xA900 "Data Set does not match SOP
Class" (the data set is not the instance the request names).

An instance already in the spool (a re-send), or whose SOP Instance UID is
journaled under other study/series UIDs, is acknowledged with success, logged,
and neither kept twice nor counted again: the first copy stays (PS3.4 B.4.1
leaves duplicate handling to the SCP; success lets the sender's retry finish
instead of looping). It still counts as activity of its series
(`dicom_node.pipeline.complete`), so a re-send is one sending episode. When its
content differs from the stored copy, the new copy goes to the quarantine, with
both digests in its note, the log, the audit and a metric
(dicom_node.receive.duplicate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from dicom_node import sop_classes
from dicom_node.config import Config
from dicom_node.metrics import NodeMetrics
from dicom_node.pipeline.complete import CompletionTracker, SessionId
from dicom_node.receive import duplicate
from dicom_node.receive.durable import DurableWrites
from dicom_node.receive.header import HeaderError, InstanceHeader, read_header
from dicom_node.receive.upper_layer import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.journal import InstanceRecord, Journal, NewInstance
from dicom_node.store.spool import InstanceKey, InvalidUID, QuarantinedFile, Spool, part10_header

log = logging.getLogger("dicom_node.receive.ingest")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATA_SET_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

Transport = Literal["dimse", "stow"]
TRANSPORT_VERB: dict[str, str] = {"dimse": "C-STORE", "stow": "STOW-RS"}


@dataclass(frozen=True)
class Delivery:
    """One instance as a transport received it.

    `session` names the sending episode in the completion tracker (an association's id, or a STOW-RS
    request's); `sop_class_uid` and `sop_instance_uid` are what the request says it carries (the C-STORE
    command's Affected SOP Class/Instance UID, the STOW part's Media Storage SOP Class/Instance UID);
    `calling_ae` is the sender's name: the calling AE title, or the name of the STOW sender's token."""

    transport: Transport
    session: SessionId
    calling_ae: str
    called_ae: str
    host: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_set: bytes | memoryview  # C-STORE's: the association's receive buffer, valid during `store`

    @property
    def verb(self) -> str:
        return TRANSPORT_VERB[self.transport]


@dataclass(frozen=True)
class Outcome:
    """What `Ingest.store` made of a delivery: the status to answer; `key` when the UIDs could be read;
    `new` and `size` when a new instance was stored (a duplicate is acknowledged but not counted)."""

    status: int
    key: InstanceKey | None = None
    new: bool = False
    size: int = 0
    reason: str = ""  # why it failed, for the log and a sender that can carry text

    @property
    def stored(self) -> bool:
        return self.status == STATUS_SUCCESS


class Ingest:
    """The spool, journal, duplicate, quarantine, metric and completion steps of storing one instance."""

    def __init__(self, config: Config, spool: Spool, journal: Journal, tracker: CompletionTracker,
                 metrics: NodeMetrics, audit: AuditLog):
        self.config = config
        self.spool = spool
        self.journal = journal
        self.tracker = tracker
        self.metrics = metrics
        self.audit = audit
        self.durable = DurableWrites(spool, journal)
        # Told of each new instance once it is stored and journaled, before its success is answered
        # (dicom_node.pipeline.prepare queues it for decoding): must never block.
        self.on_stored: Callable[[InstanceRecord], None] = lambda record: None

    def store(self, delivery: Delivery, header: InstanceHeader | None = None) -> Outcome:
        """Store one instance (`header`: already read by the transport, else read here)."""
        floor = self.config.node.min_free_disk_mb * 1024 * 1024
        free = self.spool.free_bytes()
        if free < floor:
            return self._refused(delivery, STATUS_OUT_OF_RESOURCES, None,
                                 f"{free // (1024 * 1024)} MB free under {self.spool.root}, floor is "
                                 f"{self.config.node.min_free_disk_mb} MB")
        try:
            header = header or read_header(delivery.data_set, delivery.transfer_syntax)
            key = InstanceKey.of(header.study_instance_uid or None, header.series_instance_uid or None,
                                 header.sop_instance_uid or None)
        except InvalidUID as error:
            return self._refused(delivery, STATUS_CANNOT_UNDERSTAND, None, str(error))
        except HeaderError as error:  # a data set whose UIDs cannot be found cannot be placed in the spool
            return self._refused(delivery, STATUS_CANNOT_UNDERSTAND, None,
                                 f"unreadable dataset ({error})")
        mismatch = request_mismatch(delivery, header)
        if mismatch:
            return self._refused(delivery, STATUS_DATA_SET_DOES_NOT_MATCH, key,
                                 mismatch)
        meta = part10_header(delivery.sop_class_uid, key.sop_instance_uid, delivery.transfer_syntax,
                             IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, self.config.node.ae_title,
                             delivery.calling_ae)
        with self.spool.receiving(key):
            return self._persist(delivery, key, header, meta)

    def _refused(self, delivery: Delivery, status: int, key: InstanceKey | None, reason: str) -> Outcome:
        log.error("%s refused (0x%04X) from %s: %s", delivery.verb, status, delivery.calling_ae, reason)
        return Outcome(status, key, reason=reason)

    def _persist(self, delivery: Delivery, key: InstanceKey, header: InstanceHeader, meta: bytes) -> Outcome:
        """Spool file and journal row side by side (or, for a re-send, a note on the series that holds it).

        The file's fsyncs (content, then its name once linked) run beside the journal commit, together with
        those of the instances received at the same time (`DurableWrites`): both are waits on the disk, and
        the answer waits for both. A crash between them leaves a row without a file, which
        restart reconciliation deletes, or a file without a row, which it journals; the sender was answered
        neither. The file's content is on disk before it has its name, so a name never shows a torn file."""
        try:
            staged = self.spool.stage(key, (meta, delivery.data_set))
        except OSError as error:
            return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                 f"writing {key.sop_instance_uid} failed: {error}")
        if staged is None:  # the instance's file is already in the spool: a re-send
            try:
                existing = self.journal.find_instance(key.sop_instance_uid)
            except Exception as error:
                return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                     f"journaling {key.sop_instance_uid} failed: {error}")
            return self._duplicate(delivery, key, meta, self.spool.path_for(key), existing)
        final = staged.final
        size = len(meta) + len(delivery.data_set)
        written = self.durable.write(staged, NewInstance(
            sop_instance_uid=key.sop_instance_uid, sop_class_uid=delivery.sop_class_uid,
            series_instance_uid=key.series_instance_uid, study_instance_uid=key.study_instance_uid,
            path=str(final), calling_ae=delivery.calling_ae, called_ae=delivery.called_ae,
            transfer_syntax=delivery.transfer_syntax, size=size, modality=header.modality,
            series_description=header.series_description, patient_id=header.patient_id,
            accession_number=header.accession_number, study_date=header.study_date))
        if written.row is None:
            if written.path is not None:
                final.unlink(missing_ok=True)
            return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                 f"journaling {key.sop_instance_uid} failed: {written.row_error}")
        record, is_new = written.row
        if written.file_error is not None:
            if is_new:
                self._forget(record)
            return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                 f"writing {key.sop_instance_uid} failed: {written.file_error}")
        path = written.path
        if not is_new:
            if record.path == str(final):  # its journaled file had gone missing: this copy takes its place
                try:
                    held = self.journal.note_duplicate(record)
                except Exception as error:
                    return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                         f"journaling {key.sop_instance_uid} failed: {error}")
                if not held:  # retention deleted the file and is deleting the rest: this copy would go too
                    final.unlink(missing_ok=True)
                    return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key, _being_purged(record))
                log.warning("instance %s from %s re-stored: its journaled file was missing", key.sop_instance_uid,
                            delivery.calling_ae)
                return Outcome(STATUS_SUCCESS, key)
            # The SOP Instance UID is journaled under other study/series UIDs: that copy stays.
            if path is not None:
                final.unlink(missing_ok=True)
            return self._duplicate(delivery, key, meta, Path(record.path), record)
        if path is None:
            # Another node sharing the spool linked the same instance between the check above and the link:
            # its file is the stored copy and this row stands for it (that node finds the row, a duplicate).
            log.info("instance %s from %s was stored by another node at the same time; journaled once",
                     key.sop_instance_uid, delivery.calling_ae)
        labels = {"calling_ae": delivery.calling_ae, "transport": delivery.transport}
        self.metrics.instances_received.labels(**labels).inc()
        self.metrics.bytes_received.labels(**labels).inc(size)
        self.tracker.instance_received(delivery.session, record.series_instance_uid, record.generation)
        self.on_stored(record)
        return Outcome(STATUS_SUCCESS, key, new=True, size=size)

    def _forget(self, record: InstanceRecord) -> None:
        """Take back the row of an instance whose file could not be made durable: its sender is refused and
        will send it again. If the journal fails too, restart reconciliation deletes the row without a file."""
        try:
            self.journal.delete_instance(record.sop_instance_uid)
        except Exception as error:
            log.error("the row of %s stays until restart (its file was not stored): %s", record.sop_instance_uid,
                      error)

    def _duplicate(self, delivery: Delivery, key: InstanceKey, meta: bytes, stored: Path,
                   record: InstanceRecord | None) -> Outcome:
        """A SOP Instance UID the node holds (at `stored`): a re-send is acknowledged and counted once;
        another payload is acknowledged too, but kept in the quarantine, logged, audited and counted
        (dicom_node.receive.duplicate)."""
        calling, host = delivery.calling_ae, delivery.host
        series_uid = record.series_instance_uid if record is not None else key.series_instance_uid
        try:
            if record is not None:
                # A re-sent copy is activity of the series generation that holds the instance, both for the
                # stable timeout and for the release fast path of the session re-sending it.
                if not self.journal.note_duplicate(record):
                    return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key, _being_purged(record))
                self.tracker.instance_received(delivery.session, record.series_instance_uid, record.generation)
            found = duplicate.conflict(stored, meta, delivery.data_set)
            if found is None:
                log.info("duplicate instance %s (series %s) from %s acknowledged, stored and counted once",
                         key.sop_instance_uid, series_uid, calling)
                return Outcome(STATUS_SUCCESS, key)
            reason = (f"another payload under SOP Instance UID {key.sop_instance_uid}, already stored in series "
                      f"{series_uid} as {stored.name}: sha256 of the stored data set {found.stored_sha256}, of "
                      f"this one {found.received_sha256} ({sop_classes.name(delivery.transfer_syntax)}), sent by "
                      f"{calling} from {host} over {delivery.verb}; the stored copy stays in the spool")
            kept = self.spool.keep_in_quarantine(f"{key.sop_instance_uid}.dcm", (meta, delivery.data_set), reason)
            try:
                self.audit.record(AuditEvent("quarantined", calling_ae=calling, host=host,
                                             study_instance_uid=key.study_instance_uid,
                                             series_instance_uid=series_uid, instance_count=1,
                                             status="conflicting duplicate", detail=f"{reason}; kept as {kept}"))
            except Exception:
                self.spool.remove_quarantined(QuarantinedFile(kept, datetime.now(timezone.utc)))
                raise
        except Exception as error:
            return self._refused(delivery, STATUS_OUT_OF_RESOURCES, key,
                                 f"keeping the re-sent {key.sop_instance_uid} failed: {error}")
        log.warning("conflicting duplicate acknowledged and quarantined as %s: %s", kept, reason)
        self.metrics.conflicting_duplicates.labels(calling_ae=calling).inc()
        return Outcome(STATUS_SUCCESS, key)


def _being_purged(record: InstanceRecord) -> str:
    return (f"{record.sop_instance_uid} is held by generation {record.generation} of series "
            f"{record.series_instance_uid}, which retention is deleting now: send it again in a minute, "
            f"and it is stored anew")


def request_mismatch(delivery: Delivery, header: InstanceHeader) -> str | None:
    """Why the data set is not the instance the request names, or None when it is (as dcmtk's storescp
    checks: the sender's records would otherwise say one instance was stored while the node holds another)."""
    if delivery.sop_instance_uid != header.sop_instance_uid:
        return (f"the request's Affected SOP Instance UID {delivery.sop_instance_uid!r} is not the data set's "
                f"SOP Instance UID {header.sop_instance_uid!r}")
    if header.sop_class_uid and delivery.sop_class_uid != header.sop_class_uid:
        return (f"the request's Affected SOP Class UID {delivery.sop_class_uid!r} is not the data set's "
                f"SOP Class UID {header.sop_class_uid!r} (instance {header.sop_instance_uid})")
    return None
