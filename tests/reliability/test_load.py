"""Load: 8 storescu associations each sending its own 300-instance series, plus 2 sending the same
series at once: every instance stored once, every series complete once, every result in Orthanc once, and
the node's peak resident memory printed and bounded."""

from __future__ import annotations

import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from tests.peers import dcmtk, orthanc, peer_env, wait_for
from tests.peers.orthanc import Orthanc
from tests.reliability.node import node_with_pipeline, with_journal
from tests.reliability.process_stats import peak_rss_mb, peak_rss_with_children_mb
from tests.reliability.summary import CaseResult
from tests.series_factory import write_ct_series

pytestmark = [dcmtk.required(), orthanc.required()]

SERIES = 8
INSTANCES = 300
MAX_PEAK_RSS_MB = 2048  # 2,700 instances of 64 x 64 and nine small volumes: far below this unless something piles up


def _storescu(port: int, files: list[Path], log: Path) -> dcmtk.StoreResult:
    with open(log, "w") as out:
        returncode = subprocess.run(dcmtk.storescu_args(port, files), env=peer_env(), stdout=out,
                                    stderr=subprocess.STDOUT, timeout=600).returncode
    return dcmtk.StoreResult(returncode, log.read_text())


def test_eight_senders_plus_two_of_the_same_series(tmp_path, ledger, capsys):
    with ThreadPoolExecutor(max_workers=2) as pool:
        series = list(pool.map(lambda k: write_ct_series(tmp_path / f"s{k}", INSTANCES, rows=64, columns=64),
                               range(SERIES + 1)))
    shared = series[-1]  # sent by two associations at once
    jobs = [(files, tmp_path / f"storescu{k}.log") for k, files in enumerate(series[:SERIES])]
    jobs += [(shared, tmp_path / "storescu_shared_a.log"), (shared, tmp_path / "storescu_shared_b.log")]
    uids = [pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID for files in series]
    with Orthanc(tmp_path / "orthanc") as pacs:
        node = node_with_pipeline(tmp_path / "node", pacs.dicom_port, pacs_ae=pacs.ae_title,
                                  completion={"stable_seconds": 10, "after_release_seconds": 2}).start()
        try:
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                results = list(pool.map(lambda job: _storescu(node.port, *job), jobs))

            def all_sent():
                def read(journal):
                    exports = journal.exports_in_state("pending", "sent", "dead")
                    done = journal.jobs_in_state("done")
                    return len(done) == len(uids) and len(exports) == len(uids) and all(
                        e.state == "sent" for e in exports)
                return with_journal(node, read)
            wait_for(all_sent, 300, "every series processed and its result sent")
            peak = peak_rss_mb(node.process.pid)
            peak_total = peak_rss_with_children_mb(node.process.pid)

            def read_journal(journal):
                return ([(s.series_instance_uid, s.generation, s.instance_count, s.state)
                         for s in journal.series_in_state("receiving", "complete", "routed", "unmatched",
                                                          "quarantined")],
                        journal.all_instances(), journal.exports_in_state("sent"))
            series_rows, instances, exports = with_journal(node, read_journal)
            spooled = node.spool_files()
            stored = pacs.series()
            pacs_instances = pacs.instances()
        finally:
            node.stop()

    acknowledged = [len(r.acknowledged) for r in results]
    expected_instances = (SERIES + 1) * INSTANCES
    per_sop = Counter(i.sop_instance_uid for i in instances)
    lost = expected_instances - len(per_sop)  # every file was acknowledged (asserted below)
    ok = (acknowledged == [INSTANCES] * len(jobs) and len(instances) == len(spooled) == expected_instances
          and sorted(series_rows) == sorted((uid, 1, INSTANCES, "routed") for uid in uids)
          and len(pacs_instances) == len(exports) == len(uids))
    ledger.record(CaseResult("load", f"{SERIES} senders x {INSTANCES} + 2 of one series",
                             "each instance once, each series complete once, each result in Orthanc once",
                             f"acknowledged {sum(acknowledged)}, stored {len(instances)}, series {len(series_rows)}, "
                             f"Orthanc {len(pacs_instances)} SEG, peak RSS {peak:.0f} MB "
                             f"(with job workers {peak_total:.0f} MB)", ok, lost))
    with capsys.disabled():
        print(f"\nload: node peak RSS {peak:.0f} MB, with its job workers {peak_total:.0f} MB, after "
              f"{sum(acknowledged)} C-STOREs on {len(jobs)} associations")
    assert acknowledged == [INSTANCES] * len(jobs), [r.output[-500:] for r in results if r.returncode]
    assert len(instances) == len(spooled) == expected_instances and max(per_sop.values()) == 1
    assert sorted(series_rows) == sorted((uid, 1, INSTANCES, "routed") for uid in uids)
    assert len(pacs_instances) == len(exports) == len(uids)
    assert [item["MainDicomTags"].get("Modality") for item in stored] == ["SEG"] * len(uids)
    assert peak_total < MAX_PEAK_RSS_MB
