"""Ingest throughput: dcmtk storescu -> this node (durability on) vs dcmtk storescp -od, same run.

300 instances of 512x512 int16 (uncompressed, ~0.5 MB each) in one association;
each receiver gets a fresh storage folder per round; median of 3 rounds.
Both storescu and storescp run with TCP_NODELAY=1 (PEERS.md: Debian's dcmtk
leaves Nagle on). Target (issue 2): node >= 1.0x storescp and >= 150 inst/s.

storescp acknowledges once the file is in the page cache; the node only once
it is on disk. So the run also measures, on the same disk and without any
network or DICOM work, what that durability costs per instance (temp file,
fsync, link to the final name, directory fsync, one journal commit in SQLite WAL with
synchronous=FULL) and prints storescp's rate with that cost added: the best
any receiver with the node's guarantee could do here.

    .venv/bin/python bench/ingest.py [--instances 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peers import free_port  # noqa: E402
from tests.peers import dcmtk  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_receive import Node  # noqa: E402


def timed_send(port: int, files: list[Path], called_ae: str) -> float:
    start = time.perf_counter()
    result = dcmtk.storescu(port, files, called_ae=called_ae, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or len(result.acknowledged) != len(files):
        raise RuntimeError(f"send to {called_ae} failed:\n{result.output[-2000:]}")
    return elapsed


def node_round(root: Path, files: list[Path]) -> float:
    node = Node(root).start()
    try:
        return timed_send(node.port, files, "DICOMNODE")
    finally:
        node.stop()


def storescp_round(root: Path, files: list[Path]) -> float:
    port = free_port()
    with dcmtk.storescp(port, root / "out", log=root / "storescp.log"):
        return timed_send(port, files, "STORESCP")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files = write_ct_series(work / "series", args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {"dicom-node (fsync+journal)": [], "dcmtk storescp -od": []}
        for round_index in range(args.rounds):  # interleaved so both see the same machine load
            times["dicom-node (fsync+journal)"].append(node_round(work / f"node{round_index}", files))
            times["dcmtk storescp -od"].append(storescp_round(work / f"scp{round_index}", files))
        print(f"{args.instances} instances, {megabytes:.1f} MB, one association, median of {args.rounds}")
        rates = {}
        for name, samples in times.items():
            median = statistics.median(samples)
            rates[name] = args.instances / median
            print(f"  {name:28s} {rates[name]:7.1f} instances/s  {megabytes / median:7.1f} MB/s  "
                  f"(runs: {', '.join(f'{t:.2f}s' for t in samples)})")
        node, scp = rates.values()
        print(f"  ratio node/storescp: {node / scp:.2f}x")
        cost = statistics.median(durability_cost(work / f"floor{i}", files) for i in range(args.rounds))
        durable_scp = 1 / (1 / scp + cost)
        print(f"  durability cost on this disk: {cost * 1000:.2f} ms/instance (write, fsync, link, dir fsync, "
              f"journal commit)")
        print(f"  storescp with that cost added: {durable_scp:.1f} instances/s; node/that: {node / durable_scp:.2f}x")


if __name__ == "__main__":
    main()
