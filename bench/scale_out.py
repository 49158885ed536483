"""Aggregate ingest of 1, 2 and 3 node processes on one machine, sharing one PostgreSQL journal and one spool.

Every configuration gets the same instances: `--senders` concurrent dcmtk
storescu associations (TCP_NODELAY=1), each sending its own series of
`--instances / --senders` 512x512 int16 slices, spread round-robin over the
nodes (sender k to node k mod N). Each node is `dicom-node serve` with its
own config, log and ports, and the same `node.storage_dir` and
`node.journal_url` (a fresh database of a throwaway PostgreSQL cluster per
measurement, the same folder emptied). The figure is all instances over the
time from the first association's start to the last acknowledgement, median
of `--rounds` interleaved rounds; a round counts only once the journal holds
every instance sent and the spool every file.

Also printed per configuration: CPU seconds the nodes, PostgreSQL and the
senders used during the send, and how busy the machine's CPUs were and how
much of their time was waiting for the disk (other load included: on a
shared machine that is part of the answer).

    .venv/bin/python bench/scale_out.py [--nodes 1,2,3] [--instances 300] [--senders 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import send_at_once  # noqa: E402
from bench.machine import run_header  # noqa: E402
from dicom_node.store.journal import Journal  # noqa: E402
from dicom_node.store.schema import instances  # noqa: E402
from tests.peers.postgres import PostgresServer, postgres_server  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_receive import Node  # noqa: E402


@dataclass(frozen=True)
class Measurement:
    seconds: float
    node_cpu_s: float  # user + system of every node process during the send
    postgres_cpu_s: float  # the PostgreSQL server and its backends
    senders_cpu_s: float  # the storescu processes
    machine_busy: float  # fraction of all CPUs busy during the send, any process
    machine_iowait: float  # fraction of all CPUs' time idle waiting for the disk


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def children_cpu_seconds() -> float:
    """User + system time of this process's children that ended and were waited for (the senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_processes(server: PostgresServer) -> list[psutil.Process]:
    postmaster = psutil.Process(server._process.pid)  # noqa: SLF001 (the helper keeps its process private)
    return [postmaster, *postmaster.children(recursive=True)]


def send(nodes: list[Node], series: list[list[Path]], logs: Path) -> float:
    """Seconds for one storescu per series, series k to node k mod N, all at once, to be acknowledged."""
    return send_at_once([(nodes[k % len(nodes)].port, files) for k, files in enumerate(series)], logs)


def measure(server: PostgresServer, count: int, series: list[list[Path]], root: Path) -> Measurement:
    """`count` nodes on a fresh database and an empty shared spool; the send timed and checked."""
    journal_url = server.new_database()
    storage = root / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    with ExitStack() as stack:
        nodes = []
        for n in range(count):
            node = Node(root / f"node{n}", node={"journal_url": journal_url, "storage_dir": str(storage)})
            nodes.append(node.start())
            stack.callback(node.stop)
        node_processes = [psutil.Process(node.process.pid) for node in nodes]
        node_processes += [child for p in node_processes for child in p.children(recursive=True)]
        pg = postgres_processes(server)
        node_before, pg_before, senders_before = cpu_seconds(node_processes), cpu_seconds(pg), children_cpu_seconds()
        psutil.cpu_times_percent(interval=None)
        seconds = send(nodes, series, root / "logs")
        machine = psutil.cpu_times_percent(interval=None)
        node_cpu, pg_cpu = cpu_seconds(node_processes) - node_before, cpu_seconds(pg) - pg_before
        senders_cpu = children_cpu_seconds() - senders_before
    sent = sum(len(files) for files in series)
    journal = Journal(journal_url)
    try:
        with journal.engine.connect() as connection:
            journaled = connection.execute(select(func.count()).select_from(instances)).scalar_one()
    finally:
        journal.close()
    spooled = len(list((storage / "spool").glob("*/*/*.dcm")))
    if journaled != sent or spooled != sent:
        raise RuntimeError(f"{count} node(s): {sent} instances acknowledged, {journaled} in the journal, "
                           f"{spooled} in the spool")
    return Measurement(seconds, node_cpu, pg_cpu, senders_cpu, 1 - (machine.idle + machine.iowait) / 100,
                       machine.iowait / 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3", help="comma-separated node counts")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--senders", type=int, default=6, help="concurrent associations, each its own series")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    print(run_header())
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp, postgres_server() as server:
        work = Path(tmp)
        per_sender = args.instances // args.senders
        series = [write_ct_series(work / f"series{k}", per_sender) for k in range(args.senders)]
        total = per_sender * args.senders
        megabytes = sum(f.stat().st_size for files in series for f in files) / 1e6
        results: dict[int, list[Measurement]] = {count: [] for count in counts}
        for round_index in range(args.rounds):  # interleaved: every configuration sees the same machine load
            for count in counts:
                results[count].append(measure(server, count, series, work / f"r{round_index}-n{count}"))
        print(f"{total} instances ({megabytes:.1f} MB) in {args.senders} concurrent associations, each its own "
              f"series, round-robin over the nodes; one PostgreSQL journal, one spool folder; "
              f"median of {args.rounds} interleaved rounds")
        base = None
        for count in counts:
            runs = results[count]
            rate = total / statistics.median(m.seconds for m in runs)
            base = base or rate
            print(f"  {count} node{'s' if count > 1 else ' '}  {rate:7.1f} instances/s  {megabytes * rate / total:6.1f} MB/s"
                  f"  {rate / base:4.2f}x  nodes {statistics.median(m.node_cpu_s for m in runs):5.1f} CPU s, "
                  f"PostgreSQL {statistics.median(m.postgres_cpu_s for m in runs):4.1f}, senders "
                  f"{statistics.median(m.senders_cpu_s for m in runs):4.1f}; machine "
                  f"{statistics.median(m.machine_busy for m in runs):4.0%} busy, "
                  f"{statistics.median(m.machine_iowait for m in runs):4.0%} iowait  "
                  f"(runs: {', '.join(f'{m.seconds:.2f}s' for m in runs)})")


if __name__ == "__main__":
    main()
