"""The HTTP API of a running `dicom-node serve` over real HTTP, fed by dcmtk storescu.

Health, readiness that flips with the disk floor, a pipeline degraded by its missing model,
Prometheus counters that move after a send (parsed with prometheus_client's
own parser), the audit trail, retry of a failed job through POST, the bearer
token, JSON log lines that carry the series and job, graceful SIGTERM, and a
request that fails on a lost journal: a 500 the node's log explains.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.store.journal import Journal
from tests.model_repository import install_spleen_model
from tests.peers import REPO, ManagedProcess, dcmtk, free_port, wait_for, wait_for_port
from tests.series_factory import write_ct_series
from tests.test_pipeline import real_series
from tests.test_receive import Node, running_node, spool_path

pytestmark = dcmtk.required()

SPLEEN = {"match": {"modality": "CT"}, "steps": [{"name": "spleen", "task": "segmentation", "model": "spleen_ct"}],
          "outputs": ["seg"]}
TOKEN = "s3cret-token-of-the-admin"


def http(node: Node, path: str, method: str = "GET", token: str | None = None,
         host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{host}:{node.http_port}{path}", method=method, headers=headers or {})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(node: Node, path: str, expect: int = 200, **kwargs):
    status, body = http(node, path, **kwargs)
    assert status == expect, (path, status, body)
    return json.loads(body)


def samples(node: Node, **kwargs) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    status, body = http(node, "/metrics", **kwargs)
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def with_new_sop_uids(files: list[Path]) -> list[Path]:
    """real_series keeps the shared files' SOP Instance UIDs; a second copy needs its own."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    return files


def test_health_metrics_audit_and_series_after_a_storescu_send(tmp_path):
    files = write_ct_series(tmp_path / "series", 5)
    with running_node(tmp_path / "node") as node:
        assert get_json(node, "/healthz") == {"status": "alive"}
        ready = get_json(node, "/readyz")
        assert ready["ready"] and {c["name"] for c in ready["checks"]} == {"journal", "disk", "dicom port"}
        before = samples(node)
        assert ("dicom_node_instances_received_total", (("calling_ae", "STORESCU"), ("transport", "dimse"))) not in before

        result = dcmtk.storescu(node.port, files)
        assert result.returncode == 0, result.output
        assert dcmtk.echoscu(node.port, calling_ae="INTRUDER").returncode != 0
        series_uid = node.wait_for_completion(_series_uid(files)).series_instance_uid

        after = wait_for(lambda: (s := samples(node)).get(("dicom_node_series", (("state", "unmatched"),))) and s,
                         30, "the series counted as unmatched")
        assert after[("dicom_node_instances_received_total", (("calling_ae", "STORESCU"), ("transport", "dimse")))] == 5
        assert after[("dicom_node_received_bytes_total", (("calling_ae", "STORESCU"), ("transport", "dimse")))] == \
            sum(spool_path(node, f).stat().st_size for f in files)  # the Part 10 files as stored
        assert after[("dicom_node_associations_total", (("calling_ae", "STORESCU"), ("outcome", "released")))] == 1
        assert after[("dicom_node_associations_rejected_total", (("reason", "calling AE not recognized"),))] == 1
        assert after[("dicom_node_associations_open", ())] == 0
        assert after[("dicom_node_series_completed_total", (("trigger", "release"),))] == 1
        assert after[("dicom_node_stage_seconds_count", (("stage", "wait_for_complete"),))] == 1
        assert after[("dicom_node_disk_free_bytes", ())] > 0
        assert after[("dicom_node_quarantined_files", ())] == 0

        (received,) = get_json(node, "/v1/audit?event=received")
        assert (received["calling_ae"], received["host"], received["series_instance_uid"],
                received["instance_count"], received["status"]) == ("STORESCU", "127.0.0.1", series_uid, 5, "released")
        detail = get_json(node, f"/v1/series/{series_uid}")
        assert [(g["generation"], g["instance_count"], g["state"]) for g in detail["generations"]] == \
            [(1, 5, "unmatched")]
        assert detail["jobs"] == [] and detail["audit"][0]["event"] == "received"
        assert http(node, "/v1/series/1.2.3.4")[0] == 404
        paths = get_json(node, "/openapi.json")["paths"]
        assert {"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/jobs", "/v1/series/{series_instance_uid}",
                "/v1/jobs/{job_id}/retry", "/v1/audit"} <= set(paths)


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_readiness_fails_while_free_disk_is_under_the_floor(tmp_path):
    with running_node(tmp_path / "node", node={"min_free_disk_mb": 1024 ** 3}) as node:
        assert get_json(node, "/healthz") == {"status": "alive"}  # alive, yet not ready
        ready = get_json(node, "/readyz", expect=503)
        assert not ready["ready"]
        (reason,) = ready["reasons"]
        assert reason.startswith("disk: ") and "floor is 1073741824 MB" in reason


