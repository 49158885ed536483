"""The admin's operating commands as the admin runs them (subprocesses): `send`, `echo` against
dcmtk's storescp, `status --json` from a running node's API and from the journal, `audit`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import yaml

from dicom_node.store.spool import Spool
from tests.peers import REPO, dcmtk, free_port
from tests.series_factory import write_ct_series
from tests.test_receive import running_node

pytestmark = dcmtk.required()


def cli(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "dicom-node"), *map(str, argv)], capture_output=True,
                          text=True, timeout=300)


def _config(path: Path, pacs_port: int, closed_port: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "storage_dir": "var"},
        "destinations": {"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port},
                         "gone": {"ae_title": "GONE", "host": "127.0.0.1", "port": closed_port, "timeout_s": 5}}}))
    return path


def test_echo_and_send_a_folder_to_storescp(tmp_path):
    port = free_port()
    config = _config(tmp_path / "config.yaml", port, free_port())
    folder = tmp_path / "study"
    files = write_ct_series(folder / "series", 5)
    (folder / "README.txt").write_text("not DICOM")
    with dcmtk.storescp(port, tmp_path / "pacs", log=tmp_path / "storescp.log"):
        result = cli("echo", "pacs", "--config", config)
        assert result.returncode == 0 and "C-ECHO ok" in result.stdout, result.stdout + result.stderr
        echoed = json.loads(cli("echo", "pacs", "--json", "--config", config).stdout)
        assert echoed["ok"] and echoed["status"] == 0

        result = cli("send", folder, "--to", "pacs", "--config", config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.count("sent ") == 1 and "5/5 files, 0 failed" in result.stderr  # progress at the end
        assert "pacs (STORESCP@127.0.0.1:" in result.stdout and "5 sent, 1 skipped" in result.stdout

        report = json.loads(cli("send", *files[:2], "--to", "pacs", "--json", "--config", config).stdout)
    assert (report["sent"], report["skipped"]) == (2, 0)
    assert [f["outcome"] for f in report["files"]] == ["sent", "sent"]
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "pacs").iterdir()}
    assert stored == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_echo_and_send_report_failures(tmp_path):
    config = _config(tmp_path / "config.yaml", free_port(), free_port())
    files = write_ct_series(tmp_path / "series", 2)
    result = cli("echo", "gone", "--config", config)
    assert result.returncode == 1 and "C-ECHO FAILED" in result.stdout
    report = json.loads(cli("send", *files, "--to", "gone", "--json", "--config", config).stdout)
    assert [f["outcome"] for f in report["files"]] == ["transient", "transient"]
    assert cli("send", *files, "--to", "gone", "--config", config).returncode == 1
    result = cli("echo", "nowhere", "--config", config)
    assert result.returncode == 1 and "unknown destination 'nowhere' (destinations: gone, pacs)" in result.stderr


def test_status_json_from_the_running_node_then_from_the_journal(tmp_path):
    files = write_ct_series(tmp_path / "series", 3)
    with running_node(tmp_path / "node", http={"bearer_token": "token-of-the-admin-0123"}) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        node.wait_for_completion(series_uid)
        result = cli("status", "--json", "--config", node.config_path)
        assert result.returncode == 0, result.stdout + result.stderr  # ready: exit 0
        live = json.loads(result.stdout)
        assert live["source"] == "node" and live["associations_open"] == 0 and live["ready"]
        assert live["series"] == {"unmatched": 1} and live["jobs"] == {} and live["dead_letters"] == 0
        assert live["quarantined_files"] == 0
        assert live["disk"]["free_bytes"] > 0 and {c["name"] for c in live["checks"]} == {"journal", "disk", "dicom port"}
        text = cli("status", "--config", node.config_path).stdout
        assert "running node (API)" in text and "unmatched 1" in text

        audit = json.loads(cli("audit", "--json", "--series", series_uid, "--config", node.config_path).stdout)
        assert [(a["event"], a["calling_ae"], a["instance_count"]) for a in audit] == [("received", "STORESCU", 3)]

    stray = node.storage / "spool" / "stray.dcm"
    stray.write_bytes(b"not DICOM")
    Spool(node.storage).quarantine(stray, "reconcile could not journal it: not DICOM")
    offline = json.loads(cli("status", "--json", "--config", node.config_path).stdout)
    assert offline["source"] == "journal" and offline["associations_open"] is None
    assert offline["series"] == live["series"] and offline["quarantined_files"] == 1
    # nobody answers for the DICOM port: not ready to take images, and the exit status says so
    assert not offline["ready"] and [c["name"] for c in offline["checks"] if not c["ok"]] == ["dicom port"]
    text = cli("status", "--config", node.config_path).stdout
    assert f"quarantined files      1 in {node.storage}/quarantine (not journaled at restart" in text, text

    # `dicom-node status | head -1` where head has already gone: no traceback, the shell's SIGPIPE status
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        piped = subprocess.run([str(REPO / ".venv" / "bin" / "dicom-node"), "status", "--config",
                                str(node.config_path)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert piped.returncode == 141 and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, \
        piped.stderr


def test_status_says_when_the_api_refuses_its_token_and_serve_exits_1_when_a_port_is_taken(tmp_path):
    import socket

    with running_node(tmp_path / "node", http={"bearer_token": "token-of-the-admin-0123"}) as node:
        config = yaml.safe_load(node.config_path.read_text())
        config["http"]["bearer_token"] = "not-the-token-of-the-node"
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(yaml.safe_dump({**config, "node": {**config["node"], "storage_dir": str(node.storage)}}))
        result = cli("status", "--config", wrong)
        assert result.returncode == 1 and "answered 401" in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config["http"]["port"] = taken.getsockname()[1]
        config["node"]["port"] = free_port()
        clash = tmp_path / "clash" / "config.yaml"
        clash.parent.mkdir()
        clash.write_text(yaml.safe_dump(config))
        result = cli("serve", "--config", clash)
        assert result.returncode == 1 and "HTTP API could not listen on 127.0.0.1:" in result.stderr
        config["http"]["port"], config["node"]["port"] = free_port(), taken.getsockname()[1]
        clash.write_text(yaml.safe_dump(config))
        result = cli("serve", "--config", clash)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"dicom-node serve: DICOM port could not listen on 127.0.0.1:{config['node']['port']}: "
            "Address already in use") in result.stderr
