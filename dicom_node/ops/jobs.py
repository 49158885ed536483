"""`dicom-node jobs list|show|retry|dead-letter`: what an admin does with the journal of a node.

These commands only write the journal; a running node picks requeued jobs and
exports up on its next dispatch pass (about a second), a stopped one at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from typing import TextIO

from dicom_node.config import Config
from dicom_node.ops.tables import cell, print_table, to_json
from dicom_node.store.audit import AuditLog
from dicom_node.pipeline.requeue import NotRetryable, requeue, requeue_export
from dicom_node.store.journal import Journal, StepOutcome
from dicom_node.states import ExportState, JobState

JOB_COLUMNS = ("id", "state", "kind", "pipeline", "series_instance_uid", "generation", "attempts", "created_at",
               "steps", "error")
EXPORT_COLUMNS = ("id", "job_id", "destination", "sop_instance_uid", "attempts", "last_status", "reason")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="list, show and retry pipeline jobs; dead-lettered exports")
    jobs.add_argument("--json", action="store_true", help="JSON instead of a table")
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = commands.add_parser("list", help="jobs, newest last")
    listing.add_argument("--state", choices=list(JobState), help="only jobs in this state")
    listing.set_defaults(jobs_handler=run_list)
    show = commands.add_parser("show", help="one job with its exports")
    show.add_argument("id", type=int)
    show.set_defaults(jobs_handler=run_show)
    retry = commands.add_parser("retry", help="requeue a failed job (or every failed job)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?")
    which.add_argument("--failed", action="store_true", help="requeue every failed job")
    retry.set_defaults(jobs_handler=run_retry)
    dead = commands.add_parser("dead-letter", help="exports a destination refused for good")
    dead.add_argument("action", nargs="?", choices=("list", "retry"), default="list")
    dead.add_argument("id", type=int, nargs="?", help="export id to send again (with retry)")
    dead.set_defaults(jobs_handler=run_dead_letter)


def run(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:

    journal = Journal(config.node.journal_url)
    try:
        return args.jobs_handler(args, journal, out)
    finally:
        journal.close()


def run_list(args, journal: Journal, out: TextIO) -> int:
    jobs = journal.jobs_in_state(*([args.state] if args.state else JobState))
    steps = journal.job_steps(*(j.id for j in jobs)) if jobs else {}
    rows = [{**dataclasses.asdict(j), "steps": steps_cell(steps[j.id])} for j in jobs]
    if args.json:  # each step's reason in full, as /v1/jobs/{id} has them
        rows = [{**row, "steps": [dataclasses.asdict(s) for s in steps[row["id"]]]} for row in rows]
    print_table(rows, JOB_COLUMNS, args.json, out)
    return 0


def steps_cell(steps: list[StepOutcome]) -> str:
    """A job's steps in one table cell: `lungs ok, covid failed` (the reasons are in `jobs show`)."""
    return ", ".join(f"{s.step} {s.state}" for s in steps)


def run_show(args, journal: Journal, out: TextIO) -> int:
    job = journal.get_job(args.id)
    if job is None:
        print(f"no job {args.id}", file=sys.stderr)
        return 1
    exports = [dataclasses.asdict(e) for e in journal.exports_in_state(*ExportState) if e.job_id == job.id]
    steps = journal.job_steps(job.id)[job.id]
    if args.json:
        print(json.dumps({**dataclasses.asdict(job), "steps": [dataclasses.asdict(s) for s in steps],
                          "exports": exports}, default=to_json), file=out)
        return 0
    for key, value in dataclasses.asdict(job).items():
        print(f"{key:20} {cell(value)}", file=out)
    for step in steps:
        print(f"{'step ' + step.step:20} {step.state}{': ' + step.reason if step.reason else ''}", file=out)
    print(file=out)
    print_table(exports, ("id", "destination", "state", "sop_instance_uid", "attempts", "reason"), False, out)
    return 0


def cli_actor() -> str:
    """Who an admin action of the CLI is audited as: the OS user who ran it."""
    return f"cli:{getpass.getuser()}"


def run_retry(args, journal: Journal, out: TextIO) -> int:
    jobs = journal.jobs_in_state(JobState.FAILED) if args.failed else [j for j in [journal.get_job(args.id)] if j]
    if not args.failed and not jobs:
        print(f"no job {args.id}", file=sys.stderr)
        return 1
    audit = AuditLog(journal)
    for job in jobs:
        try:
            requeue(audit, job, "the CLI", actor=cli_actor())
        except NotRetryable as error:
            print(error, file=sys.stderr)
            return 1
        print(f"job {job.id} ({job.pipeline}) requeued", file=out)
    return 0


def run_dead_letter(args, journal: Journal, out: TextIO) -> int:
    if args.action == "list":
        print_table([dataclasses.asdict(e) for e in journal.exports_in_state(ExportState.DEAD)], EXPORT_COLUMNS, args.json, out)
        return 0
    dead = {e.id: e for e in journal.exports_in_state(ExportState.DEAD)}
    if args.id not in dead:
        print(f"no dead-lettered export {args.id}", file=sys.stderr)
        return 1
    try:
        requeue_export(AuditLog(journal), dead[args.id], "the CLI", actor=cli_actor())
    except NotRetryable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"export {args.id} to {dead[args.id].destination} requeued", file=out)
    return 0