def test_missing_model_degrades_the_pipeline_not_readiness_and_a_post_retries_the_failed_job(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    node = Node(tmp_path / "node", inference={"model_repository": str(models)}, pipelines={"spleen_ct": SPLEEN})
    node.process = ManagedProcess([REPO / ".venv" / "bin" / "dicom-node", "serve", "--config", node.config_path,
                                   "--log-format", "json"], log=node.log)
    try:
        wait_for_port(node.port, timeout=30, process=node.process.process)
        assert get_json(node, "/readyz")["ready"]  # it takes images; its one pipeline is degraded
        (health,) = get_json(node, "/v1/status")["pipelines"]
        assert (health["pipeline"], health["state"]) == ("spleen_ct", "degraded")
        assert health["reasons"][0].startswith("step spleen: model spleen_ct not available: "), health
        assert samples(node)[("dicom_node_pipeline_ready", (("pipeline", "spleen_ct"),))] == 0
        (model,) = get_json(node, "/v1/models")
        assert (model["name"], model["ready"], model["pipelines"]) == ("spleen_ct", False, ["spleen_ct"])

        files = real_series(tmp_path / "series")
        assert dcmtk.storescu(node.port, files, extra=["-xv"]).returncode == 0
        job = wait_for(lambda: [j for j in get_json(node, "/v1/jobs?state=failed")], 60, "the job failing")[0]
        assert job["error"].startswith("no step gave a result: spleen: failed (model spleen_ct is not installed")
        (step,) = get_json(node, f"/v1/jobs/{job['id']}")["steps"]
        assert (step["step"], step["state"]) == ("spleen", "failed") and "spleen_ct" in step["reason"]
        assert http(node, f"/v1/jobs/{job['id']}/retry", method="POST")[0] == 202  # failed jobs can be retried

        job = wait_for(lambda: [j for j in get_json(node, "/v1/jobs?state=failed")], 60, "the retry failing again")[0]
        install_spleen_model(models)
        (health,) = get_json(node, "/v1/status")["pipelines"]  # flips without a restart
        assert (health["state"], health["reasons"]) == ("ready", [])
        assert samples(node)[("dicom_node_pipeline_ready", (("pipeline", "spleen_ct"),))] == 1
        (model,) = get_json(node, "/v1/models")
        assert (model["ready"], model["task"], model["labels"]) == (True, "segmentation", ["Spleen"])

        status, body = http(node, f"/v1/jobs/{job['id']}/retry", method="POST")
        assert status == 202 and json.loads(body)["state"] == "queued"
        done = wait_for(lambda: (j := get_json(node, f"/v1/jobs/{job['id']}")["job"])["state"] == "done" and j,
                        180, "the retried job")
        assert done["attempts"] == 3 and done["error"] is None and done["kind"] == "pipeline"
        assert [j["id"] for j in get_json(node, "/v1/jobs?kind=pipeline")] == [job["id"]]
        assert get_json(node, "/v1/jobs?kind=forward") == []
        assert get_json(node, f"/v1/jobs/{job['id']}")["steps"] == [{"step": "spleen", "state": "ok", "reason": None}]
        assert http(node, f"/v1/jobs/{job['id']}/retry", method="POST")[0] == 202  # done jobs can be rerun too
        assert http(node, "/v1/jobs/9999/retry", method="POST")[0] == 404

        metrics = samples(node)
        for stage in ("load", "inference", "encode"):
            assert metrics[("dicom_node_stage_seconds_count", (("stage", stage),))] >= 1
        events = [e["event"] for e in get_json(node, f"/v1/audit?job_id={job['id']}")]
        assert events.count("retry") == 3 and "produced" in events
    finally:
        node.stop()

    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    about_job = [line for line in lines if line["logger"] == "dicom_node.pipeline.runner" and f"job {job['id']}" in line["message"]]
    assert about_job, node.log_text()[-3000:]
    for line in about_job:  # the job id, series and study UIDs as their own fields
        assert line["job_id"] == job["id"] and line["series_instance_uid"] == job["series_instance_uid"]
        assert line["study_instance_uid"].startswith("1.")
    # A model not installed is a state, not a fault: one WARNING per run naming step, model and job, no traceback.
    missing = [line for line in lines if line["logger"] == "dicom_node.pipeline.job" and "step spleen not run" in line["message"]]
    assert len(missing) == 2, node.log_text()[-3000:]  # the first run and the first retry
    for line in missing:
        assert line["level"] == "WARNING" and "exception" not in line and line["job_id"] == job["id"]
        assert f"job {job['id']} (spleen_ct)" in line["message"] and "model spleen_ct" in line["message"]
    assert not [line for line in lines if "Traceback" in line.get("exception", "") and "spleen_ct" in line["message"]]


def test_bearer_token_guards_everything_but_healthz(tmp_path):
    with running_node(tmp_path / "node", http={"bearer_token": TOKEN}) as node:
        assert http(node, "/healthz")[0] == 200
        for path in ("/readyz", "/metrics", "/v1/jobs", "/v1/audit", "/openapi.json"):
            assert http(node, path)[0] == 401, path
            assert http(node, path, token="wrong-token-wrong-token")[0] == 401, path
            assert http(node, path, token=TOKEN)[0] == 200, path
        assert http(node, "/v1/jobs/1/retry", method="POST")[0] == 401


def test_a_web_page_cannot_drive_the_loopback_api(tmp_path):
    """No token on loopback: a cross-site POST (its Origin) and a DNS-rebinding page (its Host) are refused;
    the admin's own client, with no Origin or the API's own, gets through."""
    with running_node(tmp_path / "node") as node:
        own = f"127.0.0.1:{node.http_port}"
        assert http(node, "/v1/jobs/1/retry", method="POST", headers={"Origin": "http://evil.example"})[0] == 403
        assert http(node, "/v1/jobs/1/retry", method="POST", headers={"Origin": "null"})[0] == 403
        assert http(node, "/v1/jobs", headers={"Host": f"evil.example:{node.http_port}"})[0] == 403
        assert http(node, "/v1/jobs/1/retry", method="POST",
                    headers={"Host": "evil.example", "Origin": "http://evil.example"})[0] == 403
        assert http(node, "/v1/jobs/1/retry", method="POST", headers={"Origin": f"http://{own}"})[0] == 404
        assert http(node, "/v1/jobs/1/retry", method="POST")[0] == 404  # no such job: the request got through
        assert http(node, "/v1/jobs", headers={"Host": f"localhost:{node.http_port}"})[0] == 200
        assert http(node, "/v1/jobs", headers={"Origin": "http://evil.example"})[0] == 200  # reads are not refused


def test_off_loopback_the_token_is_required_and_no_path_reaches_a_file(tmp_path):
    """Bound to another address (127.0.0.2 stands in for the hospital LAN) the API refuses
    requests without the token; with it, path-traversal UIDs and ids read nothing from disk."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the API")
    with running_node(tmp_path / "node", http={"host": "127.0.0.2", "bearer_token": TOKEN}) as node:
        wait_for_port(node.http_port, host="127.0.0.2")
        assert http(node, "/v1/jobs", host="127.0.0.2")[0] == 401
        assert http(node, "/v1/jobs", host="127.0.0.2", token=TOKEN)[0] == 200
        relative = "..%2F" * 12 + str(secret).lstrip("/").replace("/", "%2F")
        for path in (f"/v1/series/{relative}", "/v1/series/..%2F..%2F..%2Fetc%2Fpasswd", f"/v1/jobs/{relative}",
                     f"/v1/audit?series_instance_uid={relative}", "/../../etc/passwd", f"/{relative}",
                     "/v1/models/..%2F..%2Fetc%2Fpasswd"):
            status, body = http(node, path, host="127.0.0.2", token=TOKEN)
            assert status in (200, 404, 422), (path, status)
            assert b"not for the API" not in body and b"root:" not in body, path


def test_sigterm_lets_the_running_job_finish_keeps_queued_jobs_and_exits_0(tmp_path):
    models = tmp_path / "models"
    install_spleen_model(models)
    first, second = real_series(tmp_path / "first"), with_new_sop_uids(real_series(tmp_path / "second"))
    node = Node(tmp_path / "node", inference={"model_repository": str(models), "workers": 1},
                pipelines={"spleen_ct": SPLEEN}).start()
    try:
        assert dcmtk.storescu(node.port, first + second, extra=["-xv"]).returncode == 0  # both complete at release
        journal = node.journal()
        try:
            wait_for(lambda: len(journal.jobs_in_state("running")) == 1 and len(journal.jobs_in_state("queued")) == 1,
                     60, "one job running and one queued")
        finally:
            journal.close()
        assert node.process.stop(timeout=300, first_signal=signal.SIGTERM) == 0
    finally:
        node.stop()
    assert "shutting down: no new associations" in node.log_text() and "stopped" in node.log_text()
    wal = node.storage / "journal.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed into the database file
    journal = Journal(f"sqlite:///{node.storage / 'journal.sqlite'}")
    try:
        assert sorted(j.state for j in journal.jobs_in_state("queued", "running", "done", "failed")) == ["done", "queued"]
    finally:
        journal.close()

    node.start()  # the queued job runs after the restart
    try:
        journal = node.journal()
        try:
            wait_for(lambda: [j.state for j in journal.jobs_in_state("queued", "running", "done", "failed")]
                     == ["done", "done"], 180, "the queued job after the restart")
        finally:
            journal.close()
    finally:
        node.stop()


def test_dispatch_failures_and_dead_letters_are_counted_and_audited(tmp_path):
    from tests.phantoms import chest_phantom, write_ct_volume

    lungs = {"match": {"modality": "CT"}, "steps": [{"name": "lungs", "task": "lung_classical"}],
             "outputs": ["seg"], "destinations": ["pacs"]}
    down = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "timeout_s": 5,
                     "retry": {"max_attempts": 1}}}  # nothing listens there: the first failure is the last
    files = write_ct_volume(chest_phantom().volume, tmp_path / "phantom")
    with running_node(tmp_path / "node", pipelines={"lungs_ct": lungs}, destinations=down,
                      results={"compress_frames": False}) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        metrics = wait_for(lambda: (s := samples(node)).get(("dicom_node_dead_letters", (("destination", "pacs"),)))
                           and s, 180, "the SEG dead-lettered")
        assert metrics[("dicom_node_dead_letters", (("destination", "pacs"),))] == 1
        assert metrics[("dicom_node_dispatch_failures_total",
                        (("destination", "pacs"), ("reason", "transient:association")))] == 1
        assert metrics[("dicom_node_jobs", (("pipeline", "lungs_ct"), ("state", "done")))] == 1
        assert metrics[("dicom_node_stage_seconds_count", (("stage", "dispatch"),))] == 1
        (failed,) = get_json(node, "/v1/audit?event=failed")
        assert (failed["destination"], failed["instance_count"], failed["status"]) == ("pacs", 0, "0/1 stored")
        assert "no association" in failed["detail"]
        (produced,) = get_json(node, "/v1/audit?event=produced")
        assert (produced["instance_count"], produced["status"]) == (1, "done")


def test_a_request_the_lost_journal_cannot_answer_is_a_500_the_log_explains(tmp_path, postgres_server):
    """The journal's PostgreSQL database dropped under a running node: a request that reads it fails with
    500 and a JSON reason, the node's log names the request and has the traceback, and the process still
    answers."""
    url = postgres_server.new_database()
    with running_node(tmp_path / "node", node={"journal_url": url}) as node:
        assert get_json(node, "/v1/jobs") == []
        postgres_server.drop_database(url)
        status, body = http(node, "/v1/jobs")
        assert status == 500 and "the node's log has the details" in json.loads(body)["detail"]
        log = node.log_text()
        assert "HTTP GET /v1/jobs failed" in log and "Traceback (most recent call last)" in log, log[-3000:]
        assert get_json(node, "/healthz") == {"status": "alive"}
