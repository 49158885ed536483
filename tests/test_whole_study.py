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

import hashlib
import json
import re
import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom import sop_class as sc

from tests.model_repository import install_spleen_model
from tests.peers import REPO, dcmtk, free_port, orthanc, peer_env, wait_for
from tests.reliability.node import settled
from tests.study_factory import NON_IMAGE, study_objects, study_of
from tests.test_pipeline import real_series
from dicom_node.store.audit import AuditLog
from tests.series_factory import write_ct_series
from tests.test_api import samples
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


# Every syntax whose data set the node must store without understanding its pixels (PS3.5 A.4, 10):
# (transfer syntax, SOP class); the video syntaxes with a video class, as PS3.5 8.2.5 pairs them.
ENCAPSULATED = (
    ("1.2.840.10008.1.2.4.201", sc.CTImageStorage),  # HTJ2K lossless
    ("1.2.840.10008.1.2.4.202", sc.CTImageStorage),  # HTJ2K RPCL lossless
    ("1.2.840.10008.1.2.4.203", sc.CTImageStorage),  # HTJ2K
    ("1.2.840.10008.1.2.4.110", sc.CTImageStorage),  # JPEG XL lossless
    ("1.2.840.10008.1.2.4.111", sc.SecondaryCaptureImageStorage),  # JPEG XL JPEG recompression
    ("1.2.840.10008.1.2.4.112", sc.DigitalXRayImageStorageForPresentation),  # JPEG XL
    ("1.2.840.10008.1.2.4.92", sc.CTImageStorage),  # JPEG 2000 Part 2 multi-component lossless
    ("1.2.840.10008.1.2.4.93", sc.EnhancedCTImageStorage),  # JPEG 2000 Part 2 multi-component
    ("1.2.840.10008.1.2.8.1", sc.MRImageStorage),  # deflated image frame compression
    ("1.2.840.10008.1.2.4.100", sc.VideoEndoscopicImageStorage),  # MPEG2 MP@ML
    ("1.2.840.10008.1.2.4.100.1", sc.VideoEndoscopicImageStorage),
    ("1.2.840.10008.1.2.4.101", sc.VideoEndoscopicImageStorage),
    ("1.2.840.10008.1.2.4.101.1", sc.VideoEndoscopicImageStorage),
    ("1.2.840.10008.1.2.4.102", sc.VideoPhotographicImageStorage),  # MPEG-4 AVC/H.264
    ("1.2.840.10008.1.2.4.102.1", sc.VideoPhotographicImageStorage),
    ("1.2.840.10008.1.2.4.103", sc.VideoPhotographicImageStorage),
    ("1.2.840.10008.1.2.4.103.1", sc.VideoPhotographicImageStorage),
    ("1.2.840.10008.1.2.4.104", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.104.1", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.105", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.105.1", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.106", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.106.1", sc.VideoMicroscopicImageStorage),
    ("1.2.840.10008.1.2.4.107", sc.VideoEndoscopicImageStorage),  # HEVC/H.265 Main
    ("1.2.840.10008.1.2.4.108", sc.VideoEndoscopicImageStorage),  # HEVC/H.265 Main 10
)
DEFLATED = "1.2.840.10008.1.2.1.99"  # the whole data set deflated (PS3.5 A.5)


def _instance(folder: Path, sop_class_uid: str, transfer_syntax: str) -> tuple[Path, Dataset, bytes]:
    """A Part 10 file whose Pixel Data is encapsulated fragments no codec can read; its data set bytes (deflated
    for the deflated syntax) follow the file meta as they will go on the wire."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "ENCAPSULATED"
    if transfer_syntax != DEFLATED:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = 16, 16, 1, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = encapsulate([b"not a codestream " + transfer_syntax.encode() + b"\xff" * 7])
        ds["PixelData"].VR = "OB"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    if transfer_syntax == DEFLATED:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class_uid, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    header = DicomBytesIO()
    header.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(header.getvalue() + raw)
    return path, ds, raw


def test_every_encapsulated_and_deflated_syntax_is_stored_verbatim(tmp_path, monkeypatch):
    """pynetdicom sends each file's data set as it is in the file (chunked from disk, never decoded); the
    node must store those bytes, and could not decode them if it tried."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    (tmp_path / "files").mkdir()
    with running_node(tmp_path / "node") as node:
        ae = AE(ae_title="STORESCU")
        files = []
        for transfer_syntax, sop_class_uid in (*ENCAPSULATED, (DEFLATED, sc.BasicTextSRStorage)):
            files.append((transfer_syntax, *_instance(tmp_path / "files", sop_class_uid, transfer_syntax)))
            ae.add_requested_context(sop_class_uid, [transfer_syntax])
        association = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert association.is_established
        try:
            statuses = {ts: association.send_c_store(path).Status for ts, path, _, _ in files}
        finally:
            association.release()
        assert statuses == {ts: 0x0000 for ts, *_ in files}
        for transfer_syntax, _, ds, raw in files:
            stored = node.storage / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            assert dataset_bytes(stored) == raw, transfer_syntax
            assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax


def test_another_payload_under_a_stored_uid_is_acknowledged_and_quarantined(tmp_path):
    """A re-send in another transfer syntax is the same instance; other content under the same SOP Instance
    UID is answered success (as storescp does) but kept in the quarantine, logged, audited and counted."""
    (original,) = write_ct_series(tmp_path / "first", 1, rows=64, columns=64)
    changed = pydicom.dcmread(original)
    changed.PatientName, changed.InstanceNumber = "Other^Patient", 99
    edited = tmp_path / "edited.dcm"
    changed.save_as(edited, enforce_file_format=True)
    with running_node(tmp_path / "node") as node:
        assert dcmtk.storescu(node.port, [original]).returncode == 0
        implicit = dcmtk.storescu(node.port, [original], extra=["-xi"])  # the same content, other bytes
        assert implicit.statuses() == ["Success"], implicit.output
        assert not list((node.storage / "quarantine").iterdir())
        conflict = dcmtk.storescu(node.port, [edited])
        assert conflict.statuses() == ["Success"], conflict.output
        stored = spool_path(node, original)
        assert dataset_bytes(stored) == dataset_bytes(original)  # the first copy stays
        stored_digest = hashlib.sha256(dataset_bytes(original)).hexdigest()
        new_digest = hashlib.sha256(dataset_bytes(edited)).hexdigest()
        kept = node.storage / "quarantine" / f"{changed.SOPInstanceUID}.dcm"
        assert dataset_bytes(kept) == dataset_bytes(edited)
        reason = (node.storage / "quarantine" / f"{kept.name}.reason.txt").read_text()
        assert stored_digest in reason and new_digest in reason and "another payload" in reason
        log = node.log_text()
        assert "conflicting duplicate acknowledged and quarantined" in log
        assert stored_digest in log and new_digest in log
        journal = node.journal()
        try:
            (event,) = AuditLog(journal).query(event="quarantined")
        finally:
            journal.close()
        assert (event.calling_ae, event.series_instance_uid, event.status) == \
            ("STORESCU", changed.SeriesInstanceUID, "conflicting duplicate")
        assert new_digest in event.detail
        assert samples(node)[("dicom_node_conflicting_duplicates_total", (("calling_ae", "STORESCU"),))] == 1


def test_non_image_series_are_forwarded_but_offered_to_no_pipeline(tmp_path):
    """A pipeline whose conditions any series meets still never gets an SR, KOS or PDF; a forward rule sends
    them on as received."""
    study = study_of(real_series(tmp_path / "ct", count=1)[0])
    objects = study_objects(tmp_path / "study", study)
    reports = [objects[name] for name in ("dose-sr", "kos", "pdf")]
    pacs_port, pacs_dir = free_port(), tmp_path / "pacs"
    anything = {"calling_ae": "STORESCU"}
    with dcmtk.storescp(pacs_port, pacs_dir, extra=["+xa"]), running_node(
            tmp_path / "node",
            pipelines={"lungs": {"match": anything, "steps": [{"name": "lungs", "task": "lung_classical"}],
                                 "outputs": ["seg"], "destinations": ["pacs"]}},
            forward={"archive": {"match": anything, "destinations": ["pacs"]}},
            destinations={"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}}) as node:
        result = dcmtk.storescu(node.port, reports, extra=["-R"])
        assert result.returncode == 0 and len(result.acknowledged) == len(reports), result.output
        for path in reports:
            series_uid = str(pydicom.dcmread(path).SeriesInstanceUID)
            record, jobs = wait_for(lambda: settled(node, series_uid), timeout=60, what=f"{path.name} settled")
            assert record.state == "routed" and [(j.kind, j.pipeline) for j in jobs] == [("forward", "archive")], (path, record)
        forwarded = wait_for(lambda: len(_scp_files(pacs_dir)) == len(reports) and _scp_files(pacs_dir),
                             timeout=60, what="the reports at the PACS")
        for path in reports:
            uid = str(pydicom.dcmread(path).SOPInstanceUID)
            assert _content(forwarded[uid]) == _content(path)
