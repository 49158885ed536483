"""From the first C-STORE to the SEG stored at the PACS, stage by stage.

    .venv/bin/python bench/end_to_end.py [--slices 20 300]

Runs `dicom-node serve` (embedded backend, spleen_ct from models/ with the
demo ONNX of ../shared/models) and dcmtk's storescp as the PACS on loopback,
sends the real 20-slice J2K series (storescu -xv) and a 300-slice series made
from it (tests/series_factory), and prints each stage from the journal's
timestamps and the job's log line:
receive (first to last instance), wait-for-complete (last instance to
complete), load / inference / encode (job log), dispatch (job done to SEG
acknowledged by the PACS) and the total from the moment storescu started.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from tests.peers import REPO, SHARED_MODELS, free_port  # noqa: E402
from tests.peers import dcmtk  # noqa: E402
from tests.series_factory import write_ct_series  # noqa: E402
from tests.test_pipeline import real_series  # noqa: E402
from tests.test_receive import running_node  # noqa: E402

SPLEEN = {"match": {"modality": "CT"}, "steps": [{"name": "spleen", "task": "segmentation", "model": "spleen_ct"}],
          "outputs": ["seg"], "destinations": ["pacs"]}
JOB_LINE = re.compile(r"job (\d+) \(spleen_ct\) done: load ([\d.]+) s, inference ([\d.]+) s, encode ([\d.]+) s")


def model_repository(target: Path) -> Path:
    entry = target / "spleen_ct"
    (entry / "1").mkdir(parents=True)
    for name in ("config.pbtxt", "pipeline.yaml"):
        shutil.copyfile(REPO / "models" / "spleen_ct" / name, entry / name)
    shutil.copyfile(SHARED_MODELS / "spleen_ct_demo" / "1" / "model.onnx", entry / "1" / "model.onnx")
    return target


def run(root: Path, files: list[Path], label: str, j2k: bool) -> None:
    pacs_port = free_port()
    overrides = {
        "inference": {"backend": "embedded", "model_repository": str(model_repository(root / "models"))},
        "pipelines": {"spleen_ct": SPLEEN},
        "destinations": {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
        "results": {"compress_frames": False},
        "completion": {"stable_seconds": 30, "after_release_seconds": 1},
    }
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with dcmtk.storescp(pacs_port, root / "pacs"), running_node(root / "node", **overrides) as node:
        started = datetime.now(timezone.utc)
        result = dcmtk.storescu(node.port, files, extra=["-xv"] if j2k else [])
        assert result.returncode == 0, result.output
        journal = node.journal()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sent = journal.exports_in_state("sent")
            if sent or journal.jobs_in_state("failed") or journal.exports_in_state("dead"):
                break
            time.sleep(0.05)
        instances = journal.series_instances(series_uid, 1)
        series = journal.get_series(series_uid, 1)
        (job,) = journal.jobs_in_state("done", "failed")
        journal.close()
        if not sent:
            print(f"{label}: no SEG reached the PACS (job {job.state}: {job.error})\n{node.log_text()[-3000:]}")
            return
        load, inference, encode = map(float, JOB_LINE.search(node.log_text()).groups()[1:])
        first = min(i.received_at for i in instances)
        last = max(i.received_at for i in instances)
        stages = {
            "receive": (last - first).total_seconds(),
            "wait-for-complete": (series.completed_at - last).total_seconds(),
            "load": load, "inference": inference, "encode": encode,
            "dispatch": (sent[0].sent_at - job.finished_at).total_seconds(),
        }
        total = (sent[0].sent_at - started).total_seconds()
        print(f"{label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + f"; total {total:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[20, 300])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.slices:
            if n == 20:
                run(root / "real20", real_series(root / "real20" / "series"), "real J2K 20 slices", j2k=True)
            else:
                files = write_ct_series(root / f"ct{n}" / "series", n)
                run(root / f"ct{n}", files, f"synthetic {n} slices", j2k=False)


if __name__ == "__main__":
    main()
