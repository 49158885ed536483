"""STOW-RS receive: dicomweb-client (a real DICOMweb client) storing into a running `dicom-node serve`.

Every refusal is checked against the spool and the journal: nothing half-stored.
The whole path (stored, complete, routed, SEG at Orthanc) runs once with the
spleen model; the protocol cases share one node without models and small limits.
"""

from __future__ import annotations

import io
import json
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicom_node.config import ConfigError, load_config
from dicom_node.receive.multipart import MalformedMultipart, MultipartParser, PartData, PartEnd, PartStart
from tests.model_repository import install_spleen_model
from tests.peers import dcmtk, orthanc, wait_for
from tests.test_orthanc_end_to_end import SHIPPED_PIPELINES, needs_peers, overrides, study_series
from tests.test_pipeline import real_series
from tests.test_receive import Node, dataset_bytes, running_node

pytestmark = dcmtk.required()

SENDER, TOKEN = "CLOUD-GW", "stow-sender-token-0123456789"
OTHER_TOKEN = "another-token-that-names-no-one"
BOUNDARY = "node-test-boundary"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"


def stow_section(**limits) -> dict:
    return {"stow": {"senders": [{"name": SENDER, "token": TOKEN}], **limits}}


def client(node: Node, token: str = TOKEN) -> DICOMwebClient:
    return DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def encoded(ds: pydicom.Dataset) -> bytes:
    """The bytes dicomweb-client puts in a part for `ds` (it encodes each data set with dcmwrite)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def post(node: Node, parts: list[tuple[str, bytes]], *, path: str = "/dicomweb/studies", token: str = TOKEN,
         content_type: str = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
         body: bytes | None = None) -> requests.Response:
    if body is None:
        body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
                        for kind, data in parts) + f"--{BOUNDARY}--\r\n".encode()
    return requests.post(f"http://127.0.0.1:{node.http_port}{path}", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})


def journaled(node: Node) -> dict[str, object]:
    journal = node.journal()
    try:
        return {record.sop_instance_uid: record for record in journal.all_instances()}
    finally:
        journal.close()


def held(node: Node) -> tuple[list[Path], set[str], list[Path]]:
    """What the node holds: spool files, journaled SOP Instance UIDs, files anywhere else under its spool."""
    stray = [p for p in (node.storage / "spool").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    return node.spool_files(), set(journaled(node)), stray


def assert_durable(node: Node, response: pydicom.Dataset, sent: dict[str, bytes]) -> None:
    """Every instance the response references is in the spool with the data set it was sent with, and journaled
    under the sender's name."""
    rows = journaled(node)
    for item in response.ReferencedSOPSequence:
        uid = item.ReferencedSOPInstanceUID
        row = rows[uid]
        assert row.calling_ae == SENDER and row.sop_class_uid == item.ReferencedSOPClassUID
        stored = Path(row.path)
        assert stored.name == f"{uid}.dcm"
        assert dataset_bytes(stored) == _data_set(sent[uid]), f"{uid}: data set differs from the part sent"
        assert item.RetrieveURL.endswith(f"/studies/{row.study_instance_uid}/series/{row.series_instance_uid}"
                                         f"/instances/{uid}")


