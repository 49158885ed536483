"""Ingest throughput: dcmtk storescu -> the node and three other receivers, interleaved in one run.

300 instances of 512x512 int16 (uncompressed, ~0.5 MB each), split over 1, 4
or 8 concurrent storescu associations (`--senders 1,4,8`); each receiver gets
a fresh storage folder per measurement; median of the rounds. The receivers:

- dicom-node: C-STORE success once the instance is fsynced and journalled;
- pynetdicom's own AE storing durably (the library the node's upper layer
  replaces on its receive path): its handler writes the Part 10 file, fsyncs
  it, links it to its final name, fsyncs the folder, then answers success;
- Orthanc with its defaults (SyncStorageArea: fsync of each file, SQLite index);
- dcmtk storescp -od: acknowledges once the file is in the page cache, no fsync;
  one association at a time (it is run without --fork), so with several senders
  the others wait for theirs.

Rounds are interleaved (every receiver and sender count in each round) so all
see the same machine load, and the disk is synced before each measurement so
that none pays for the writeback the one before left behind (storescp's files,
never fsynced, are still being written out when the next receiver starts). The
receivers' order is shuffled for every sender count of every round (the same
shuffles in every run): a shared VM's disk may take writes at its burst rate only
for its first gigabyte or so (seen here: 1.2-1.5 GB/s, then 340-380 MB/s), and a
fixed order would give the receiver after storescp, every time, the disk that the
sync of storescp's files has just drained. For each sender count the run prints every
receiver's rate, the node's rate over Orthanc's (of the medians, and round by
round) and, with several counts, how the node's aggregate rate grows with them. Everyone runs with TCP_NODELAY=1 (Debian's dcmtk
and Orthanc leave Nagle on, and each C-STORE then stalls ~40 ms).

The run also measures, on the same disk and without any network or DICOM
work, what the node's durability costs per instance (temp file, fsync, link
to the final name, directory fsync, one journal commit in SQLite WAL with
synchronous=FULL) and prints storescp's single-association rate with that cost
added: the best any receiver with the node's guarantee could do here.

    .venv/bin/python bench/ingest.py [--instances 300] [--rounds 3] [--senders 1,4,8]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402

from bench.machine import run_header  # noqa: E402
from dicom_node.config.node import NodeConfig  # noqa: E402
from tests.peers import dcmtk, free_port, orthanc, peer_env  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_receive import Node  # noqa: E402

Receiver = Callable[[Path], AbstractContextManager[tuple[int, str]]]
# The node's default association limit: every receiver must take this many at once.
MAX_SENDERS: int = NodeConfig.model_fields["max_associations"].default


@contextmanager
def node_receiver(root: Path) -> Iterator[tuple[int, str]]:
    node = Node(root).start()
    try:
        yield node.port, "DICOMNODE"
    finally:
        node.stop()


@contextmanager
def pynetdicom_receiver(root: Path) -> Iterator[tuple[int, str]]:
    """pynetdicom's AE with a C-STORE handler that answers success only once the file is durable."""
    root.mkdir(parents=True)
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def store(event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        temp, final = root / f".{uid}.tmp", root / f"{uid}.dcm"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, event.encoded_dataset())  # Part 10: file meta + the data set as received
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, final)
        os.unlink(temp)
        os.fsync(folder)
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_associations = MAX_SENDERS  # its default, 10, would refuse the 11th sender
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        yield port, "PYNETDICOM"
    finally:
        server.shutdown()
        os.close(folder)


@contextmanager
def orthanc_receiver(root: Path) -> Iterator[tuple[int, str]]:
    with orthanc.Orthanc(root) as pacs:
        yield pacs.dicom_port, pacs.ae_title


