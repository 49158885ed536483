"""`dicom-node serve`: journal, restart reconciliation, completion scheduler, pipeline, Storage SCP, HTTP API,
retention.

Start-up order matters for "nothing acknowledged is ever lost": the journal
is reconciled with the spool before the port opens, so a crash at any point
of a C-STORE (temp file written, linked, row committed) is repaired first.

Shutdown on SIGTERM (or SIGINT) runs in the reverse order: the DICOM port
closes first (no new associations; open ones are ended; new STOW-RS requests
are answered 503), then completion stops,
then the pipeline lets running jobs finish while queued jobs stay `queued` in
the journal for the next start, the HTTP API stops, and the SQLite WAL is
checkpointed into the database file before it is closed. The exit code is 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from io import BytesIO
from pathlib import Path

import pydicom

from dicom_node import logs
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.config import Config
from dicom_node.pipeline.health import pipeline_health
from dicom_node.store.journal import Journal, NewInstance, utcnow
from dicom_node.metrics import JournalCollector, NodeMetrics, PipelineHealthCollector
from dicom_node.pipeline.stage import Pipeline
from dicom_node.receive.scp import Receiver
from dicom_node.receive.stow import StowReceiver
from dicom_node.store.retention import Retention
from dicom_node.ops.status import journal_counts
from dicom_node.store.spool import InstanceKey, Spool
from dicom_node.states import SeriesState

log = logging.getLogger("dicom_node.ops.server")


def reconcile(spool: Spool, journal: Journal) -> None:
    """Make journal and spool agree after a crash (PS-independent; the node's own invariant).

    - temp files (a write that never reached its rename) are deleted: never acknowledged;
    - a file without a row (linked, crash before commit) is journaled from its header;
    - a row without a file (file removed behind our back) is deleted and logged, unless its series
      is being purged (retention's next sweep finishes that purge).
    """
    for path in spool.remove_temp_files():
        log.info("reconcile: removed temp file %s", path)
    journaled = {record.path: record for record in journal.all_instances()}
    on_disk = {str(path) for path in spool.instance_files()}
    for path, record in journaled.items():
        if path not in on_disk:
            series = journal.get_series(record.series_instance_uid, record.generation)
            if series is not None and series.state == SeriesState.PURGED:
                continue
            journal.delete_instance(record.sop_instance_uid)
            log.warning("reconcile: instance %s of series %s has no file %s; row deleted",
                        record.sop_instance_uid, record.series_instance_uid, path)
    for path in sorted(on_disk - journaled.keys()):
        try:
            _journal_file(Path(path), journal)
            log.info("reconcile: journaled %s from its header", path)
        except Exception as error:
            target = spool.quarantine(Path(path), f"reconcile could not journal it: {error}")
            log.error("reconcile: %s quarantined to %s: %s", path, target, error)


def _journal_file(path: Path, journal: Journal) -> None:
    data = path.read_bytes()
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    key = InstanceKey.of(ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"))
    if path.name != f"{key.sop_instance_uid}.dcm" or path.parent.name != key.series_instance_uid:
        raise ValueError(f"file name does not match its UIDs ({key})")
    record, is_new = journal.record_instance(NewInstance(
        sop_instance_uid=key.sop_instance_uid, sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=key.series_instance_uid, study_instance_uid=key.study_instance_uid,
        path=str(path), calling_ae="", called_ae="", transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        size=len(data), modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""), patient_id=str(ds.get("PatientID", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""), study_date=str(ds.get("StudyDate", "") or "")))
    if not is_new and record.path != str(path):
        raise ValueError(f"SOP Instance UID {key.sop_instance_uid} is already stored as {record.path}")


def serve(config: Config, log_format: str = "text") -> None:
    """Run the node until SIGTERM or SIGINT; then shut down as the module docstring says."""
    logs.configure(log_format)
    spool = Spool(Path(config.node.storage_dir))
    journal = Journal(config.node.journal_url)
    reconcile(spool, journal)
    metrics = NodeMetrics()
    metrics.describe_destinations({name: destination.kind for name, destination in config.destinations.items()})
    metrics.add_collector(JournalCollector(lambda: journal_counts(journal), spool.free_bytes,
                                           lambda: len(spool.quarantined())))
    pipeline = Pipeline(config, journal, metrics)
    metrics.add_collector(PipelineHealthCollector(lambda: pipeline_health(config, pipeline.inference)))
    pipeline.start()
    tracker = CompletionTracker(journal, config.completion.stable_seconds, config.completion.after_release_seconds,
                                on_series_complete=pipeline.on_series_complete, metrics=metrics)
    tracker.start()
    tracker.hand_over_unrouted(complete_before=utcnow())  # complete, and the node stopped before routing them
    receiver = Receiver(config, spool, journal, tracker, metrics)
    retention = Retention(config.retention, journal, spool, metrics)
    stow = StowReceiver(config, receiver.ingest)
    api = _api_server(config, journal, metrics, receiver, stow, pipeline)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    try:
        api.start()
        receiver.start()
        tracker.port_opened()
        retention.start()
        while not stopping.wait(1.0):
            pass
    finally:
        log.info("shutting down: no new associations or STOW-RS requests")
        stow.stop()
        receiver.stop()
        retention.stop()
        tracker.stop()
        log.info("waiting for running jobs; queued jobs stay queued in the journal")
        pipeline.stop()
        api.stop()
        _checkpoint(journal)
        journal.close()
        log.info("stopped")


def _api_server(config: Config, journal: Journal, metrics: NodeMetrics, receiver: Receiver, stow: StowReceiver,
                pipeline: Pipeline):
    from dicom_node.ops.api import ApiServer, NodeHandles, create_app
    from dicom_node.ops.console import mount_console
    from dicom_node.store.audit import AuditLog
    from dicom_node.ops.status import OpenAssociation

    def associations() -> list[OpenAssociation]:
        return [OpenAssociation(s.calling_ae, s.peer, s.instances, s.bytes) for s in receiver.open_associations()]

    handles = NodeHandles(config=config, journal=journal, metrics=metrics, audit=AuditLog(journal),
                          open_inference=pipeline.inference, associations=associations,
                          dicom_listening=receiver.listening,
                          pick_up_queued=pipeline.pick_up_queued, stow=stow)
    app = create_app(handles)
    mount_console(app, handles)
    return ApiServer(app, config.http.host, config.http.port, config.http.tls)


def _checkpoint(journal: Journal) -> None:
    """Move the WAL's committed pages into the database file, so the file alone is the whole state."""
    if journal.engine.dialect.name != "sqlite":
        return
    try:
        with journal.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as error:  # the WAL is still durable; the next open checkpoints it
        log.warning("journal checkpoint failed: %s", error)
