"""The triton backend over a pool of two independent KServe v2 servers (tests/kserve_server.py).

Every sliding-window batch is one request: the pool sends them round-robin,
so both servers serve one series, and the mask is exactly the embedded
backend's. Through a node with Orthanc as the PACS, one server killed by pid
while it serves the node's job costs the series one failed request, which goes
to the other server: the SEG still arrives, with the same mask, and the node's
metrics and status say which server is down, as `models check` does. The killed
server, started again on its ports, gets requests again once its readiness
probe answers. A server that hangs (stopped with SIGSTOP: its port still takes
connections, nothing answers) costs a series one request that times out, over
gRPC or HTTP, and the other server serves the rest.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import threading

import numpy as np
import psutil
import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.metrics import InferenceServerCollector, NodeMetrics
from dicom_node.ops import models
from dicom_node.pipeline.health import inference_servers
from dicom_node.pipeline.volume import load_series
from dicom_node.results.segread import read_seg
from inference import tasks
from inference.backends import BackendSettings, open_backend
from inference.repository import ModelRepository
from tests.peers import REPO, dcmtk, orthanc, wait_for
from tests.peers.kserve import KServeServer
from tests.test_api import get_json, samples
from tests.test_orthanc_end_to_end import (SHIPPED_PIPELINES, download, needs_peers, overrides, study_series,
                                          uid_of)
from tests.test_pipeline import real_series
from tests.test_receive import running_node
from tests.test_spleen import ct, embedded_mask, make_repository  # noqa: F401  (module fixtures)

BACKOFF_S = 1.0


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A spleen repository that asks one patch per request (25 requests for the 20-slice series), two servers serving it,
    and a pool backend over both; yields (repository, [server A, server B], backend, log folder)."""
    root = tmp_path_factory.mktemp("pool")
    make_repository(root / "models")
    spec = root / "models" / "spleen_ct" / "pipeline.yaml"
    spec.write_text(spec.read_text().replace("batch_size: 4 ", "batch_size: 1 "))
    servers: list[KServeServer | None] = [None, None]

    def start(i: int) -> None:
        servers[i] = KServeServer(root / "models", root / f"kserve{i}.log")

    starters = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()
    backend = None
    try:
        assert all(servers), "a KServe server did not start (see its log above)"
        backend = open_backend(BackendSettings(kind="triton", urls=tuple(s.grpc_url for s in servers),
                                               timeout_s=120, retries=3, backoff_s=BACKOFF_S))
        yield ModelRepository(root / "models"), servers, backend, root
    finally:
        if backend is not None:
            backend.close()
        for server in servers:
            if server is not None:
                server.stop()


def segment_counting(ct, entry, backend):  # noqa: F811
    """tasks.segment through the pool; the label map, the number of requests it made and the requests per
    (server, outcome) the pool sent."""
    backend.drain_counts()
    calls = [0]

    class Counting:
        def infer(self, entry, inputs):
            calls[0] += 1
            return backend.infer(entry, inputs)

    labels = tasks.segment(ct, entry, Counting())
    return labels, calls[0], backend.drain_counts()


def test_requests_go_round_robin_to_both_servers(pool, ct, embedded_mask):  # noqa: F811
    repository, servers, backend, _ = pool
    labels, requests, counts = segment_counting(ct, repository.get("spleen_ct"), backend)
    np.testing.assert_array_equal(labels.volume.array, embedded_mask.volume.array)
    a, b = (counts.get((s.grpc_url, "ok"), 0) for s in servers)
    assert requests > 10 and a + b == requests and abs(a - b) <= 1, counts
    assert not any(outcome == "failed" for _, outcome in counts)


@needs_peers
def test_node_on_the_pool_delivers_the_seg_to_orthanc_while_a_server_is_killed(pool, embedded_mask, tmp_path):  # noqa: F811
    """A node with the pool as its backend and Orthanc as its PACS: server B is killed by pid once it is
    busy with the job's requests; the SEG still arrives with the embedded backend's mask, and the node's
    metrics, /v1/status and `dicom-node status` say which server failed and is down."""
    repository, servers, _, _ = pool
    a_url, b_url = (s.grpc_url for s in servers)
    files = real_series(tmp_path / "series")
    study_uid = uid_of(files[0], "StudyInstanceUID")
    inference = {"backend": "triton", "model_repository": str(repository.path),
                 "triton": {"urls": [a_url, b_url], "timeout_s": 120, "backoff_s": BACKOFF_S}}
    b_process = psutil.Process(servers[1].pid)
    b_idle_cpu = sum(b_process.cpu_times()[:2])
    with orthanc.Orthanc(tmp_path / "orthanc") as pacs, running_node(
            tmp_path / "node", **overrides(pacs, pipelines={"spleen_ct": SHIPPED_PIPELINES["spleen_ct"]}),
            inference=inference) as node:
        result = dcmtk.storescu(node.port, files, extra=["-xv"])
        assert result.returncode == 0, result.output
        # B is mid-series once it has spent CPU on the job's patches: then it is killed.
        wait_for(lambda: sum(b_process.cpu_times()[:2]) - b_idle_cpu > 0.5, 120, "server B serving the job")
        servers[1].kill()
        (seg_series,) = wait_for(lambda: study_series(pacs, study_uid).get("SEG"), 240, "a SEG series in Orthanc")
        (seg_path,) = download(pacs, seg_series, tmp_path / "from_orthanc")
        metrics = samples(node)
        status = get_json(node, "/v1/status")
        printed = subprocess.run([REPO / ".venv" / "bin" / "dicom-node", "status", "--config", node.config_path],
                                 capture_output=True, text=True, timeout=120)
    loaded = load_series(files)
    seg = read_seg(seg_path, [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices])
    np.testing.assert_array_equal(seg.masks[1].array, embedded_mask.volume.array == 1)

    def requests(server: str, outcome: str) -> float:
        return metrics.get(("dicom_node_inference_requests_total", (("outcome", outcome), ("server", server))), 0)

    assert requests(b_url, "failed") >= 1, metrics
    assert requests(a_url, "ok") > requests(b_url, "ok") > 0, metrics
    assert metrics[("dicom_node_inference_server_up", (("server", a_url),))] == 1
    assert metrics[("dicom_node_inference_server_up", (("server", b_url),))] == 0
    servers_state = {s["url"]: s for s in status["inference_servers"]}
    assert servers_state[a_url]["up"] and not servers_state[b_url]["up"]
    assert [p["state"] for p in status["pipelines"]] == ["ready"]  # A serves every model
    lines = printed.stdout.splitlines()
    assert "inference servers" in lines, printed.stdout + printed.stderr
    assert any(line.split() == [a_url, "up"] for line in lines), printed.stdout
    assert any(line.split()[:2] == [b_url, "down"] for line in lines), printed.stdout


