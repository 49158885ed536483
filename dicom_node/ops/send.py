"""`dicom-node send PATH... --to DESTINATION` and `dicom-node echo DESTINATION`: the admin's SCU.

`send` pushes files or folders (searched recursively) to a destination of the
config with the node's own C-STORE or STOW-RS code (`dicom_node.dispatch.registry.send`): the
same presentation contexts or batches, statuses and calling AE title the pipeline uses, so a
successful manual send says the pipeline's exports will get through too. All files
go in one association (a PACS may take the end of an association as the end of a
study), the progress bar moving with each file's outcome; each file gets one
outcome in the summary. Files that are not DICOM are listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.dispatch import registry as dispatch
from dicom_node.config import Config
from dicom_node.config.destinations import DestinationConfig
from dicom_node.dispatch.destinations import OutcomeKind
from dicom_node.ops.tables import print_table

SKIPPED = "skipped"  # not a DICOM file: never offered to the destination


@dataclass(frozen=True)
class FileOutcome:
    path: str
    sop_instance_uid: str | None
    outcome: str  # an OutcomeKind, or SKIPPED
    status: int | None
    reason: str


def add_parsers(subparsers: argparse._SubParsersAction) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    send = subparsers.add_parser("send", help="C-STORE (or STOW-RS) files or folders to a configured destination")
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders (searched recursively)")
    send.add_argument("--to", required=True, metavar="DESTINATION", help="a name under destinations in the config")
    send.add_argument("--json", action="store_true", help="JSON instead of a table")
    echo = subparsers.add_parser("echo", help="C-ECHO a configured destination (a QIDO-RS query for a DICOMweb one)")
    echo.add_argument("destination", metavar="DESTINATION", help="a name under destinations in the config")
    echo.add_argument("--json", action="store_true", help="JSON instead of a line of text")
    return send, echo


def destination_of(config: Config, name: str) -> DestinationConfig | None:
    destination = config.destinations.get(name)
    if destination is None:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        print(f"unknown destination {name!r} (destinations: {known})", file=sys.stderr)
    return destination


def calling_ae(config: Config, destination: DestinationConfig) -> str:
    return destination.calling_ae_title or config.node.ae_title


def files_under(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return found


def run_send(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout, progress: TextIO = sys.stderr) -> int:
    destination = destination_of(config, args.to)
    if destination is None:
        return 1
    outcomes: list[FileOutcome] = []
    sendable: list[tuple[Path, str]] = []
    for path in files_under(args.paths):
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except (InvalidDicomError, OSError, AttributeError) as error:
            outcomes.append(FileOutcome(str(path), None, SKIPPED, None, f"not a DICOM file: {error}"))
            continue
        sendable.append((path, uid))
    bar = Progress(len(sendable), progress)
    report = dispatch.send(destination, [path for path, _ in sendable], calling_ae(config, destination),
                           on_outcome=lambda o: bar.advance(failed=not o.kind.stored))
    by_uid = {o.sop_instance_uid: o for o in report.outcomes}
    for path, uid in sendable:
        outcome = by_uid.get(uid)
        outcomes.append(FileOutcome(str(path), uid, outcome.kind, outcome.status, outcome.reason) if outcome
                        else FileOutcome(str(path), uid, OutcomeKind.TRANSIENT, None, "no outcome reported"))
    bar.finish()
    _report(args.to, destination, outcomes, args.json, out)
    return 0 if sendable and all(o.outcome in (OutcomeKind.SENT, OutcomeKind.WARNING) for o in outcomes
                                 if o.outcome != SKIPPED) else 1


def _report(name: str, destination: DestinationConfig, outcomes: Sequence[FileOutcome], as_json: bool,
            out: TextIO) -> None:
    totals = {kind: sum(1 for o in outcomes if o.outcome == kind) for kind in (*OutcomeKind, SKIPPED)}
    if as_json:
        print(json.dumps({"destination": name, "files": [dataclasses.asdict(o) for o in outcomes], **totals}), file=out)
        return
    print_table([dataclasses.asdict(o) for o in outcomes], ("outcome", "path", "reason"), False, out)
    print(f"{name} ({dispatch.kind_of(destination).describe(destination)}): "
          + ", ".join(f"{count} {kind}" for kind, count in totals.items() if count), file=out)


class Progress:
    """A one-line bar on a terminal; otherwise a line every LINE_EVERY files and at the end,
    so the log of a script stays readable."""

    LINE_EVERY = 50

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.done, self.failed = total, stream, 0, 0
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        text = f"{self.done}/{self.total} files, {self.failed} failed, {rate:.0f} files/s"
        if self.tty:
            width = 30
            filled = width * self.done // max(self.total, 1)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}", end="", file=self.stream, flush=True)
        elif self.done % self.LINE_EVERY == 0 or self.done == self.total:
            print(f"sent {text}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty and self.total:
            print(file=self.stream)


def run_echo(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    destination = destination_of(config, args.destination)
    if destination is None:
        return 1
    started = time.monotonic()
    result = dispatch.echo(destination, calling_ae(config, destination))
    seconds = time.monotonic() - started
    described = dispatch.kind_of(destination).describe(destination)
    if args.json:
        address = destination.model_dump(include={"ae_title", "host", "port", "url"})  # no credentials
        print(json.dumps({"destination": args.destination, "kind": destination.kind, **address,
                          "seconds": round(seconds, 3), **dataclasses.asdict(result)}), file=out)
    else:
        status = "" if result.status is None else (
            f", HTTP {result.status}" if result.check == "QIDO-RS" else f", status 0x{result.status:04X}")
        print(f"{args.destination} ({described}): "
              f"{result.check} {'ok' if result.ok else 'FAILED: ' + result.reason}{status}, {seconds:.2f} s", file=out)
    return 0 if result.ok else 1
