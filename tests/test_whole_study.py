"""A whole study as real senders send it: every object besides the CT images is stored, none is refused.

dcmtk's storescu (one association, halting on the first failure as it does
by default), dcmsend on a folder, and Orthanc's store job (a PACS routing
rule) each send a study of CT, enhanced CT, MR, PET, DX, MG, US, SC, SEG,
KOS, GSPS, encapsulated PDF, RT Dose, RT Structure Set, X-Ray Radiation Dose
SR and Comprehensive SR (tests/study_factory.py). Every instance must be in
the spool as sent, with the content dcmtk's storescp stores from the same
files; the CT series must get its spleen SEG and no other series a job.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.model_repository import install_spleen_model
from tests.peers import REPO, dcmtk, free_port, orthanc, peer_env, wait_for
from tests.reliability.node import settled, with_journal
from tests.study_factory import NON_IMAGE, study_objects, study_of
from tests.test_pipeline import real_series
from tests.test_receive import dataset_bytes, running_node, spool_path

needs_peers = pytest.mark.skipif(not (dcmtk.available() and orthanc.available()),
                                 reason="dcmtk and Orthanc needed (apt-get install dcmtk orthanc)")
SPLEEN_CT = yaml.safe_load((REPO / "config.yaml").read_text())["pipelines"]["spleen_ct"]


def _scp_files(folder: Path) -> dict[str, Path]:
    """What storescp wrote, by SOP Instance UID."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir()
            if p.is_file()}


def _content(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    del ds.file_meta
    return ds


@needs_peers
def test_a_whole_study_from_storescu_dcmsend_and_orthanc_is_stored_and_only_the_ct_routed(tmp_path):
    ct = real_series(tmp_path / "storescu" / "ct")
    study = study_of(ct[0])
    by_storescu = study_objects(tmp_path / "storescu" / "other", study)
    by_dcmsend = study_objects(tmp_path / "dcmsend", study)  # new series and SOP UIDs, the same study
    by_orthanc = study_objects(tmp_path / "orthanc-files", study)
    models = tmp_path / "models"
    install_spleen_model(models)
    pacs_port, pacs_dir = free_port(), tmp_path / "pacs"
    # The PACS, and the reference for what a Storage SCP stores: dcmtk's storescp accepting every syntax.
    with dcmtk.storescp(pacs_port, pacs_dir, extra=["+xa"], log=tmp_path / "storescp.log"), \
            orthanc.Orthanc(tmp_path / "orthanc") as router:
        node_sections = {
            "security": {"calling_aes": [{"ae_title": "STORESCU"}, {"ae_title": router.ae_title}]},
            "inference": {"backend": "embedded", "model_repository": str(models), "embedded": {"cpu_threads": 2}},
            "pipelines": {"spleen_ct": SPLEEN_CT},
            "destinations": {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
            "results": {"compress_frames": False},
        }
        with running_node(tmp_path / "node", **node_sections) as node:
            # storescu: one association, -R proposes the files' classes, -xv their JPEG 2000 syntax
            sent = [*ct, *by_storescu.values()]
            result = dcmtk.storescu(node.port, sent, extra=["-R", "-xv"])
            assert result.returncode == 0 and len(result.acknowledged) == len(sent), result.output
            reference = dcmtk.storescu(pacs_port, sent, called_ae="STORESCP", extra=["-R", "-xv"])
            assert reference.returncode == 0, reference.output

            dcmsend = subprocess.run([dcmtk.tool("dcmsend"), "-v", "-aet", "STORESCU", "-aec", "DICOMNODE",
                                      "127.0.0.1", str(node.port), "+sd", str(tmp_path / "dcmsend")],
                                     env=peer_env(), capture_output=True, text=True, timeout=120)
            assert dcmsend.returncode == 0, dcmsend.stdout + dcmsend.stderr
            summary = dcmsend.stdout + dcmsend.stderr
            assert re.search(rf"with status SUCCESS\s*:\s*{len(by_dcmsend)}\n", summary), summary

            router_ids = [router.post("/instances", path.read_bytes())["ID"] for path in by_orthanc.values()]
            router.put("/modalities/node", {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node.port})
            job = router.post("/modalities/node/store", json.dumps({"Resources": router_ids,
                                                                   "Synchronous": True}).encode(), timeout=120)
            assert job.get("FailedInstancesCount", 0) == 0 and job["InstancesCount"] == len(by_orthanc), job

            # Every instance as sent (dataset bytes), with the content storescp stored from the same files.
            reference_files = _scp_files(pacs_dir)
            for path in [*sent, *by_dcmsend.values(), *by_orthanc.values()]:
                stored = spool_path(node, path)
                assert stored.exists(), f"{path} not in the spool"
                assert dataset_bytes(stored) == dataset_bytes(path), f"{path}: dataset bytes differ"
            for path in sent:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                assert _content(spool_path(node, path)) == _content(reference_files[uid]), path
            assert not list((node.storage / "quarantine").glob("*.dcm"))

            # The CT series gets its SEG; every other series settles with no job, non-images said so.
            ct_series = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
            outcomes = {}
            for name, path in [("ct", ct[0]), *by_storescu.items()]:
                series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
                outcomes[name] = wait_for(lambda: settled(node, series_uid), timeout=300,
                                          what=f"series {name} settled")
            ct_record, ct_jobs = outcomes.pop("ct")
            assert ct_record.state == "routed" and [(j.pipeline, j.state) for j in ct_jobs] == [("spleen_ct", "done")]
            for name, (record, jobs) in outcomes.items():
                assert record.state == "unmatched" and jobs == [], (name, record)
                if name in NON_IMAGE:
                    assert "not an image series" in record.reason, (name, record.reason)


            def produced() -> list[str]:  # the series each SEG the node sent references
                return [str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) for ds in
                        (pydicom.dcmread(p) for p in pacs_dir.iterdir() if p.name.startswith("SG"))
                        if "ReferencedSeriesSequence" in ds]
            wait_for(produced, timeout=60, what="the spleen SEG at the PACS")
            assert produced() == [ct_series]
