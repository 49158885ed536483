"""The inference API and the model admin API of a running node, through requests and curl.

One node for the module (bearer token, the spleen pipeline, one job worker), fed the real
20-slice CT by storescu so the pipeline's own SEG is the reference: a NIfTI upload and a zip
of the series give that mask voxel for voxel, Accept: application/dicom a SEG dciodvfy takes.
Bad uploads get their 4xx and leave the node answering. A model version installed by PUT is
the one the next job runs; a broken one is refused and installs nothing; DELETE follows its rule.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from sqlalchemy import select

from dicom_node.ops.model_admin import InstalledModel, ModelRefused, install_model, remove_model
from dicom_node.pipeline.job import source_headers
from dicom_node.pipeline.volume import load_series
from dicom_node.pipeline.workers import _FirstComeSlots
from dicom_node.results.segread import read_seg
from dicom_node.states import JobState
from dicom_node.store.journal import JobRecord, Journal
from dicom_node.store.schema import jobs
from tests.model_repository import SPLEEN_ONNX, install_spleen_model
from tests.peers import REPO, dciodvfy, dcmtk, wait_for
from tests.test_api import with_new_sop_uids
from tests.test_pipeline import real_series
from tests.test_receive import Node

pytestmark = [dcmtk.required(), dciodvfy.required()]

TOKEN = "viewer-and-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPLEEN = {"match": {"modality": "CT"}, "steps": [{"name": "spleen", "task": "segmentation", "model": "spleen_ct"}],
          "outputs": ["seg"]}
MAX_UPLOAD_MB = 12


class ApiNode:
    """The running node, its base URL, and the reference: the pipeline's SEG of the real series."""

    def __init__(self, node: Node, files: list[Path], seg: Path) -> None:
        self.node = node
        self.url = f"http://127.0.0.1:{node.http_port}"
        self.files = files
        self.seg = seg
        self.repository = node.root / "models"

    def post(self, path: str, data: bytes, accept: str = "*/*") -> requests.Response:
        return requests.post(self.url + path, data=data, headers={**AUTH, "Accept": accept}, timeout=300)


def finished_job(journal_url: str, series_instance_uid: str) -> JobRecord | None:
    journal = Journal(journal_url)
    try:
        return next(iter(journal.select(JobRecord, select(jobs).where(
            jobs.c.series_instance_uid == series_instance_uid, jobs.c.state == JobState.DONE))), None)
    finally:
        journal.close()


def send_and_wait(node: Node, files: list[Path]):
    """storescu the series; the pipeline's finished job."""
    assert dcmtk.storescu(node.port, files, extra=["-xv"]).returncode == 0
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    url = node.configured_journal_url or f"sqlite:///{node.storage / 'journal.sqlite'}"
    return wait_for(lambda: finished_job(url, series_uid), 120, f"the job of {series_uid}\n{node.log_text()}")


ADMIN_UPLOAD_TIMEOUT_S = 8  # long enough for the tests' real uploads on a loaded machine


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[ApiNode]:
    root = tmp_path_factory.mktemp("api-node")
    install_spleen_model(root / "models")
    node = Node(root, http={"bearer_token": TOKEN, "infer": {"max_upload_mb": MAX_UPLOAD_MB, "max_queued": 0},
                                 "admin": {"upload_timeout_s": ADMIN_UPLOAD_TIMEOUT_S}},
                inference={"model_repository": str(root / "models"), "workers": 1},
                pipelines={"spleen_ct": SPLEEN})
    node.start()
    try:
        files = real_series(root / "series")
        job = send_and_wait(node, files)
        (seg,) = Path(job.output_dir).glob("SEG_*.dcm")
        yield ApiNode(node, files, seg)
    finally:
        node.stop()


def pipeline_mask(api: ApiNode) -> np.ndarray:
    """The pipeline's SEG as a label map on the series' volume grid ([k, j, i])."""
    sources, _ = source_headers(load_series(api.files))
    return read_seg(api.seg, sources).masks[1].array


def series_zip(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, path in enumerate(files):
            archive.write(path, f"series/{number:04d}.dcm")
    return buffer.getvalue()


def read_mask(data: bytes, folder: Path) -> np.ndarray:
    path = folder / "mask.nii.gz"
    path.write_bytes(data)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_nifti_upload_gives_the_pipelines_mask_with_its_measurements(api, tmp_path):
    volume = load_series(api.files).volume
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(nifti))
    response = api.post("/v1/infer/spleen_ct", nifti.read_bytes())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    mask = read_mask(response.content, tmp_path)
    reference = pipeline_mask(api)
    assert mask.shape == reference.shape and reference.sum() > 1000  # the spleen is in these slices
    assert np.array_equal(mask, reference)
    (segment,) = json.loads(response.headers["X-Measurements"])["segments"]
    assert (segment["name"], segment["voxels"]) == ("Spleen", int(reference.sum()))
    assert segment["volume_ml"] == pytest.approx(reference.sum() * np.prod(volume.spacing) / 1000, rel=1e-3)