@contextmanager
def storescp_receiver(root: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    with dcmtk.storescp(port, root / "out", log=root / "storescp.log"):
        yield port, "STORESCP"


def timed_send(port: int, called_ae: str, files: list[Path], senders: int, logs: Path) -> float:
    """Seconds for `senders` concurrent storescu associations to store `files` (split round robin)."""
    return send_at_once([(port, files[n::senders]) for n in range(senders)], logs, called_ae)


def send_at_once(sends: list[tuple[int, list[Path]]], logs: Path, called_ae: str = "DICOMNODE") -> float:
    """Seconds for one storescu per (port, files), all started together, until the last is acknowledged;
    RuntimeError when any instance was not."""
    logs.mkdir(parents=True, exist_ok=True)
    outputs = [logs / f"storescu{n}.log" for n in range(len(sends))]
    start = time.perf_counter()
    processes = []
    for (port, files), output in zip(sends, outputs):
        with open(output, "w") as log:
            processes.append(subprocess.Popen(dcmtk.storescu_args(port, files, called_ae=called_ae), env=peer_env(),
                                              stdout=log, stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=900) for process in processes]
    elapsed = time.perf_counter() - start
    for code, (port, files), output in zip(codes, sends, outputs):
        result = dcmtk.StoreResult(code, output.read_text(errors="replace"))
        if code != 0 or len(result.acknowledged) != len(files):
            raise RuntimeError(f"send to {called_ae} on port {port} failed ({len(result.acknowledged)}/{len(files)} "
                               f"stored):\n{result.output[-2000:]}")
    return elapsed


def durability_cost(root: Path, files: list[Path]) -> float:
    """Seconds per instance for the node's persistence steps alone, on the disk under `root`."""
    root.mkdir(parents=True)
    journal = sqlite3.connect(root / "journal.sqlite", isolation_level=None)
    journal.execute("PRAGMA journal_mode=WAL")
    journal.execute("PRAGMA synchronous=FULL")
    journal.execute("CREATE TABLE instances (uid TEXT PRIMARY KEY, path TEXT, size INTEGER)")
    payloads = [f.read_bytes() for f in files]
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    start = time.perf_counter()
    for index, payload in enumerate(payloads):
        temp, final = root / f".{index}.tmp", root / f"{index}.dcm"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.link(temp, final)  # as the node's spool does: never replaces a first copy
        os.unlink(temp)
        os.fsync(folder)
        journal.execute("INSERT INTO instances VALUES (?, ?, ?)", (str(index), str(final), len(payload)))
    elapsed = time.perf_counter() - start
    os.close(folder)
    journal.close()
    return elapsed / len(files)


NODE = "dicom-node (fsync+journal)"
ORTHANC = "Orthanc (defaults, fsync)"


def receivers() -> dict[str, Receiver]:
    found: dict[str, Receiver] = {NODE: node_receiver, "pynetdicom AE (fsync)": pynetdicom_receiver}
    if orthanc.available():
        found[ORTHANC] = orthanc_receiver
    else:
        print("Orthanc not installed: left out of this run")
    found["dcmtk storescp -od"] = storescp_receiver
    return found


def shuffled(peers: dict[str, Receiver], order: random.Random) -> list[tuple[str, Receiver]]:
    """The receivers in the next order of `order`, so that none follows the same one every time."""
    items = list(peers.items())
    order.shuffle(items)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", default="1", help="comma-separated counts of concurrent associations (1,4,8)")
    args = parser.parse_args()
    sender_counts = [int(n) for n in args.senders.split(",")]
    if max(sender_counts) > MAX_SENDERS:
        parser.error(f"at most {MAX_SENDERS} senders: the node's default association limit")
    peers = receivers()
    print(run_header())
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files = write_ct_series(work / "series", args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        times: dict[tuple[int, str], list[float]] = {(n, name): [] for n in sender_counts for name in peers}
        order = random.Random(0)
        for round_index in range(args.rounds):  # interleaved so every receiver sees the same machine load
            for senders in sender_counts:
                for number, (name, receiver) in enumerate(shuffled(peers, order)):
                    root = work / f"r{round_index}-s{senders}-{number}"
                    os.sync()  # no receiver pays for writeback another left behind (storescp never fsyncs)
                    with receiver(root) as (port, called_ae):
                        times[(senders, name)].append(timed_send(port, called_ae, files, senders, root / "logs"))
        print(f"{args.instances} instances, {megabytes:.1f} MB, median of {args.rounds} interleaved rounds")
        scp_rate = None
        for senders in sender_counts:
            print(f" {senders} concurrent association{'s' if senders > 1 else ''}:")
            rates = {name: args.instances / statistics.median(times[(senders, name)]) for name in peers}
            scp = rates["dcmtk storescp -od"]
            scp_rate = scp_rate or scp
            for name, rate in rates.items():
                samples = times[(senders, name)]
                print(f"  {name:28s} {rate:7.1f} instances/s  {megabytes * rate / args.instances:7.1f} MB/s  "
                      f"{rate / scp:5.2f}x storescp  (runs: {', '.join(f'{t:.2f}s' for t in samples)})")
            if ORTHANC in rates:
                per_round = [o / n for n, o in zip(times[(senders, NODE)], times[(senders, ORTHANC)])]
                print(f"  dicom-node / Orthanc: {rates[NODE] / rates[ORTHANC]:.2f}x (medians; round by round "
                      f"{', '.join(f'{r:.2f}x' for r in per_round)})")
        if len(sender_counts) > 1:
            growth = {n: args.instances / statistics.median(times[(n, NODE)]) for n in sender_counts}
            print(f" dicom-node aggregate rate by associations: "
                  f"{', '.join(f'{n}: {rate:.1f}/s' for n, rate in growth.items())}")
        cost = statistics.median(durability_cost(work / f"floor{i}", files) for i in range(args.rounds))
        durable_scp = 1 / (1 / scp_rate + cost)
        print(f" durability cost on this disk: {cost * 1000:.2f} ms/instance (write, fsync, link, dir fsync, "
              f"journal commit)")
        print(f" storescp ({sender_counts[0]} association(s)) with that cost added: {durable_scp:.1f} instances/s")


if __name__ == "__main__":
    main()
