"""From the first C-STORE to the SEG stored in Orthanc, stage by stage.

    .venv/bin/python bench/end_to_end.py [--slices 20 300]

Runs `dicom-node serve` (embedded backend; the shipped config.yaml's
`spleen_ct` pipeline and `completion` settings, so the completion fast path
is the shipped one: complete `after_release_seconds` after the sender's
association ends) with Orthanc as the PACS on loopback, sends the real 20-slice
J2K series (storescu -xv) and a 300-slice series made from its slices
(tests/series_factory), and prints each stage from the journal's timestamps
and the job's log line:
receive (first to last instance acknowledged), wait-for-complete (last
instance to complete), route+queue (complete to job start), worker (handing
the job to its worker process, started with the node, and back), load / inference / encode (job log; inference includes opening the
model on the worker's first job),
dispatch (job done to Orthanc's C-STORE response for the SEG) and the total
from the moment storescu started, and how many slices the job's load found
decoded while the series arrived (dicom_node.pipeline.prepare). The SEG is then looked up in Orthanc's REST
API, so a figure is printed only for a SEG Orthanc really holds.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
import yaml  # noqa: E402

from bench.machine import run_header  # noqa: E402
from tests.peers import REPO, dcmtk, orthanc  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_orthanc_end_to_end import overrides, study_series  # noqa: E402
from tests.model_repository import install_spleen_model  # noqa: E402
from tests.test_pipeline import real_series  # noqa: E402
from tests.test_receive import running_node  # noqa: E402

SHIPPED = yaml.safe_load((REPO / "config.yaml").read_text())
JOB_LINE = re.compile(r"job (\d+) \(spleen_ct\) done: load ([\d.]+) s, inference ([\d.]+) s, encode ([\d.]+) s, "
                      r"\d+ result files; (\d+) of (\d+) slices decoded while the series arrived")


def run(root: Path, models: Path, files: list[Path], label: str, j2k: bool) -> None:
    study_uid, series_uid = (str(pydicom.dcmread(files[0], stop_before_pixels=True)[k].value)
                             for k in ("StudyInstanceUID", "SeriesInstanceUID"))
    with orthanc.Orthanc(root / "orthanc") as pacs, running_node(
            root / "node", **overrides(pacs, models, pipelines={"spleen_ct": SHIPPED["pipelines"]["spleen_ct"]},
                                       completion=SHIPPED["completion"])) as node:
        started = datetime.now(timezone.utc)
        result = dcmtk.storescu(node.port, files, extra=["-xv"] if j2k else [], timeout=600)
        assert result.returncode == 0, result.output
        journal = node.journal()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            sent = journal.exports_in_state("sent")
            if sent or journal.jobs_in_state("failed") or journal.exports_in_state("dead"):
                break
            time.sleep(0.05)
        instances = journal.series_instances(series_uid, 1)
        series = journal.get_series(series_uid, 1)
        (job,) = journal.jobs_in_state("queued", "running", "done", "failed")
        journal.close()
        in_orthanc = study_series(pacs, study_uid).get("SEG", [])
        if not sent or len(in_orthanc) != 1:
            print(f"{label}: no SEG in Orthanc (job {job.state}: {job.error})\n{node.log_text()[-3000:]}")
            return
        timings = JOB_LINE.search(node.log_text())
        if timings is None:
            print(f"{label}: the job's timing line is missing from the node log\n{node.log_text()[-3000:]}")
            return
        load, inference, encode = map(float, timings.groups()[1:4])
        prepared = f"{timings[5]} of {timings[6]} slices decoded while receiving"
    first = min(i.received_at for i in instances)
    last = max(i.received_at for i in instances)
    stages = {
        "receive": (last - first).total_seconds(),
        "wait-for-complete": (series.completed_at - last).total_seconds(),
        "route+queue": (job.started_at - series.completed_at).total_seconds(),
        "worker": (job.finished_at - job.started_at).total_seconds() - load - inference - encode,
        "load": load, "inference": inference, "encode": encode,
        "dispatch": (sent[0].sent_at - job.finished_at).total_seconds(),
    }
    total = (sent[0].sent_at - started).total_seconds()
    print(f"{label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + f"; total {total:.2f} s "
          f"({prepared})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[20, 300])
    args = parser.parse_args()
    print(run_header())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        install_spleen_model(models)
        for n in args.slices:
            if n == 20:
                files = real_series(root / "real20" / "series")
                run(root / "real20", models, files, "real J2K 20 slices", j2k=True)
            else:
                files = write_ct_series(root / f"ct{n}" / "series", n)
                run(root / f"ct{n}", models, files, f"{n} slices made from the real ones, uncompressed", j2k=False)


if __name__ == "__main__":
    main()
