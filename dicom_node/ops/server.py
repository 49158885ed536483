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

On a PostgreSQL journal the node is a member of a cluster (`dicom_node.store.cluster`):
other nodes may share the journal and the spool, so the reconciliation at
start is not done by every node but by the `reconcile` singleton, every
`cluster.reconcile_interval_s`, and only for what a dead node left: temp files
of nodes without a live heartbeat, and unjournaled files older than a lease.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom

from dicom_node import logs
from dicom_node.store.cluster import RECONCILE, RETENTION, Cluster
from dicom_node.pipeline.complete import CompletionTracker
from dicom_node.config import Config
from dicom_node.pipeline.health import inference_servers, pipeline_health
from dicom_node.store.journal import Journal, NewInstance, utcnow
from dicom_node.metrics import InferenceServerCollector, JournalCollector, NodeMetrics, PipelineHealthCollector
from dicom_node.pipeline.prepare import Preparer, prepared_store
from dicom_node.pipeline.stage import Pipeline
from dicom_node.receive.scp import Receiver
from dicom_node.receive.stow import StowReceiver
from dicom_node.store.retention import Retention
from dicom_node.ops.status import journal_counts
from dicom_node.store.spool import InstanceKey, Spool
from dicom_node.states import SeriesState

log = logging.getLogger("dicom_node.ops.server")


def reconcile(spool: Spool, journal: Journal, live_writers: frozenset[str] | None = None,
              settled_for_s: float = 0) -> None:
    """Make journal and spool agree after a crash (PS-independent; the node's own invariant).

    - temp files (a write that never reached its rename) are deleted: never acknowledged;
    - a file without a row (linked, crash before commit) is journaled from its header;
    - a row without a file (file removed behind our back) is deleted and logged, unless its series
      is being purged (retention's next sweep finishes that purge).

    On a shared spool, the temp files of `live_writers` are being written now, and a file or a row
    younger than `settled_for_s` may be a live node's, with its row or its file a moment away (the
    receiver commits the row beside the file's fsyncs): all are left.
    """
    for path in spool.remove_temp_files(live_writers):
        log.info("reconcile: removed temp file %s", path)
    settled_before = time.time() - settled_for_s
    journaled = {record.path: record for record in journal.all_instances()}
    on_disk = {str(path) for path in spool.instance_files()}
    for path, record in journaled.items():
        if path not in on_disk and (settled_for_s <= 0 or record.received_at.timestamp() <= settled_before):
            series = journal.get_series(record.series_instance_uid, record.generation)
            if series is not None and series.state == SeriesState.PURGED:
                continue
            journal.delete_instance(record.sop_instance_uid)
            log.warning("reconcile: instance %s of series %s has no file %s; row deleted",
                        record.sop_instance_uid, record.series_instance_uid, path)
    for path in sorted(p for p in on_disk - journaled.keys() if settled_for_s <= 0 or _mtime(Path(p)) <= settled_before):
        try:
            _journal_file(Path(path), journal)
            log.info("reconcile: journaled %s from its header", path)
        except Exception as error:
            target = spool.quarantine(Path(path), f"reconcile could not journal it: {error}")
            log.error("reconcile: %s quarantined to %s: %s", path, target, error)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # purged meanwhile
        return float("inf")


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
    Path(config.node.storage_dir).mkdir(parents=True, exist_ok=True)  # the default SQLite journal lives there
    journal = Journal(config.node.journal_url)
    cluster = Cluster(config, journal) if journal.engine.dialect.name == "postgresql" else None
    spool = Spool(Path(config.node.storage_dir), writer_tag=cluster.spool_tag if cluster else "")
    if cluster is None:
        reconcile(spool, journal)
    else:
        cluster.start()
        # This node writes nothing yet: temp files under its own tag are its previous run's, cut off by a
        # crash (a node with a fixed node.name keeps its tag), which reconciliation spares as a live node's.
        for path in spool.remove_temp_files(cluster.live_spool_tags() - {cluster.spool_tag}):
            log.info("removed temp file %s, left by a node that is not writing", path)
        if cluster.runs(RECONCILE):  # before the port opens, as on a single node
            _reconcile_shared(spool, journal, cluster)
        cluster.every(RECONCILE, config.cluster.reconcile_interval_s, lambda: _reconcile_shared(spool, journal, cluster),
                      at_once=False)
    metrics = NodeMetrics()
    metrics.describe_destinations({name: destination.kind for name, destination in config.destinations.items()})
    metrics.add_collector(JournalCollector(lambda: journal_counts(journal), spool.free_bytes,
                                           lambda: len(spool.quarantined())))
    pipeline = Pipeline(config, journal, metrics, leases=cluster.leases if cluster else None)
    metrics.add_collector(PipelineHealthCollector(lambda: pipeline_health(config, pipeline.inference)))
    metrics.add_collector(InferenceServerCollector(lambda: inference_servers(config, pipeline.inference)))
    pipeline.start()
    tracker = CompletionTracker(journal, config.completion.stable_seconds, config.completion.after_release_seconds,
                                on_series_complete=pipeline.on_series_complete, metrics=metrics, cluster=cluster)
    tracker.start()
    if cluster is None:  # complete, and the node stopped before routing them (shared: the singleton's, in a minute)
        tracker.hand_over_unrouted(complete_before=utcnow())
    receiver = Receiver(config, spool, journal, tracker, metrics)
    store = prepared_store(config, cluster.spool_tag) if cluster else prepared_store(config)
    preparer = Preparer(store, int(config.inference.prepare.max_mb * (1 << 20)),
                        config.inference.prepare.max_series) if store is not None else None
    if preparer is not None:
        preparer.start(cluster.live_spool_tags() if cluster else frozenset())
        receiver.ingest.on_stored = preparer.instance_stored
    retention = Retention(config.retention, journal, spool, metrics,
                          runs_here=(lambda: cluster.runs(RETENTION)) if cluster else (lambda: True))
    stow = StowReceiver(config, receiver.ingest)
    api = _api_server(config, journal, metrics, receiver, stow, pipeline, cluster)
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
        if preparer is not None:
            preparer.stop()
        retention.stop()
        tracker.stop()
        log.info("waiting for running jobs; queued jobs stay queued in the journal")
        pipeline.stop()
        if cluster is not None:
            cluster.stop()
        api.stop()
        _checkpoint(journal)
        journal.close()
        log.info("stopped")


