"""The triton backend against an independent KServe v2 server (KServe's ModelServer + ONNX Runtime).

The server runs in its own virtual environment (tests/peers/kserve.py) on
free loopback ports; the node's backend must give exactly what the embedded
backend gives, over gRPC and over HTTP, and fail at start-up with a message
an admin can act on when the server lacks a model or a tensor.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from inference import tasks
from inference.backends import BackendError, BackendSettings, open_backend
from inference.repository import ModelRepository
from tests.peers import free_port
from tests.peers.kserve import KServeServer
from tests.test_spleen import ct, embedded_mask, make_repository  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The spleen repository and a KServe server serving it."""
    root = tmp_path_factory.mktemp("triton")
    repository = make_repository(root / "models")
    with KServeServer(root / "models", root / "kserve.log") as server:
        yield repository, server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_spleen_over_the_wire_is_identical_to_embedded(served, ct, embedded_mask, protocol):  # noqa: F811
    repository, server = served
    url = server.grpc_url if protocol == "grpc" else server.http_url
    backend = open_backend(BackendSettings(kind="triton", url=url, protocol=protocol, timeout_s=120))
    try:
        entry = repository.get("spleen_ct")
        backend.check(entry)
        remote = tasks.segment(ct, entry, backend)
    finally:
        backend.close()
    assert remote.volume.same_grid(embedded_mask.volume)
    assert remote.volume.array.sum() > 1000
    np.testing.assert_array_equal(remote.volume.array, embedded_mask.volume.array)
    assert remote.segments == embedded_mask.segments


def test_missing_model_is_a_clear_startup_error(served, tmp_path):
    _, server = served
    shutil.copytree(served[0].path / "spleen_ct", tmp_path / "liver_ct")
    config = tmp_path / "liver_ct" / "config.pbtxt"
    config.write_text(config.read_text().replace('"spleen_ct"', '"liver_ct"'))
    repository = ModelRepository(tmp_path)
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        backend = open_backend(BackendSettings(kind="triton", url=url, protocol=protocol))
        with pytest.raises(BackendError) as caught:
            backend.check(repository.get("liver_ct"))
        assert str(caught.value) == f"model 'liver_ct' is not ready on triton at {url}"
        backend.close()


def test_wrong_tensor_name_is_a_clear_startup_error(served, tmp_path):
    _, server = served
    entry = tmp_path / "spleen_ct"
    shutil.copytree(served[0].path / "spleen_ct", entry)
    for name in ("config.pbtxt", "pipeline.yaml"):
        (entry / name).write_text((entry / name).read_text().replace("INPUT__0", "INPUT__1"))
    repository = ModelRepository(tmp_path)
    backend = open_backend(BackendSettings(kind="triton", url=server.grpc_url))
    with pytest.raises(BackendError) as caught:
        backend.check(repository.get("spleen_ct"))
    assert str(caught.value) == f"model 'spleen_ct' has no input 'INPUT__1' on triton at {server.grpc_url} (it has INPUT__0)"
    backend.close()


def test_unreachable_server_fails_after_bounded_retries(served):
    repository, _ = served
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match=rf"triton at {url} is unreachable \(server live, 2 attempts\)"):
        open_backend(BackendSettings(kind="triton", url=url, retries=1, timeout_s=2))


def test_server_coming_up_during_retries(served, tmp_path):
    """A transient outage at start-up (server still starting) is retried, not fatal."""
    repository, _ = served
    ports = (free_port(), free_port())
    started: list[KServeServer] = []
    starter = threading.Timer(0.5, lambda: started.append(KServeServer(repository.path, tmp_path / "late.log", ports=ports)))
    starter.start()
    try:
        backend = open_backend(BackendSettings(kind="triton", url=f"127.0.0.1:{ports[1]}", retries=6))
        backend.check(repository.get("spleen_ct"))
        backend.close()
    finally:
        starter.join()
        for server in started:
            server.stop()
