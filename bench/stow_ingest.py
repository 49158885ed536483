"""Ingest throughput by transport: the same instances into the node over C-STORE and over STOW-RS, in one run.

bench/ingest.py's series (300 instances of 512x512 int16, uncompressed, ~0.5 MB
each) goes into a fresh node for every measurement (its own storage folder, the
same config otherwise, STOW-RS sender included) three ways:

- C-STORE: dcmtk storescu, one association, TCP_NODELAY=1 (bench/ingest.py's sender);
- STOW-RS (PS3.18 10.5): dicomweb-client, a real DICOMweb client (pydicom +
  requests), `--batch` instances per request, one request after the other;
- STOW-RS: every instance in one request.

Each time runs from the files on disk to the last acknowledgement, as a client
does it: storescu reads and parses each file before it sends it; the STOW-RS
client reads each file with pydicom and the library encodes it again (dcmwrite)
into its multipart body. The node acknowledges an instance (C-STORE success, an
entry in the STOW-RS ReferencedSOPSequence) only once its file and journal row
are on disk. After every measurement the node's journal is read, and a figure
is printed only when each instance sent has its row. Rounds are interleaved (all
three in each round) so all see the same machine load; median of the rounds.

Client and node share the machine's CPUs, so the run also times the STOW-RS
client's own work alone (reading and encoding the files, no network).

    .venv/bin/python bench/stow_ingest.py [--instances 300] [--rounds 3] [--batch 50]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from bench.ingest import timed_send  # noqa: E402
from bench.machine import run_header  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_receive import NODE_AE, Node, running_node  # noqa: E402
from tests.test_stow_receive import client, stow_section  # noqa: E402

Measurement = Callable[[Node, list[Path], Path], float]


def c_store(node: Node, files: list[Path], logs: Path) -> float:
    return timed_send(node.port, NODE_AE, files, 1, logs)


def stow(batch: int) -> Measurement:
    """Seconds for dicomweb-client to store `files` over STOW-RS, `batch` instances per request."""

    def measure(node: Node, files: list[Path], _logs: Path) -> float:
        web = client(node)
        start = time.perf_counter()
        for offset in range(0, len(files), batch):
            datasets = [pydicom.dcmread(f) for f in files[offset:offset + batch]]
            response = web.store_instances(datasets)
            stored = [item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])]
            if "FailedSOPSequence" in response or stored != [ds.SOPInstanceUID for ds in datasets]:
                raise RuntimeError(f"STOW-RS of instances {offset}..{offset + len(datasets) - 1}: "
                                   f"{len(stored)}/{len(datasets)} stored\n{response}")
        return time.perf_counter() - start

    return measure


def check_journaled(node: Node, sent: set[str], name: str) -> None:
    """Refuse a figure for an ingest that is not complete: every instance sent has its journal row, and no more."""
    journal = node.journal()
    try:
        rows = [record.sop_instance_uid for record in journal.all_instances()]
    finally:
        journal.close()
    if len(rows) != len(sent) or set(rows) != sent:
        raise RuntimeError(f"{name}: {len(rows)} journal rows, {len(sent & set(rows))} of the {len(sent)} "
                           f"instances sent\n{node.log_text()[-2000:]}")


def client_encode_seconds(files: list[Path]) -> float:
    """The STOW-RS client's own work alone: read every file and encode it again as dicomweb-client does."""
    start = time.perf_counter()
    for f in files:
        with io.BytesIO() as buffer:
            pydicom.dcmwrite(buffer, pydicom.dcmread(f))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request (first STOW-RS row)")
    args = parser.parse_args()
    measurements: dict[str, Measurement] = {"C-STORE, storescu, 1 association": c_store}
    for batch in dict.fromkeys([args.batch, args.instances]):
        label = f"{batch} per request" if batch < args.instances else f"all {args.instances} in one request"
        measurements[f"STOW-RS, dicomweb-client, {label}"] = stow(batch)
    print(run_header())
    with tempfile.TemporaryDirectory(prefix="bench-stow-ingest-") as tmp:
        work = Path(tmp)
        files = write_ct_series(work / "series", args.instances)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        times: dict[str, list[float]] = {name: [] for name in measurements}
        for round_index in range(args.rounds):  # interleaved so every transport sees the same machine load
            for number, (name, measure) in enumerate(measurements.items()):
                root = work / f"r{round_index}-{number}"
                with running_node(root, http=stow_section()) as node:
                    times[name].append(measure(node, files, root / "logs"))
                    check_journaled(node, sent, name)
        encode = statistics.median(client_encode_seconds(files) for _ in range(args.rounds))
        print(f"{args.instances} instances, {megabytes:.1f} MB, median of {args.rounds} interleaved rounds, "
              f"every instance journaled after each")
        rates = {name: args.instances / statistics.median(samples) for name, samples in times.items()}
        c_store_rate = rates["C-STORE, storescu, 1 association"]
        for name, rate in rates.items():
            print(f"  {name:50s} {rate:7.1f} instances/s  {megabytes * rate / args.instances:7.1f} MB/s  "
                  f"{rate / c_store_rate:5.2f}x C-STORE  (runs: {', '.join(f'{t:.2f}s' for t in times[name])})")
        print(f" the STOW-RS client's own read + encode of the {args.instances} instances, alone: {encode:.2f} s "
              f"({encode * 1000 / args.instances:.2f} ms/instance)")


if __name__ == "__main__":
    main()
