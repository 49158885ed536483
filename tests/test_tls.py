"""DICOM TLS (dicom_node.tls): dcmtk's storescu sends to the node's TLS port with a certificate of the
hospital's CA, a sender with a certificate of another CA or no TLS at all is refused, and the node
reaches a dcmtk storescp that requires TLS with mutual authentication. Certificates are made per run
with the openssl command line."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml

from dicom_node.config import ConfigError, load_config
from tests.peers import REPO, dcmtk, free_port, needs
from tests.series_factory import write_ct_series
from tests.test_receive import running_node

pytestmark = [
    dcmtk.required(),
    needs(shutil.which("openssl") is not None, "openssl command line not installed (apt-get install openssl)"),
]


@dataclass(frozen=True)
class Pki:
    ca: Path
    node_certificate: Path
    node_key: Path
    sender_certificate: Path
    sender_key: Path
    colleague_certificate: Path  # another device, signed by the same CA
    colleague_key: Path
    stranger_certificate: Path  # signed by another CA
    stranger_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, certificate = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", certificate, "-days", "2",
             "-subj", f"/CN={name}", cwd=folder)
    return certificate, key


def _issue(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, request, certificate = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    extensions = folder / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", f"/CN={name}",
             cwd=folder)
    _openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", certificate,
             "-days", "2", "-extfile", extensions, cwd=folder)
    return certificate, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    hospital = _ca(folder, "Hospital-CA")
    other = _ca(folder, "Other-CA")
    node = _issue(folder, "dicom-node", hospital)
    sender = _issue(folder, "CT-SCANNER-1", hospital)
    colleague = _issue(folder, "CT-SCANNER-2", hospital)
    stranger = _issue(folder, "STRANGER", other)
    return Pki(hospital[0], node[0], node[1], sender[0], sender[1], colleague[0], colleague[1], stranger[0],
               stranger[1])


def _tls_args(certificate: Path, key: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(certificate), "+cf", str(ca)]


def test_a_sender_with_a_certificate_of_the_hospital_ca_is_stored_over_tls(pki, tmp_path):
    tls_port = free_port()
    files = write_ct_series(tmp_path / "series", 3, rows=64, columns=64)
    tls = {"port": tls_port, "certificate": str(pki.node_certificate), "private_key": str(pki.node_key),
           "ca_certificates": str(pki.ca)}
    with running_node(tmp_path / "node", node={"tls": tls}) as node:
        sent = dcmtk.storescu(tls_port, files, extra=_tls_args(pki.sender_certificate, pki.sender_key, pki.ca))
        assert sent.returncode == 0 and len(sent.acknowledged) == 3, sent.output
        stored = {p.name for p in node.spool_files()}
        assert stored == {f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files}

        stranger = dcmtk.storescu(tls_port, files[:1],
                                  extra=_tls_args(pki.stranger_certificate, pki.stranger_key, pki.ca))
        plain_to_tls = dcmtk.storescu(tls_port, files[:1])
        assert stranger.acknowledged == [] and plain_to_tls.acknowledged == []
        assert dcmtk.storescu(node.port, files[:1]).returncode == 0  # the plain port serves on, as a re-send
        log = node.log_text()
    assert "peer certificate 'CT-SCANNER-1'" in log
    assert log.count("TLS handshake with 127.0.0.1") >= 2, log[-3000:]
    assert len(list((tmp_path / "node" / "var" / "spool").glob("*/*/*.dcm"))) == 3



def test_an_ae_title_tied_to_a_certificate_is_accepted_from_that_certificate_only(pki, tmp_path):
    tls_port = free_port()
    files = write_ct_series(tmp_path / "series", 2, rows=64, columns=64)
    tls = {"port": tls_port, "certificate": str(pki.node_certificate), "private_key": str(pki.node_key),
           "ca_certificates": str(pki.ca)}
    security = {"calling_aes": [{"ae_title": "STORESCU", "tls_subject": "CT-SCANNER-1"}]}
    with running_node(tmp_path / "node", node={"tls": tls}, security=security) as node:
        colleague = dcmtk.storescu(tls_port, files, extra=_tls_args(pki.colleague_certificate, pki.colleague_key,
                                                                    pki.ca))
        plain = dcmtk.storescu(node.port, files)
        owner = dcmtk.storescu(tls_port, files, extra=_tls_args(pki.sender_certificate, pki.sender_key, pki.ca))
        log = node.log_text()
    for refused in (colleague, plain):
        assert refused.acknowledged == [] and "Calling AE Title Not Recognized" in refused.output, refused.output
    assert owner.returncode == 0 and len(owner.acknowledged) == 2, owner.output
    assert "calling AE 'STORESCU' from 127.0.0.1 with certificate 'CT-SCANNER-2' not recognized" in log

def test_results_reach_a_pacs_that_requires_tls_with_mutual_authentication(pki, tmp_path):
    port = free_port()
    files = write_ct_series(tmp_path / "series", 2, rows=64, columns=64)
    destination = {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port, "timeout_s": 10,
                   "tls": {"ca_certificates": str(pki.ca), "certificate": str(pki.sender_certificate),
                           "private_key": str(pki.sender_key)}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "storage_dir": "var"},
        "destinations": {"pacs": destination,
                         "pacs-without-our-certificate": {**destination, "tls": {"ca_certificates": str(pki.ca)}}}}))
    dicom_node = str(REPO / ".venv" / "bin" / "dicom-node")
    pacs_tls = _tls_args(pki.node_certificate, pki.node_key, pki.ca)  # storescp requires a peer certificate
    with dcmtk.storescp(port, tmp_path / "pacs", log=tmp_path / "storescp.log", extra=pacs_tls):
        echo = subprocess.run([dicom_node, "echo", "pacs", "--json", "--config", str(config)], capture_output=True,
                              text=True, timeout=120)
        assert json.loads(echo.stdout)["ok"], echo.stdout + echo.stderr
        sent = subprocess.run([dicom_node, "send", *map(str, files), "--to", "pacs", "--json", "--config",
                               str(config)], capture_output=True, text=True, timeout=120)
        assert json.loads(sent.stdout)["sent"] == 2, sent.stdout + sent.stderr
        refused = subprocess.run([dicom_node, "echo", "pacs-without-our-certificate", "--json", "--config",
                                  str(config)], capture_output=True, text=True, timeout=120)
        assert not json.loads(refused.stdout)["ok"]
    assert len(list((tmp_path / "pacs").iterdir())) == 2



def test_status_api_over_https(pki, tmp_path):
    """With http.tls the API answers HTTPS only, with the configured certificate, and `dicom-node status`
    reaches it trusting the configured CA; trusting another CA it says TLS failed, never falls back."""
    https = {"certificate": str(pki.node_certificate), "private_key": str(pki.node_key), "ca_certificates": str(pki.ca)}
    with running_node(tmp_path / "node", http={"tls": https}) as node:
        trusted = ssl.create_default_context(cafile=pki.ca)
        with urllib.request.urlopen(f"https://localhost:{node.http_port}/healthz", context=trusted,
                                    timeout=30) as response:
            assert response.status == 200 and json.load(response) == {"status": "alive"}
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=30)
        dicom_node = str(REPO / ".venv" / "bin" / "dicom-node")
        status = subprocess.run([dicom_node, "status", "--json", "--config", str(node.config_path)],
                                capture_output=True, text=True, timeout=120)
        assert json.loads(status.stdout)["source"] == "node", status.stdout + status.stderr
        config = yaml.safe_load(node.config_path.read_text())
        config["http"]["tls"]["ca_certificates"] = str(pki.stranger_certificate)  # not what signed the node
        wrong = tmp_path / "wrong-ca.yaml"
        wrong.write_text(yaml.safe_dump(config))
        refused = subprocess.run([dicom_node, "status", "--config", str(wrong)], capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 1 and "TLS failed" in refused.stderr, refused.stdout + refused.stderr
        assert "HTTP API on https://127.0.0.1:" in node.log_text()

def test_tls_settings_that_cannot_work_are_config_errors(pki, tmp_path):
    def errors(node: dict, section: str = "node") -> str:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({section: node}))
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        return str(raised.value)

    files = {"certificate": str(pki.node_certificate), "private_key": str(pki.node_key)}
    (tmp_path / "tls").mkdir()
    for source in (pki.node_certificate, pki.node_key, pki.ca):
        shutil.copy(source, tmp_path / "tls" / source.name)
    relative = {"certificate": f"tls/{pki.node_certificate.name}", "private_key": f"tls/{pki.node_key.name}",
                "ca_certificates": f"tls/{pki.ca.name}"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"node": {"tls": relative}}))
    assert load_config(tmp_path / "config.yaml").node.tls.certificate == tmp_path / "tls" / pki.node_certificate.name
    assert "require_client_certificate needs ca_certificates" in errors({"tls": files})
    assert "node.tls: TLS certificate, key or CA file unusable" in errors(
        {"tls": {**files, "private_key": str(pki.sender_key), "ca_certificates": str(pki.ca)}})
    assert "unusable" in errors({"tls": {**files, "ca_certificates": "missing-ca.pem"}})
    assert "give TLS its own" in errors({"port": 2762, "tls": {**files, "ca_certificates": str(pki.ca)}})
    assert "http.tls: TLS certificate, key or CA file unusable" in errors(
        {"tls": {**files, "private_key": str(pki.sender_key)}}, section="http")