def _data_set(part10: bytes) -> bytes:
    """The data set of a Part 10 file in memory (after the meta group, whose length (0002,0000) gives)."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    return part10[144 + int.from_bytes(part10[140:144], "little"):]


# --- the whole path -------------------------------------------------------------------------------


@needs_peers
def test_series_over_stow_is_stored_completed_routed_and_its_seg_reaches_orthanc(tmp_path):
    files = real_series(tmp_path / "series")
    datasets = [pydicom.dcmread(f) for f in files]
    study_uid, series_uid = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    install_spleen_model(tmp_path / "models")
    spleen = {**SHIPPED_PIPELINES["spleen_ct"]}
    spleen["match"] = {**spleen["match"], "calling_ae": SENDER}  # routed by the sender's name
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", http=stow_section(),
            **overrides(pacs, tmp_path / "models", pipelines={"spleen_ct": spleen})) as node:
        response = client(node).store_instances(datasets)
        assert len(response.ReferencedSOPSequence) == 20 and "FailedSOPSequence" not in response
        assert response.RetrieveURL.endswith(f"/dicomweb/studies/{study_uid}")
        assert_durable(node, response, {ds.SOPInstanceUID: encoded(ds) for ds in datasets})

        record = node.wait_for_completion(series_uid, timeout=30)
        assert record.calling_ae == SENDER and record.instance_count == 20
        assert node.logs(f"series complete (release): study={study_uid} series={series_uid}")
        seg = wait_for(lambda: study_series(pacs, study_uid).get("SEG"), 240, "a SEG series in Orthanc")
        assert len(seg) == 1

        base = f"http://127.0.0.1:{node.http_port}"
        audit = requests.get(f"{base}/v1/audit", params={"event": "received"}, timeout=10).json()
        assert [(a["calling_ae"], a["series_instance_uid"], a["instance_count"]) for a in audit] == \
            [(SENDER, series_uid, 20)]
        assert "over STOW-RS" in audit[0]["detail"]
        status = requests.get(f"{base}/v1/status", timeout=30).json()
        stored_bytes = sum(Path(row.path).stat().st_size for row in journaled(node).values())
        assert status["received"] == {"dimse": {"instances": 0, "bytes": 0},
                                      "stow": {"instances": 20, "bytes": stored_bytes}}
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert f'dicom_node_instances_received_total{{calling_ae="{SENDER}",transport="stow"}} 20.0' in metrics


# --- the protocol cases, on one node without models -----------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("stow"), http=stow_section(max_request_mb=0.5, max_instances=4)) as running:
        yield running


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in real_series(tmp_path_factory.mktemp("series"), count=6)]


def fresh(series: list[pydicom.Dataset], count: int) -> list[pydicom.Dataset]:
    """`count` slices as new instances of a new series (so each test stores what no other test stored)."""
    series_uid, copies = generate_uid(), []
    for ds in series[:count]:
        copy = pydicom.dcmread(io.BytesIO(encoded(ds)))
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy.SeriesInstanceUID = series_uid
        copies.append(copy)
    return copies


def test_stored_instances_are_durable_and_a_resend_is_stored_once(node, series):
    datasets = fresh(series, 3)
    response = client(node).store_instances(datasets)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == \
        [ds.SOPInstanceUID for ds in datasets]
    assert_durable(node, response, {ds.SOPInstanceUID: encoded(ds) for ds in datasets})
    before = held(node)
    again = client(node).store_instances(datasets[:1])
    assert again.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == datasets[0].SOPInstanceUID
    assert held(node) == before  # acknowledged, kept once
    other = pydicom.dcmread(io.BytesIO(encoded(datasets[1])))
    other.PatientComments = "another payload under the same SOP Instance UID"
    conflicting = client(node).store_instances([other])
    assert conflicting.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert held(node) == before and (node.storage / "quarantine" / f"{other.SOPInstanceUID}.dcm").exists()
    assert dataset_bytes(Path(journaled(node)[other.SOPInstanceUID].path)) == _data_set(encoded(datasets[1]))


def test_wrong_or_missing_token_is_401_and_stores_nothing(node, series):
    datasets = fresh(series, 1)
    before = held(node)
    with pytest.raises(requests.HTTPError) as refused:
        client(node, OTHER_TOKEN).store_instances(datasets)
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"] == "Bearer"
    response = requests.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", data=encoded(datasets[0]),
                             headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert response.status_code == 401
    assert held(node) == before


def test_oversized_request_is_413_and_stores_nothing(node, series):
    datasets = fresh(series, 6)  # about 150 KB a slice, with max_request_mb 0.5
    before = held(node)
    with pytest.raises(requests.HTTPError) as refused:
        client(node).store_instances(datasets)
    assert refused.value.response.status_code == 413
    assert "max_request_mb" in refused.value.response.json()["detail"]
    # Chunked, with no Content-Length: refused while it streams.
    parts = [("application/dicom", encoded(ds)) for ds in datasets]
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {k}\r\n\r\n".encode() + d + b"\r\n" for k, d in parts)
    chunked = requests.post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", timeout=60,
                            data=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                            headers={"Authorization": f"Bearer {TOKEN}",
                                     "Content-Type": f'multipart/related; type="application/dicom"; '
                                                     f'boundary={BOUNDARY}'})
    assert chunked.status_code == 413
    too_many = post(node, [("application/dicom", b"\0" * 200)] * 5)  # five small parts: over max_instances 4
    assert too_many.status_code == 413 and "max_instances" in too_many.json()["detail"]
    assert held(node) == before


def test_malformed_multipart_is_400_and_stores_nothing(node, series):
    (ds,) = fresh(series, 1)
    before = held(node)
    whole = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + encoded(ds)
    cut_off = post(node, [], body=whole)  # no closing delimiter: the sender stopped mid-body
    assert cut_off.status_code == 400 and "closing boundary" in cut_off.json()["detail"]
    no_boundary = post(node, [], body=whole, content_type='multipart/related; type="application/dicom"')
    assert no_boundary.status_code == 400
    broken_header = post(node, [], body=f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode())
    assert broken_header.status_code == 400 and "header line" in broken_header.json()["detail"]
    not_multipart = post(node, [], body=encoded(ds), content_type="application/dicom")
    assert not_multipart.status_code == 415
    metadata = post(node, [], body=whole, content_type=f'multipart/related; type="application/dicom+json"; '
                                                       f'boundary={BOUNDARY}')
    assert metadata.status_code == 415
    assert held(node) == before


def test_non_dicom_parts_fail_with_c000_beside_stored_ones(node, series):
    good, wrapped = fresh(series, 2)
    before_files, before_rows, _ = held(node)
    response = post(node, [("application/dicom", encoded(good)), ("text/plain", b"hello, not an image"),
                           ("application/octet-stream", encoded(wrapped)), ("application/dicom", b"\0" * 300)])
    assert response.status_code == 202 and response.headers["content-type"] == "application/dicom+json"
    body = pydicom.Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert [i.FailureReason for i in body.FailedSOPSequence] == [0xC000] * 3
    # The DICOM file sent as application/octet-stream is named by its UIDs; the others have none to read.
    assert [i.get("ReferencedSOPInstanceUID") for i in body.FailedSOPSequence] == [None, wrapped.SOPInstanceUID,
                                                                                    None]
    files, rows, stray = held(node)
    assert rows - before_rows == {good.SOPInstanceUID} and len(files) == len(before_files) + 1 and not stray
    only_text = post(node, [("text/plain", b"nothing to store")])
    assert only_text.status_code == 400 and "no part is a usable DICOM instance" in only_text.json()["detail"]
    assert held(node)[1] == rows


def test_instances_of_another_study_than_the_url_fail_with_a900(node, series):
    datasets = fresh(series, 2)
    before = held(node)
    response = post(node, [("application/dicom", encoded(ds)) for ds in datasets],
                    path=f"/dicomweb/studies/{generate_uid()}")
    assert response.status_code == 409
    body = pydicom.Dataset.from_json(response.json())
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in body.FailedSOPSequence] == \
        [(ds.SOPInstanceUID, 0xA900) for ds in datasets]
    assert "study instance UID does not match" in node.log_text()
    assert held(node) == before
    right = post(node, [("application/dicom", encoded(ds)) for ds in datasets],
                 path=f"/dicomweb/studies/{datasets[0].StudyInstanceUID}")
    assert right.status_code == 200


def test_stow_is_refused_without_senders_and_keeps_the_admin_token_apart(tmp_path):
    admin = "admin-token-0123456789abcdef"
    with running_node(tmp_path / "node", http={"bearer_token": admin}) as node:
        response = post(node, [("application/dicom", b"")], token=admin)
        assert response.status_code == 403 and "http.stow.senders" in response.json()["detail"]
        request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/v1/status",
                                         headers={"Authorization": f"Bearer {admin}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["received"] == {"dimse": {"instances": 0, "bytes": 0},
                                                     "stow": {"instances": 0, "bytes": 0}}


def test_disk_under_the_floor_fails_each_instance_with_a700(tmp_path, series):
    (ds,) = fresh(series, 1)
    with running_node(tmp_path / "node", http=stow_section(), node={"min_free_disk_mb": 10**9}) as node:
        response = post(node, [("application/dicom", encoded(ds))])
        assert response.status_code == 409
        body = pydicom.Dataset.from_json(response.json())
        assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in body.FailedSOPSequence] == \
            [(ds.SOPInstanceUID, 0xA700)]
        assert held(node) == ([], set(), [])
        assert f"STOW-RS refused (0xA700) from {SENDER}" in node.log_text()


# --- the parser and the configuration -------------------------------------------------------------


def test_multipart_parser_gives_the_same_parts_whatever_the_chunking():
    contents = [bytes(random.Random(n).randbytes(5000)) + b"\r\n--node-test-boundar" for n in range(3)]
    body = (b"preamble\r\n" + b"".join(f"--{BOUNDARY} \r\nContent-Type: application/dicom\r\n\r\n".encode() + c
                                       + b"\r\n" for c in contents) + f"--{BOUNDARY}--\r\nepilogue".encode())
    for seed in range(50):
        rng, parser, events, at = random.Random(seed), MultipartParser(BOUNDARY), [], 0
        while at < len(body):
            step = rng.randint(1, 700)
            events += parser.feed(body[at:at + step])
            at += step
        list(parser.close())
        parts, current = [], b""
        for event in events:
            if isinstance(event, PartStart):
                assert event.content_type == "application/dicom"
                current = b""
            elif isinstance(event, PartData):
                current += event.data
            elif isinstance(event, PartEnd):
                parts.append(current)
        assert parts == contents
    truncated = MultipartParser(BOUNDARY)
    list(truncated.feed(body[:3000]))
    with pytest.raises(MalformedMultipart, match="inside part 1"):
        list(truncated.close())


def test_check_config_refuses_shared_or_admin_sender_tokens(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"http:\n  bearer_token: {TOKEN}\n  stow:\n    senders:\n"
                    f"      - {{name: A, token: {TOKEN}}}\n      - {{name: 'B\\\\C', token: {OTHER_TOKEN}}}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    text = str(refused.value)
    assert "sender name" in text and "admin bearer_token" not in text  # field errors come first
    path.write_text(f"http:\n  bearer_token: {TOKEN}\n  stow:\n    senders:\n      - {{name: A, token: {TOKEN}}}\n")
    with pytest.raises(ConfigError, match="admin bearer_token"):
        load_config(path)
    path.write_text(f"http:\n  stow:\n    senders:\n      - {{name: A, token: {OTHER_TOKEN}}}\n"
                    f"      - {{name: B, token: {OTHER_TOKEN}}}\n")
    with pytest.raises(ConfigError, match="share a token"):
        load_config(path)