def _reconcile_shared(spool: Spool, journal: Journal, cluster: Cluster) -> None:
    """What dead nodes left in the shared spool and journal: their temp files, their files linked but
    not journaled, their rows whose files never came, their recorded senders. Files and rows younger
    than a lease are left while another node is alive: they may be its instance being stored now."""
    live = cluster.live_spool_tags()
    others_writing = bool(live - {cluster.spool_tag})
    reconcile(spool, journal, live_writers=live,
              settled_for_s=cluster.config.lease_seconds if others_writing else 0)
    forgotten = cluster.leases.forget_dead_senders()
    if forgotten:
        log.info("reconcile: forgot %d open associations of nodes that died", forgotten)


def _api_server(config: Config, journal: Journal, metrics: NodeMetrics, receiver: Receiver, stow: StowReceiver,
                pipeline: Pipeline, cluster: Cluster | None):
    from dicom_node.ops.api import ApiServer, NodeHandles, create_app
    from dicom_node.ops.console import mount_console
    from dicom_node.store.audit import AuditLog
    from dicom_node.ops.status import OpenAssociation

    def associations() -> list[OpenAssociation]:
        return [OpenAssociation(s.calling_ae, s.peer, s.instances, s.bytes) for s in receiver.open_associations()]

    handles = NodeHandles(config=config, journal=journal, metrics=metrics, audit=AuditLog(journal),
                          open_inference=pipeline.inference, associations=associations,
                          dicom_listening=receiver.listening,
                          pick_up_queued=pipeline.pick_up_queued, stow=stow, run_in_worker=pipeline.run_infer,
                          cluster=cluster.status if cluster else lambda: None)
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