def test_models_check_and_metrics_report_each_server(pool, tmp_path):
    repository, servers, backend, _ = pool
    a_url, b_url = (s.grpc_url for s in servers)
    assert not servers[1].alive()  # killed by the test before
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"""
node: {{storage_dir: {tmp_path / "storage"}}}
inference:
  backend: triton
  model_repository: {repository.path}
  triton: {{urls: ["{a_url}", "{b_url}"], retries: 0, backoff_s: {BACKOFF_S}}}
pipelines:
  spleen_ct:
    match: {{modality: CT}}
    steps: [{{name: spleen, task: segmentation, model: spleen_ct}}]
    outputs: [seg]
    destinations: [pacs]
destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 4242}}
""")
    config = load_config(config_path)
    parser = argparse.ArgumentParser(prog="dicom-node")
    models.add_parser(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    assert models.run(parser.parse_args(["models", "check"]), config, out) == 0
    lines = out.getvalue().splitlines()
    assert "spleen_ct: ok (triton)" in lines
    assert "pipeline spleen_ct: ready" in lines  # one server serves every model
    assert f"triton server {a_url}: up" in lines
    (b_line,) = [line for line in lines if line.startswith(f"triton server {b_url}: down (")]
    assert "connect" in b_line.lower() or "unavailable" in b_line.lower(), b_line

    metrics = NodeMetrics()
    metrics.add_collector(InferenceServerCollector(lambda: inference_servers(config, lambda: (repository, backend))))
    text = metrics.exposition().decode()
    assert f'dicom_node_inference_server_up{{server="{a_url}"}} 1.0' in text
    assert f'dicom_node_inference_server_up{{server="{b_url}"}} 0.0' in text


def test_restarted_server_gets_requests_again(pool):
    repository, servers, backend, root = pool
    servers[1] = KServeServer(repository.path, root / "kserve1-again.log",
                              ports=(servers[1].http_port, servers[1].grpc_port))
    # Its back-off passes (nothing probes it meanwhile): the first request that finds it due probes it.
    wait_for(lambda: backend.pool.states()[1].probe_in_s == 0, 30, "server B's back-off to pass")
    entry = repository.get("spleen_ct")
    patch = {entry.pipeline.input.name: np.zeros((1, 1, 96, 96, 96), np.float32)}
    backend.drain_counts()
    for _ in range(4):
        backend.infer(entry, patch)
    counts = backend.drain_counts()
    assert set(counts) == {(servers[0].grpc_url, "ok"), (servers[1].grpc_url, "ok")}, counts  # both serve
    assert sum(counts.values()) == 4, counts
    assert all(s.up for s in backend.pool.states())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_hung_server_times_out_and_the_other_serves_the_series(pool, ct, embedded_mask, protocol):  # noqa: F811
    repository, servers, _, _ = pool
    entry = repository.get("spleen_ct")
    urls = tuple(s.grpc_url if protocol == "grpc" else s.http_url for s in servers)
    backend = open_backend(BackendSettings(kind="triton", protocol=protocol, urls=urls, timeout_s=3, retries=1,
                                           backoff_s=60))
    try:
        backend.check(entry)  # both answer; then B hangs
        os.kill(servers[1].pid, signal.SIGSTOP)
        try:
            labels, requests, counts = segment_counting(ct, entry, backend)
        finally:
            os.kill(servers[1].pid, signal.SIGCONT)
        states = {state.url: state for state in backend.pool.states()}
    finally:
        backend.close()
    np.testing.assert_array_equal(labels.volume.array, embedded_mask.volume.array)
    # One request waited out its timeout on B; B was then marked down, and A served every request.
    assert counts == {(urls[1], "failed"): 1, (urls[0], "ok"): requests}, counts
    assert states[urls[0]].up and not states[urls[1]].up, states
