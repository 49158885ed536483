"""`dicom-node audit`: the audit log (dicom_node.store.audit) as a table or JSON, newest first."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TextIO

from dicom_node.ops.tables import print_table
from dicom_node.store.audit import AUDIT_EVENTS, AuditLog
from dicom_node.store.journal import Journal

AUDIT_COLUMNS = ("id", "time", "event", "calling_ae", "host", "series_instance_uid", "job_id", "destination",
                 "instance_count", "status", "detail", "actor")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("audit", help="who sent what, what was produced, where it was sent (newest first)")
    parser.add_argument("--series", dest="series_instance_uid", help="only this Series Instance UID")
    parser.add_argument("--study", dest="study_instance_uid", help="only this Study Instance UID")
    parser.add_argument("--job", dest="job_id", type=int, help="only this job")
    parser.add_argument("--event", choices=AUDIT_EVENTS, help="only this kind of event")
    parser.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    return parser


def run(args: argparse.Namespace, journal: Journal, out: TextIO = sys.stdout) -> int:

    records = AuditLog(journal).query(series_instance_uid=args.series_instance_uid,
                                      study_instance_uid=args.study_instance_uid, job_id=args.job_id,
                                      event=args.event, limit=args.limit)
    print_table([dataclasses.asdict(r) for r in records], AUDIT_COLUMNS, args.json, out)
    return 0
