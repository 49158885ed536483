"""Three `dicom-node serve` processes sharing one PostgreSQL journal and one spool folder, Orthanc as the PACS.

The nodes (module fixture) are real processes on loopback ports, with short
leases so a node killed with -9 hands its work over within seconds; senders
are dcmtk storescu, one association each; the series are the project's chest
phantoms (the built-in lung segmentation, no model), and what reaches the PACS
is counted in Orthanc.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pydicom
from pydicom.uid import RLELossless
import pytest
from sqlalchemy import select

from dicom_node.store.cluster import COMPLETION, RECONCILE, RETENTION, SINGLETONS, Cluster
from dicom_node.config import Config
from dicom_node.states import JobState
from dicom_node.store.journal import Journal, SeriesRecord, utcnow
from dicom_node.store.schema import series
from dicom_node.store.leases import Leases
from tests.peers import dcmtk, needs, orthanc, peer_env, postgres, wait_for
from tests.phantoms import chest_phantom, write_ct_volume
from tests.series_factory import write_ct_series
from tests.test_completion import open_association
from tests.test_end_to_end import LUNGS
from tests.test_journal import instance as new_instance
from tests.test_orthanc_end_to_end import overrides, study_series
from tests.test_receive import Node

pytestmark = [needs(dcmtk.available() and orthanc.available(), "dcmtk and Orthanc needed (apt-get install dcmtk "
                                                                "orthanc)"), postgres.required()]

NAMES = ("node-a", "node-b", "node-c")
LEASE_S = 4.0
SMALL_CHEST = dict(shape=(24, 96, 128), spacing=(3.0, 3.0, 8.0))  # seconds of lung segmentation, not minutes


class Nodes:
    """The three nodes, their shared journal and spool, and the PACS."""

    def __init__(self, root: Path, journal_url: str, pacs: orthanc.Orthanc):
        self.journal_url = journal_url
        self.pacs = pacs
        self.spool = root / "shared-storage"
        config = overrides(pacs, pipelines={"lungs_ct": LUNGS},
                           completion={"stable_seconds": 10, "after_release_seconds": 2},
                           cluster={"lease_seconds": LEASE_S, "heartbeat_seconds": 0.5, "reconcile_interval_s": 2})
        self.nodes = {name: Node(root / name, node={"name": name, "journal_url": journal_url,
                                                    "storage_dir": str(self.spool)}, **config) for name in NAMES}

    def start(self, name: str) -> Node:
        return self.nodes[name].start()

    def journal(self) -> Journal:
        return Journal(self.journal_url)

    def status(self, name: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.nodes[name].http_port}/v1/status", timeout=10) as reply:
            return json.load(reply)

    def alive(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.process is not None and node.process.alive()]

    def holders(self) -> dict[str, list[str]]:
        """Singleton -> the live nodes that say they run it (/v1/status `cluster.singletons`)."""
        found: dict[str, list[str]] = {singleton: [] for singleton in SINGLETONS}
        for name in self.alive():
            for singleton in self.status(name)["cluster"]["singletons"]:
                found[singleton].append(name)
        return found

    def segs(self, study_instance_uid: str) -> list[str]:
        """The SEG instances Orthanc holds for the study (one per SOP Instance UID)."""
        return [instance for series in study_series(self.pacs, study_instance_uid).get("SEG", [])
                for instance in series["Instances"]]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, postgres_server):
    root = tmp_path_factory.mktemp("scale-out")
    with orthanc.Orthanc(root / "orthanc") as pacs:
        cluster = Nodes(root, postgres_server.new_database(), pacs)
        try:
            for name in NAMES:
                cluster.start(name)
            yield cluster
        finally:  # all at once: each lets its running job finish
            stops = [threading.Thread(target=node.stop) for node in cluster.nodes.values()]
            for stop in stops:
                stop.start()
            for stop in stops:
                stop.join(60)


def chest_series(out_dir: Path, seed: int, compressed: bool = False) -> tuple[list[Path], str, str]:
    """A small chest CT series; `compressed`: RLE Lossless, pixels the nodes' decoders prepare as they arrive."""
    files = write_ct_volume(chest_phantom(seed=seed, **SMALL_CHEST).volume, out_dir)
    for path in files if compressed else ():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def send_concurrently(sends: list[tuple[Node, list[Path]]], extra: tuple[str, ...] = ()) -> list[dcmtk.StoreResult]:
    """One storescu association per (node, files), all at once; `extra`: storescu options."""
    processes = [subprocess.Popen(dcmtk.storescu_args(node.port, files, extra=extra), env=peer_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node, files in sends]
    return [dcmtk.StoreResult(process.wait(timeout=180), process.stdout.read()) for process in processes]


def series_jobs(journal: Journal, series_instance_uid: str):
    return [job for job in journal.jobs_in_state(*JobState) if job.series_instance_uid == series_instance_uid]


def delivered(journal: Journal, series_instance_uid: str) -> bool:
    jobs = series_jobs(journal, series_instance_uid)
    if not jobs or any(job.state != JobState.DONE for job in jobs):
        return False
    exports = [e for e in journal.exports_in_state("pending", "sent", "dead") if e.job_id in {j.id for j in jobs}]
    return bool(exports) and all(e.state == "sent" for e in exports)


def test_one_series_sent_over_three_nodes_is_one_series_one_job_one_seg(nodes, tmp_path):
    files, study_uid, series_uid = chest_series(tmp_path / "ct", seed=1, compressed=True)
    thirds = [files[i::3] for i in range(3)]  # interleaved: every node gets slices from the whole volume
    results = send_concurrently([(nodes.nodes[name], part) for name, part in zip(NAMES, thirds)],
                                extra=("-xr",))  # propose RLE Lossless, the files' syntax
    assert all(result.returncode == 0 for result in results), [r.output for r in results]
    assert sum(len(result.acknowledged) for result in results) == len(files)
    journal = nodes.journal()
    try:
        wait_for(lambda: delivered(journal, series_uid), 90, "the series' SEG delivered")
        record = journal.get_series(series_uid)
        assert (record.generation, record.instance_count, record.state) == (1, len(files), "routed")
        assert len(journal.series_instances(series_uid, 1)) == len(files)
        (job,) = series_jobs(journal, series_uid)
        assert job.attempts == 1 and job.lease_owner in NAMES
    finally:
        journal.close()
    time.sleep(2)  # a second delivery would come within a dispatch pass
    assert len(nodes.segs(study_uid)) == 1
    # Each node decoded its third while receiving, into its own folder; the job read all three nodes' pixels.
    folders = sorted((nodes.spool / "prepared").iterdir())
    assert [folder.name for folder in folders] == sorted("n" + hashlib.sha256(name.encode()).hexdigest()[:10]
                                                          for name in NAMES)
    ready = sum(1 for folder in folders for entry in folder.glob("*.npy")
                if datetime.fromtimestamp(entry.stat().st_mtime, timezone.utc) < job.started_at)
    used = re.search(rf"(\d+) of {len(files)} slices decoded while the series arrived",
                     nodes.nodes[job.lease_owner].log_text())
    assert used is not None and ready <= int(used[1]), (ready, used)
    assert int(used[1]) > len(files) // 3  # more than the job's own node received: another node's pixels too
    completed_on = [name for name, node in nodes.nodes.items() for line in node.log_text().splitlines()
                    if "series complete" in line and f"series={series_uid} generation=1 " in line]
    assert len(completed_on) == 1, completed_on  # one node completed and routed it


def test_a_release_on_one_node_waits_for_a_sender_of_the_series_still_open_on_another(nodes, tmp_path):
    """The release fast path of node-a sees node-b's association still open on the series (idle, within
    stable_seconds): the series completes when node-b's association is released, not node-a's."""
    files = write_ct_series(tmp_path / "ct", 6, rows=64, columns=64)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    journal = nodes.journal()
    assoc = open_association(nodes.nodes["node-b"].port)
    try:
        assert assoc.send_c_store(files[0]).Status == 0
        assert len(dcmtk.storescu(nodes.nodes["node-a"].port, files[1:]).acknowledged) == 5  # and released
        hold_until = time.monotonic() + 2 * 2.5  # node-a's after_release_seconds and more, within stable_seconds
        while time.monotonic() < hold_until:
            assert journal.get_series(series_uid).state == "receiving", "completed while node-b still sends it"
            time.sleep(0.2)
    finally:
        assoc.release()
    try:
        wait_for(lambda: journal.get_series(series_uid).completed_at, 20, "completion after node-b's release")
        record = journal.get_series(series_uid)
        assert (record.generation, record.instance_count) == (1, 6)
    finally:
        journal.close()
    wait_for(lambda: any("series complete (release)" in line and f"series={series_uid} " in line
                         for line in nodes.nodes["node-b"].log_text().splitlines()), 10,
             "node-b's log line of the completion (it follows the commit)")


def test_eight_senders_over_three_nodes_store_every_instance_and_get_each_seg_once(nodes, tmp_path):
    series = [chest_series(tmp_path / f"ct{i}", seed=10 + i) for i in range(8)]
    results = send_concurrently([(nodes.nodes[NAMES[i % 3]], files) for i, (files, _, _) in enumerate(series)])
    for result, (files, _, _) in zip(results, series):
        assert result.returncode == 0 and len(result.acknowledged) == len(files), result.output
    journal = nodes.journal()
    try:
        for files, _, series_uid in series:
            wait_for(lambda: delivered(journal, series_uid), 180, f"SEG of series {series_uid} delivered")
            assert len(journal.series_instances(series_uid, 1)) == len(files)
            assert journal.get_series(series_uid).generation == 1
            assert len(series_jobs(journal, series_uid)) == 1
        runners = {job.lease_owner for _, _, uid in series for job in series_jobs(journal, uid)}
    finally:
        journal.close()
    assert len(runners) >= 2, f"every job ran on {runners}: the claims were not spread"
    time.sleep(2)
    for _, study_uid, _ in series:
        assert len(nodes.segs(study_uid)) == 1, study_uid
    spooled = list(nodes.spool.glob("spool/*/*/*.dcm"))
    assert len({path.name for path in spooled}) >= sum(len(files) for files, _, _ in series)


def test_kill_9_of_the_node_running_a_job_hands_it_to_another_node_and_the_seg_arrives_once(nodes, tmp_path):
    files, study_uid, series_uid = chest_series(tmp_path / "ct", seed=30)
    assert len(dcmtk.storescu(nodes.nodes["node-b"].port, files).acknowledged) == len(files)
    journal = nodes.journal()
    try:
        def running():
            return [job for job in series_jobs(journal, series_uid) if job.state == JobState.RUNNING]
        (job,) = wait_for(running, 60, "the series' job running", interval=0.02)
        victim = nodes.nodes[job.lease_owner]
        victim.process.kill()
        killed_at = time.monotonic()
        wait_for(lambda: delivered(journal, series_uid), 120, "the job finished by another node")
        (done,) = series_jobs(journal, series_uid)
        assert done.lease_owner != job.lease_owner and done.attempts == 2
        assert time.monotonic() - killed_at >= LEASE_S * 0.5  # not before the dead node's lease could run out
    finally:
        journal.close()
        victim.start()  # same name: the module's later tests have three nodes again
    time.sleep(2)
    assert len(nodes.segs(study_uid)) == 1
    # The node that found the lease run out requeued the job; any live node may then have claimed it.
    requeued_by = [name for name, node in nodes.nodes.items() for line in node.log_text().splitlines()
                   if f"job {job.id} ({job.pipeline}): its node {job.lease_owner} stopped renewing its lease" in line]
    assert len(requeued_by) == 1 and requeued_by[0] != job.lease_owner, requeued_by


def test_singletons_run_on_exactly_one_node_and_move_when_it_is_killed(nodes):
    def one_each():
        found = nodes.holders()
        return found if all(len(holders) == 1 for holders in found.values()) else None
    before = wait_for(one_each, 20, "each singleton on exactly one node")
    (victim,) = before[COMPLETION]
    nodes.nodes[victim].process.kill()
    try:
        after = wait_for(one_each, 20, "each singleton on exactly one live node again")
        assert after[COMPLETION] != [victim] and after[COMPLETION][0] in nodes.alive()
        for singleton in (RETENTION, RECONCILE):
            assert after[singleton][0] != victim
        (now,) = after[COMPLETION]
        assert f"singleton completion runs on this node ({now})" in nodes.nodes[now].log_text()
        live = {node["name"] for node in nodes.status(now)["cluster"]["nodes"]}
        wait_for(lambda: {n["name"] for n in nodes.status(now)["cluster"]["nodes"]} == set(NAMES) - {victim},
                 3 * LEASE_S, f"{victim} gone from the live nodes (was {live})")
    finally:
        nodes.nodes[victim].start()


def test_a_dead_nodes_half_written_file_is_removed_by_the_reconcile_singleton(nodes, postgres_server):
    """A temp file named for a node without a heartbeat goes; one of a live node stays, until that node
    starts again under its name (its previous run cannot finish the file)."""
    journal = nodes.journal()
    try:
        live_tag = {n.name: n.spool_tag for n in Leases(journal, "observer", LEASE_S).live_nodes()}["node-a"]
    finally:
        journal.close()
    folder = nodes.spool / "spool" / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / ".1.2.3.4.5.nffffffffff.abc123.tmp"
    live = folder / f".1.2.3.4.6.{live_tag}.def456.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    wait_for(lambda: not dead.exists(), 20, "the dead node's temp file removed")
    assert live.exists()
    nodes.nodes["node-a"].stop()
    nodes.nodes["node-a"].start()  # the same name and tag: the file is what its previous run left
    assert not live.exists()


def test_claims_from_two_nodes_at_once_never_share_a_job(postgres_server):
    """SELECT ... FOR UPDATE SKIP LOCKED: two nodes claiming the same queue at once get disjoint jobs."""
    journal = Journal(postgres_server.new_database())
    try:
        for i in range(40):
            journal.add_job(f"1.2.{i}", 1, "lungs_ct")
        claimed: dict[str, list[int]] = {"x": [], "y": []}

        def claim(owner: str) -> None:
            leases = Leases(journal, owner, 30)
            while batch := leases.claim_jobs(3):
                claimed[owner] += [job.id for job in batch]
        threads = [threading.Thread(target=claim, args=(owner,)) for owner in claimed]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not set(claimed["x"]) & set(claimed["y"])
        assert sorted(claimed["x"] + claimed["y"]) == [job.id for job in journal.jobs_in_state(JobState.RUNNING)]
        assert len(claimed["x"]) + len(claimed["y"]) == 40
        assert Leases(journal, "z", 30).abandoned_jobs() == []  # every lease is alive
    finally:
        journal.close()


def test_an_advisory_lock_elects_one_member_and_passes_on_when_it_stops(postgres_server):
    url = postgres_server.new_database()
    journal = Journal(url)
    members = [Cluster(Config(node={"name": name, "journal_url": url}, cluster={"heartbeat_seconds": 0.2,
                                                                                "lease_seconds": 2}), journal)
               for name in ("first", "second")]
    try:
        for member in members:
            member.start()
        assert all(members[0].runs(singleton) for singleton in SINGLETONS)
        assert not any(members[1].runs(singleton) for singleton in SINGLETONS)
        members[0].stop()
        wait_for(lambda: all(members[1].runs(singleton) for singleton in SINGLETONS), 10, "the second takes over")
        assert [node.name for node in members[1].status().nodes] == ["second"]
    finally:
        for member in members:
            member.stop()
        journal.close()


def test_the_first_instances_of_a_series_at_two_nodes_at_once_open_one_generation(postgres_server):
    """Two nodes (two journals, each with its own process lock) record the first instance of each of many
    new series at the same moment: each series is one generation holding both."""
    url = postgres_server.new_database()
    journals = [Journal(url), Journal(url)]
    try:
        barrier = threading.Barrier(2)
        failures: list[BaseException] = []

        def record(journal: Journal, node: int) -> None:
            for k in range(30):
                barrier.wait(30)
                try:
                    journal.record_instance(new_instance(f"1.2.3.{k}.{node}", series=f"1.2.3.{k}"))
                except Exception as error:
                    failures.append(error)
        threads = [threading.Thread(target=record, args=(journal, n)) for n, journal in enumerate(journals)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        for k in range(30):
            generations = journals[0].select(SeriesRecord, select(series).where(series.c.series_instance_uid == f"1.2.3.{k}"))
            assert [(g.generation, g.instance_count) for g in generations] == [(1, 2)]
    finally:
        for journal in journals:
            journal.close()


def test_a_live_lease_keeps_a_job_and_an_export_from_other_nodes_and_its_own_restart_takes_them_back(
        postgres_server):
    journal = Journal(postgres_server.new_database())
    try:
        journal.add_job("1.2.9", 1, "lungs_ct")
        a, b = Leases(journal, "a", 30), Leases(journal, "b", 30)
        (job,) = a.claim_jobs(5)
        assert b.claim_jobs(5) == [] and b.abandoned_jobs() == []  # running under a's live lease
        journal.add_export(job.id, "pacs", "1.2.9.1", "/results/1.dcm")
        (export,) = a.claim_exports(due_before=utcnow())
        assert b.claim_exports(due_before=utcnow()) == []
        a.release_exports([export.id])
        assert [e.id for e in b.claim_exports(due_before=utcnow())] == [export.id]  # released: any node sends it
        restarted = Leases(journal, "a", 30)  # the same name after a crash: its running job is its own again
        (abandoned,) = restarted.abandoned_jobs()
        assert abandoned.id == job.id and not b.take_over_job(abandoned) and restarted.take_over_job(abandoned)
    finally:
        journal.close()