def test_dicom_zip_by_curl_gives_the_same_mask_and_a_seg_dciodvfy_accepts(api, tmp_path):
    upload = tmp_path / "series.zip"
    upload.write_bytes(series_zip(api.files))
    headers, body = tmp_path / "headers.txt", tmp_path / "mask.nii.gz"
    done = subprocess.run(["curl", "-sS", "-o", str(body), "-D", str(headers), "-w", "%{http_code}",
                           "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/zip",
                           "--data-binary", f"@{upload}", f"{api.url}/v1/infer/spleen_ct"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout == "200", (done.stdout, done.stderr, body.read_bytes()[:500])
    assert np.array_equal(read_mask(body.read_bytes(), tmp_path), pipeline_mask(api))
    measured = next(line for line in headers.read_text().splitlines() if line.lower().startswith("x-measurements:"))
    assert json.loads(measured.split(":", 1)[1])["steps"] == [{"step": "spleen", "state": "ok", "reason": None}]

    response = api.post("/v1/infer/spleen_ct", upload.read_bytes(), accept="application/dicom")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(response.content)
    validation = dciodvfy.validate(seg_path)
    assert not validation.errors, validation.report()
    seg = pydicom.dcmread(seg_path)
    reference = pydicom.dcmread(api.seg)
    assert seg.Modality == "SEG" and seg.SOPInstanceUID != reference.SOPInstanceUID  # its own UIDs
    sources, _ = source_headers(load_series(api.files))
    assert np.array_equal(read_seg(seg_path, sources).masks[1].array, pipeline_mask(api))


def two_series_zip(files: list[Path], tmp_path: Path) -> bytes:
    other = real_series(tmp_path / "other", count=3)
    return series_zip(files[:3] + other)


def test_bad_uploads_get_4xx_and_the_node_keeps_answering(api, tmp_path):
    good_zip = series_zip(api.files)
    rng = np.random.default_rng(7)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkInt16), str(flat))
    cases = {
        "over http.infer.max_upload_mb": (rng.bytes((MAX_UPLOAD_MB + 1) * 1024 * 1024), 413),
        "random bytes": (rng.bytes(4096), 415),
        "a truncated zip": (good_zip[: len(good_zip) // 2], 422),
        "two series in one zip": (two_series_zip(api.files, tmp_path), 422),
        "a 2-D NIfTI": (flat.read_bytes(), 422),
    }
    for what, (data, status) in cases.items():
        response = api.post("/v1/infer/spleen_ct", data)
        assert response.status_code == status, (what, response.status_code, response.text)
        assert response.json()["detail"], what
    assert api.post("/v1/infer/no_such_thing", good_zip).status_code == 404
    assert api.post("/v1/infer/spleen_ct", b"x" * 100, accept="text/html").status_code == 406
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(load_series(api.files).volume.to_sitk(), str(nifti))
    assert api.post("/v1/infer/spleen_ct", nifti.read_bytes(), accept="application/dicom").status_code == 406
    assert requests.post(f"{api.url}/v1/infer/spleen_ct", data=good_zip, timeout=30).status_code == 401

    assert requests.get(f"{api.url}/healthz", timeout=10).json() == {"status": "alive"}
    # A good request still works: the volume at half the in-plane resolution (a quarter of the work).
    image = sitk.ReadImage(str(nifti))
    sitk.WriteImage(sitk.Shrink(image, [2, 2, 1]), str(nifti))
    response = api.post("/v1/infer/spleen_ct", nifti.read_bytes(), accept="application/json")
    assert response.status_code == 200 and response.json()["segments"][0]["voxels"] > 100, response.text
    audit = requests.get(f"{api.url}/v1/audit?event=inferred&limit=20", headers=AUTH, timeout=10).json()
    assert {"413", "415", "422", "200"} <= {row["status"] for row in audit}
    assert all(row["detail"].startswith("by token: ") for row in audit)


def test_a_request_beyond_the_cap_gets_503_with_retry_after(api):
    """max_concurrent 1 + max_queued 0: while one request is admitted (half its body sent, over a raw
    socket so no client library buffers it), the next is refused at once, before its body is read."""
    with socket.create_connection(("127.0.0.1", api.node.http_port), timeout=60) as first:
        first.sendall(f"POST /v1/infer/spleen_ct HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Length: 2048\r\n\r\n".encode() + b"\0" * 1024)
        (busy,) = wait_for(lambda: (r := api.post("/v1/infer/spleen_ct", b"\0" * 1024)).status_code == 503
                           and (r,), 30, "a request beyond http.infer.max_concurrent refused")  # a 503 is falsy
        assert busy.headers["Retry-After"] == "30" and "max_concurrent" in busy.json()["detail"]
        first.sendall(b"\0" * 1024)
        answer = first.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 415 "), answer  # the admitted one was read to its end: zeros, no volume


def test_worker_slots_go_to_whoever_asked_first():
    """A job waiting for the one worker gets it before inference requests that asked after it."""
    slots = _FirstComeSlots(["the worker"])
    held = slots.take()
    order: list[str] = []

    def wait_turn(who: str) -> None:
        slot = slots.take()
        order.append(who)
        slots.give_back(slot)

    threads = []
    for who in ("job", "request 1", "request 2"):
        threads.append(threading.Thread(target=wait_turn, args=(who,)))
        threads[-1].start()
        wait_for(lambda: len(slots._waiting) == len(threads), 10, f"{who} waiting")
    slots.give_back(held)
    for thread in threads:
        thread.join(10)
    assert order == ["job", "request 1", "request 2"]


def put_model(api: ApiNode, name: str, files: dict) -> requests.Response:
    return requests.put(f"{api.url}/admin/model/{name}", files=files, headers=AUTH, timeout=300)


def versions(api: ApiNode, name: str = "spleen_ct") -> list[str]:
    return sorted(p.name for p in (api.repository / name).iterdir() if p.name.isdigit())


def test_a_model_version_put_is_run_by_the_next_job_and_a_broken_one_installs_nothing(api, tmp_path):
    config = (REPO / "models" / "spleen_ct" / "config.pbtxt").read_bytes()
    broken = put_model(api, "spleen_ct", {"config": ("config.pbtxt", config),
                                          "model": ("model.onnx", SPLEEN_ONNX.read_bytes()[:50_000])})
    assert broken.status_code == 422 and "ONNX Runtime cannot load" in broken.json()["detail"], broken.text
    mismatched = put_model(api, "spleen_ct", {"config": ("config.pbtxt", config.replace(b"-1, 2, -1", b"-1, 3, -1")),
                                              "model": ("model.onnx", SPLEEN_ONNX.read_bytes())})
    assert mismatched.status_code == 422 and "OUTPUT__0" in mismatched.json()["detail"], mismatched.text
    renamed = put_model(api, "spleen_ct", {"config": ("config.pbtxt", config.replace(b'"spleen_ct"', b'"liver"')),
                                           "model": ("model.onnx", SPLEEN_ONNX.read_bytes())})
    assert renamed.status_code == 422 and "'liver'" in renamed.json()["detail"], renamed.text
    assert versions(api) == ["1"]
    assert (api.repository / "spleen_ct" / "config.pbtxt").read_bytes() == config  # the live entry untouched
    assert not [p for p in api.repository.iterdir() if p.name.startswith(".")]  # no staging left behind

    installed = put_model(api, "spleen_ct", {"config": ("config.pbtxt", config),
                                             "model": ("model.onnx", SPLEEN_ONNX.read_bytes())})
    assert installed.status_code == 201, installed.text
    assert (installed.json()["version"], installed.json()["new_model"]) == (2, False)
    assert versions(api) == ["1", "2"]

    files = with_new_sop_uids(real_series(tmp_path / "again"))
    job = send_and_wait(api.node, files)
    lines = requests.get(f"{api.url}/logs?lines=500", headers=AUTH, timeout=10).text.splitlines()
    assert any(f"job {job.id} (spleen_ct): step spleen runs model spleen_ct version 2" in line for line in lines), \
        "\n".join(lines[-40:])
    everything = requests.get(f"{api.url}/logs?lines=100000", headers=AUTH, timeout=10)
    assert everything.status_code == 200 and len(lines) <= len(everything.text.splitlines()) <= 5000  # capped

    audit = requests.get(f"{api.url}/v1/audit?event=model_installed", headers=AUTH, timeout=10).json()
    assert [row["status"] for row in audit] == ["ok", "refused", "refused", "refused"]
    assert audit[0]["detail"].startswith("by token: spleen_ct version 2 (sha256 ")


def model_zip(members: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)  # S_IFLNK: a symbolic link
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_zipped_model_folders_and_delete(api):
    config = (REPO / "models" / "spleen_ct" / "config.pbtxt").read_bytes().replace(b'"spleen_ct"', b'"spleen_copy"')
    pipeline = (REPO / "models" / "spleen_ct" / "pipeline.yaml").read_bytes()
    folder = {"spleen_copy/config.pbtxt": config, "spleen_copy/pipeline.yaml": pipeline,
              "spleen_copy/7/model.onnx": SPLEEN_ONNX.read_bytes()}
    for members, link in (({**folder, "../escape.txt": b"x"}, None), (folder, "spleen_copy/7/extra"),
                          ({k: v for k, v in folder.items() if "pipeline" not in k}, None)):
        refused = put_model(api, "spleen_copy", {"archive": ("model.zip", model_zip(members, link))})
        assert refused.status_code == 422, refused.text
    assert not (api.repository / "spleen_copy").exists()

    installed = requests.put(f"{api.url}/admin/model/spleen_copy", data=model_zip(folder), timeout=300,
                             headers={**AUTH, "Content-Type": "application/zip"})
    assert installed.status_code == 201, installed.text
    assert (installed.json()["version"], installed.json()["new_model"]) == (1, True)  # the zip's 7 is ignored
    models = requests.get(f"{api.url}/v1/models", headers=AUTH, timeout=60).json()
    assert {m["name"]: m["ready"] for m in models} == {"spleen_ct": True, "spleen_copy": True}

    delete = f"{api.url}/admin/model/"
    assert requests.delete(delete + "spleen_ct", headers=AUTH, timeout=30).status_code == 409  # the pipeline's
    assert requests.delete(delete + "spleen_ct?version=9", headers=AUTH, timeout=30).status_code == 404
    removed = requests.delete(delete + "spleen_ct?version=2", headers=AUTH, timeout=30)
    assert removed.status_code == 200 and removed.json()["versions"] == [2], removed.text
    assert versions(api) == ["1"]  # version 1 serves again
    assert requests.delete(delete + "spleen_copy", headers=AUTH, timeout=30).json()["whole_model"] is True
    assert not (api.repository / "spleen_copy").exists()
    assert requests.delete(delete + "spleen_copy", headers=AUTH, timeout=30).status_code == 404
    audit = requests.get(f"{api.url}/v1/audit?event=model_removed", headers=AUTH, timeout=10).json()
    assert [row["status"] for row in audit] == ["refused", "ok", "ok", "refused", "refused"]


def test_install_and_remove_without_http(tmp_path):
    """The functions an admin page calls: typed results, ModelRefused with the status, the versions
    already there kept as the same files (a worker that loaded them does not load them again)."""
    repository = tmp_path / "models"
    entry = install_spleen_model(repository)
    first = (entry / "1" / "model.onnx").stat().st_ino
    installed = install_model(repository, "spleen_ct", entry / "config.pbtxt", SPLEEN_ONNX, max_model_mb=100)
    assert installed == InstalledModel("spleen_ct", 2, entry, entry / "2" / "model.onnx", installed.sha256, False)
    assert (entry / "1" / "model.onnx").stat().st_ino == first
    with pytest.raises(ModelRefused) as refused:
        install_model(repository, "spleen_ct", entry / "config.pbtxt", SPLEEN_ONNX, max_model_mb=1)
    assert refused.value.status == 413 and "http.admin.max_model_mb" in refused.value.detail
    with pytest.raises(ModelRefused) as refused:
        remove_model(repository, "spleen_ct", {"spleen_ct": ["spleen_ct"]})
    assert refused.value.status == 409
    removed = remove_model(repository, "spleen_ct", {"spleen_ct": ["spleen_ct"]}, force=True)
    assert (removed.versions, removed.whole_model, removed.degraded_pipelines) == ((1, 2), True, ("spleen_ct",))
    assert list(repository.iterdir()) == []


def test_a_model_upload_that_stops_arriving_gets_408_and_installs_nothing(api):
    entry = api.repository / "spleen_ct"
    versions = sorted(p.name for p in entry.iterdir() if p.name.isdigit())
    with socket.create_connection(("127.0.0.1", api.node.http_port), timeout=60) as client:
        client.sendall(f"PUT /admin/model/spleen_ct HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                       f"Content-Type: application/zip\r\nContent-Length: 4096\r\n\r\n".encode() + b"PK" * 512)
        answer = client.makefile("rb").readline()  # the rest of the body never comes
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert sorted(p.name for p in entry.iterdir() if p.name.isdigit()) == versions
    assert requests.get(api.url + "/healthz", timeout=30).status_code == 200
    (latest, *_) = requests.get(f"{api.url}/v1/audit?event=model_installed", headers=AUTH, timeout=10).json()
    assert latest["status"] == "refused" and "upload_timeout_s" in latest["detail"]
