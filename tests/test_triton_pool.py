"""The triton backend over a pool of two independent KServe v2 servers (tests/kserve_server.py).

Every sliding-window batch is one request: the pool sends them round-robin,
so both servers serve one series; one server killed by pid in the middle of a
series costs that series one failed request, which goes to the other server,
and the mask is still exactly the embedded backend's; the killed server,
started again on its ports, gets requests again once its readiness probe
answers. `models check` and the server metric report each server.
"""

from __future__ import annotations

import argparse
import io
import threading

import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.metrics import InferenceServerCollector, NodeMetrics
from dicom_node.ops import models
from dicom_node.pipeline.health import inference_servers
from inference import tasks
from inference.backends import BackendSettings, open_backend
from inference.repository import ModelRepository
from tests.peers import wait_for
from tests.peers.kserve import KServeServer
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


def segment_counting(ct, entry, backend, on_request=None):  # noqa: F811
    """tasks.segment through the pool, with `on_request(n)` called before the n-th request (from 1);
    returns the label map, the number of requests and the requests per (server, outcome) the pool sent."""
    backend.drain_counts()
    calls = [0]

    class Counting:
        def infer(self, entry, inputs):
            calls[0] += 1
            if on_request is not None:
                on_request(calls[0])
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


def test_server_killed_mid_series_the_series_finishes(pool, ct, embedded_mask):  # noqa: F811
    """Server B is killed (SIGKILL, by pid) as the third request goes out, concurrently with it."""
    repository, servers, backend, _ = pool
    killer: list[threading.Thread] = []

    def kill_b(n: int) -> None:
        if n == 3:
            killer.append(threading.Thread(target=servers[1].kill))
            killer[0].start()

    labels, requests, counts = segment_counting(ct, repository.get("spleen_ct"), backend, kill_b)
    killer[0].join()
    np.testing.assert_array_equal(labels.volume.array, embedded_mask.volume.array)
    a_url, b_url = (s.grpc_url for s in servers)
    assert counts.get((b_url, "failed"), 0) >= 1, counts
    assert counts.get((a_url, "ok"), 0) + counts.get((b_url, "ok"), 0) == requests, counts
    assert counts.get((a_url, "ok"), 0) > requests // 2 + 1, counts  # A took over B's share
    state = {s.url: s for s in backend.servers()}
    assert state[a_url].up and not state[b_url].up
    assert "connect" in state[b_url].reason.lower() or "unavailable" in state[b_url].reason.lower(), state[b_url]


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
    assert "probed again in" in b_line

    metrics = NodeMetrics()
    metrics.add_collector(InferenceServerCollector(lambda: inference_servers(config, lambda: (repository, backend))))
    text = metrics.exposition().decode()
    assert f'dicom_node_inference_server_up{{server="{a_url}"}} 1.0' in text
    assert f'dicom_node_inference_server_up{{server="{b_url}"}} 0.0' in text


def test_restarted_server_gets_requests_again(pool, ct, embedded_mask):  # noqa: F811
    repository, servers, backend, root = pool
    servers[1] = KServeServer(repository.path, root / "kserve1-again.log",
                              ports=(servers[1].http_port, servers[1].grpc_port))
    # Its back-off passes (nothing probes it meanwhile): the first request that finds it due probes it.
    wait_for(lambda: backend.pool.states()[1].probe_in_s == 0, 30, "server B's back-off to pass")
    labels, requests, counts = segment_counting(ct, repository.get("spleen_ct"), backend)
    np.testing.assert_array_equal(labels.volume.array, embedded_mask.volume.array)
    b_url = servers[1].grpc_url
    assert counts.get((b_url, "ok"), 0) >= requests // 2 - 1, counts
    wait_for(lambda: all(s.up for s in backend.servers()), 10, "both servers up")
