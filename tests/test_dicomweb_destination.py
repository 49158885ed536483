"""The DICOMweb destination kind (STOW-RS) against Orthanc with its DICOMweb plugin.

What Orthanc stored is read back over WADO-RS (PS3.18 10.4, a multipart/related answer) and
compared with the files sent; its log, with `--verbose`, counts the STOW-RS requests, so batching is
seen from the server's side. Refusals are Orthanc's own: a file it cannot read, a study that is not the
one in the URL, credentials it does not know.
"""

from __future__ import annotations

import email.parser
import json
import email.policy
import re
import shutil
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import yaml

from dicom_node.config import Config, ConfigError, load_config
from dicom_node.config.destinations import DicomwebDestinationConfig
from dicom_node.dispatch import dicomweb, registry
from dicom_node.dispatch.destinations import EchoResult, OutcomeKind, Refusal
from tests.chest_phantoms import chest_case
from tests.peers import CT_J2K_SERIES, SHARED_DATA, dcmtk, free_port, needs, orthanc, wait_for
from tests.phantoms import write_ct_volume
from tests.test_api import get_json, http, samples
from tests.test_cli_ops import cli
from tests.test_pipeline import real_series
from tests.test_receive import dataset_bytes, running_node
from tests.test_tls import _ca, _issue

needs_orthanc = orthanc.dicomweb_required()
SEG_SAMPLE = SHARED_DATA / "seg" / "highdicom" / "seg_image_ct_binary.dcm"


def destination(url: str, **fields) -> DicomwebDestinationConfig:
    return DicomwebDestinationConfig(kind="dicomweb", url=url, **fields)


def wado_instance(pacs: orthanc.Orthanc, path: Path) -> bytes:
    """The instance as Orthanc serves it over WADO-RS: the one application/dicom part of the answer."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    content_type, body = pacs.fetch(
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
        'multipart/related; type="application/dicom"; transfer-syntax=*')  # as stored (PS3.18 8.7.3.5.2)
    assert content_type.startswith("multipart/related"), content_type
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    (part,) = list(message.iter_parts())
    assert part.get_content_type() == "application/dicom"
    return part.get_payload(decode=True)


def dataset_of(part10: bytes) -> bytes:
    """The encoded data set of a PS3.10 file, after its preamble and File Meta Information group."""
    assert part10[128:132] == b"DICM"
    (meta_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + meta_length:]


def exports_of(node) -> list[dict]:
    """The first job's exports, from the node's API (none while the series is not yet complete)."""
    status, body = http(node, "/v1/jobs/1")
    return json.loads(body)["exports"] if status == 200 else []


def stow_requests(pacs: orthanc.Orthanc) -> int:
    """STOW-RS requests Orthanc received (its verbose log names each HTTP request)."""
    return len(re.findall(r"POST /dicom-web/studies", pacs.log_text()))


@needs_orthanc
def test_instances_arrive_over_stow_rs_byte_equal_in_batches(tmp_path):
    files = [SEG_SAMPLE, *real_series(tmp_path / "ct", count=5)]
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, verbose=True) as pacs:
        report = registry.send(destination(pacs.dicomweb_url, batch_size=2), files, "NODE")
        assert [o.kind for o in report.outcomes] == [OutcomeKind.SENT] * 6, report.outcomes
        assert report.destination == f"STOW-RS {pacs.dicomweb_url}"
        assert len(pacs.instances()) == 6
        # The SEG is its own study: one request; the five CT slices of the other: 2 + 2 + 1.
        assert stow_requests(pacs) == 1 + 3
        for path in files:  # Orthanc writes its own File Meta Information (PS3.10 7.1), the data set is ours
            assert dataset_of(wado_instance(pacs, path)) == dataset_bytes(path), path.name


@needs_orthanc
def test_down_then_up_delivers_once(tmp_path):
    files = real_series(tmp_path / "ct", count=3)
    pacs = orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, verbose=True)
    target = destination(pacs.dicomweb_url, batch_size=1, timeout_s=5)
    down = registry.send(target, files, "NODE")
    assert {o.kind for o in down.outcomes} == {OutcomeKind.TRANSIENT}
    assert all(o.status is None and "no response" in o.reason for o in down.outcomes)
    assert not registry.echo(target, "NODE").ok
    with pacs:
        assert registry.echo(target, "NODE").ok
        up = registry.send(target, files, "NODE")
        assert [o.kind for o in up.outcomes] == [OutcomeKind.SENT] * 3
        assert len(pacs.instances()) == 3
        assert stow_requests(pacs) == 3  # nothing reached it while it was down


@needs_orthanc
def test_an_instance_orthanc_cannot_read_is_refused_alone(tmp_path):
    """The shared CT as anonymised, without its Study Instance UID: Orthanc cannot index it and answers
    the whole request without listing it. Sent one at a time, only that instance is refused for good."""
    unreadable = sorted(CT_J2K_SERIES.iterdir())[0]
    good = real_series(tmp_path / "ct", count=2)
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, verbose=True) as pacs:
        report = registry.send(destination(pacs.dicomweb_url, batch_size=10), [unreadable, SEG_SAMPLE, *good],
                               "NODE")
        by_uid = {o.sop_instance_uid: o for o in report.outcomes}
        refused = by_uid[str(pydicom.dcmread(unreadable, stop_before_pixels=True).SOPInstanceUID)]
        assert refused.kind == OutcomeKind.PERMANENT, refused
        assert refused.reason.startswith("HTTP "), refused.reason
        assert sum(o.kind == OutcomeKind.SENT for o in report.outcomes) == 3
        assert len(pacs.instances()) == 3


@needs_orthanc
def test_failed_sop_sequence_of_orthanc_is_read_per_instance(tmp_path):
    """Orthanc refuses an instance of another study than the URL's with 409 and FailureReason 0x0110
    in FailedSOPSequence: the instance is dead-lettered with that reason, the rest stored."""
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
        target = destination(pacs.dicomweb_url)
        connection = dicomweb._Connection(target)
        body, content_type = dicomweb._multipart([SEG_SAMPLE.read_bytes()])
        response = connection.request("POST", "/studies/1.2.3.4", body,
                                      {"Content-Type": content_type, "Accept": dicomweb.DICOM_JSON})
        connection.close()
        assert response.status == 409
        instance = dicomweb._Instance(SEG_SAMPLE, "1.2.3.4", str(pydicom.dcmread(SEG_SAMPLE).SOPInstanceUID))
        (outcome,) = dicomweb._outcomes([instance], response)
        assert (outcome.kind, outcome.status) == (OutcomeKind.PERMANENT, 0x0110)
        assert outcome.reason == "HTTP 409 Conflict: failure status 0x0110 (FailureReason)"
        assert pacs.instances() == []


@needs_orthanc
def test_basic_auth_against_orthanc(tmp_path):
    files = real_series(tmp_path / "ct", count=2)
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, users={"node": "s3cret-pass"}) as pacs:
        wrong = destination(pacs.dicomweb_url, auth={"type": "basic", "username": "node", "password": "wrong"})
        refused = registry.send(wrong, files, "NODE")
        assert {(o.kind, o.status) for o in refused.outcomes} == {(OutcomeKind.PERMANENT, None)}
        assert all(o.reason.startswith("HTTP 401") for o in refused.outcomes), refused.outcomes
        echoed = registry.echo(wrong, "NODE")
        assert (echoed.ok, echoed.status) == (False, 401)
        right = destination(pacs.dicomweb_url, auth={"type": "basic", "username": "node", "password": "s3cret-pass"})
        assert registry.echo(right, "NODE").ok
        assert [o.kind for o in registry.send(right, files, "NODE").outcomes] == [OutcomeKind.SENT] * 2
        assert len(pacs.instances()) == 2


def test_a_server_that_is_not_there_is_transient():
    report = registry.send(destination(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=3), [SEG_SAMPLE], "N")
    (outcome,) = report.outcomes
    assert outcome.kind == OutcomeKind.TRANSIENT and outcome.status is None


CONFIG = """\
destinations:
  cloud:
    kind: dicomweb
    url: {url}
    auth: {auth}
    batch_size: {batch_size}
"""


@pytest.mark.parametrize(("url", "auth", "batch_size", "error"), [
    ("https://pacs.example/dicom-web/", "{type: basic, username: node, password: pw}", 0,
     "config.yaml:6 destinations.cloud.batch_size: Input should be greater than or equal to 1"),
    ("ftp://pacs.example/dicom-web", "null", 5, "config.yaml:4 destinations.cloud.url: 'ftp://pacs.example/dicom-web' "
                                                "is not an http:// or https:// URL"),
    ("https://node:pw@pacs.example/dicom-web", "null", 5,
     "config.yaml:4 destinations.cloud.url: credentials do not belong in the URL (they would be logged): use auth"),
    ("http://pacs.example/dicom-web", "{type: bearer, token: abc}", 5,
     "config.yaml:2 destinations.cloud: bearer auth over plain http to pacs.example would send the credentials in "
     "clear text: use an https:// url"),
    ("https://pacs.example/dicom-web", "{type: digest, username: node}", 5,
     "config.yaml:5 destinations.cloud.auth: auth is {type: basic, username: ..., password: ...} or "
     "{type: bearer, token: ...} (leave auth out for none)"),
    ("https://pacs.example/dicom-web", "{type: basic, username: node}", 5,
     "config.yaml:5 destinations.cloud.auth.password: Field required"),
])
def test_config_errors(tmp_path, url, auth, batch_size, error):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(url=url, auth=auth, batch_size=batch_size))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.errors == [error]


def test_secrets_are_never_printed(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(url="https://pacs.example/dicom-web", auth="{type: bearer, token: tok-123456789}",
                                  batch_size=5) + "  other:\n    kind: dicomweb\n    url: https://b.example\n"
                    "    auth: {type: basic, username: node, password: pw-987654321}\n")
    config = load_config(path)
    shown = repr(config) + str(config.model_dump()) + config.model_dump_json()
    assert "tok-123456789" not in shown and "pw-987654321" not in shown and "**********" in shown
    assert config.destinations["cloud"].auth.header() == "Bearer tok-123456789"
    assert config.destinations["cloud"].url == "https://pacs.example/dicom-web"  # no trailing slash
    assert config.destinations["cloud"].calling_ae_title is None


def test_default_kind_is_still_dimse():
    config = Config.model_validate({"destinations": {"pacs": {"ae_title": "A", "host": "h", "port": 104}}})
    assert registry.kind_of(config.destinations["pacs"]).name == "dimse"


@needs_orthanc
def test_echo_and_send_from_the_command_line(tmp_path):
    files = real_series(tmp_path / "ct", count=3)
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, users={"node": "s3cret-pass"}) as pacs:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"destinations": {
            "web": {"kind": "dicomweb", "url": pacs.dicomweb_url, "batch_size": 2,
                    "auth": {"type": "basic", "username": "node", "password": "s3cret-pass"}},
            "stranger": {"kind": "dicomweb", "url": pacs.dicomweb_url}}}))
        result = cli("echo", "web", "--config", config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"web (STOW-RS {pacs.dicomweb_url}): QIDO-RS ok, HTTP 200" in result.stdout
        echoed = json.loads(cli("echo", "stranger", "--json", "--config", config).stdout)
        assert (echoed["ok"], echoed["status"], echoed["kind"], echoed["url"]) == (False, 401, "dicomweb",
                                                                                   pacs.dicomweb_url)
        assert "s3cret" not in json.dumps(echoed)
        report = json.loads(cli("send", *files, "--to", "web", "--json", "--config", config).stdout)
        assert [f["outcome"] for f in report["files"]] == ["sent"] * 3
        assert len(pacs.instances()) == 3


@needs_orthanc
def test_node_delivers_seg_and_sr_over_stow_rs_after_an_outage(tmp_path):
    """The whole node: storescu -> `dicom-node serve` -> the shipped chest_ct pipeline -> STOW-RS to Orthanc,
    which is down when the results are first sent. Once it is up, each result arrives once, as written."""
    from tests.test_orthanc_end_to_end import SHIPPED_PIPELINES, covid_repository, study_series

    files = write_ct_volume(chest_case(()).volume, tmp_path / "phantom")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    covid_repository(tmp_path / "models")
    pacs = orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, verbose=True)
    web = {"kind": "dicomweb", "url": pacs.dicomweb_url, "batch_size": 10, "timeout_s": 10,
           "retry": {"initial_delay_s": 0.5, "max_delay_s": 1, "jitter": 0, "max_attempts": 1000}}
    with running_node(tmp_path / "node", destinations={"web": web},
                      pipelines={"chest_ct": SHIPPED_PIPELINES["chest_ct"] | {"destinations": ["web"]}},
                      inference={"backend": "embedded", "model_repository": str(tmp_path / "models"),
                                 "embedded": {"cpu_threads": 2}}) as node:
        assert dcmtk.storescu(node.port, files).returncode == 0
        failed_once = wait_for(lambda: (exports := exports_of(node)) and all(
            e["attempts"] >= 1 and e["state"] == "pending" for e in exports) and exports, 180,
            "results tried once while Orthanc is down")
        assert all("no response from the server" in e["reason"] for e in failed_once)
        with pacs:
            wait_for(lambda: (found := study_series(pacs, study_uid)).keys() >= {"SEG", "SR"}
                            and len(found["SR"]) == 1 and found, 60, "the SEG and the SR in Orthanc")
            exports = wait_for(lambda: (rows := exports_of(node)) and all(
                e["state"] == "sent" for e in rows) and rows, 30, "every export sent")
            assert len(exports) == 2 and len(pacs.instances()) == 2
            assert stow_requests(pacs) == 1  # both results in one request, once
            for export in exports:
                path = Path(export["path"])
                assert dataset_of(wado_instance(pacs, path)) == dataset_bytes(path), path.name
            status = get_json(node, "/v1/status")
            metrics = samples(node)
            audit = get_json(node, "/v1/audit?event=sent")
            assert node.process.alive()
    assert [entry["detail"].split(":")[0] for entry in audit] == ["dicomweb"]  # the transport, in the audit
    assert {"destination": "web", "transport": "dicomweb", "exports": {"sent": 2}} in status["destinations"]
    assert metrics[("dicom_node_destination_info", (("destination", "web"), ("transport", "dicomweb")))] == 1
    assert metrics[("dicom_node_exports_sent_total", (("destination", "web"),))] == 2


@needs(shutil.which("openssl") is not None, "openssl command line not installed (apt-get install openssl)")
def test_client_tls(tmp_path):
    """HTTPS with mutual authentication. The Debian Orthanc 1.10 resets every HTTPS request (with OpenSSL 3), so the
    server is Python's own TLS stack requiring a certificate of the hospital's CA, answering the QIDO-RS
    query: the destination with our certificate gets its answer, without one or trusting another CA not."""
    ca, other = _ca(tmp_path, "Hospital-CA"), _ca(tmp_path, "Other-CA")
    server, node = _issue(tmp_path, "dicom-web", ca), _issue(tmp_path, "dicom-node", ca)

    class Qido(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/dicom-web/studies?limit=1" else 404)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            """Quiet: the test reads what the client sent, not the server's log."""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*server)
    context.load_verify_locations(ca[0])
    context.verify_mode = ssl.CERT_REQUIRED
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    try:
        ours = destination(url, tls={"ca_certificates": ca[0], "certificate": node[0], "private_key": node[1]})
        assert registry.echo(ours, "NODE") == EchoResult(True, 200, "ok", "QIDO-RS")
        without_ours = registry.echo(destination(url, tls={"ca_certificates": ca[0]}, timeout_s=5), "NODE")
        assert not without_ours.ok and without_ours.status is None
        wrong_ca = registry.echo(destination(url, tls={"ca_certificates": other[0], "certificate": node[0],
                                                       "private_key": node[1]}, timeout_s=5), "NODE")
        assert not wrong_ca.ok and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.reason
    finally:
        httpd.shutdown()


@needs_orthanc
def test_partly_stored_request_orthanc_answers_per_instance(tmp_path):
    """One request for the SEG's study holding the SEG and a CT slice of another study: Orthanc stores the
    SEG and refuses the slice, each in its sequence of the one response. Only the slice is not stored, with
    Orthanc's FailureReason; the SEG counts as sent (the export loop does not send it again)."""
    (ct,) = real_series(tmp_path / "ct", count=1)
    seg_study = str(pydicom.dcmread(SEG_SAMPLE, stop_before_pixels=True).StudyInstanceUID)
    batch = [dicomweb._Instance(path, seg_study, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
             for path in (SEG_SAMPLE, ct)]
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
        connection = dicomweb._Connection(destination(pacs.dicomweb_url))
        try:
            seg, slice_ = dicomweb._store(connection, batch)
        finally:
            connection.close()
        assert (seg.kind, seg.status) == (OutcomeKind.SENT, 0x0000)
        assert (slice_.kind, slice_.status) == (OutcomeKind.PERMANENT, 0x0110)
        assert len(pacs.instances()) == 1


def _response(status: int, referenced=(), failed=(), warned=()) -> dicomweb._Response:
    def items(entries, code_tag=None):
        return {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                       **({code_tag: {"vr": "US", "Value": [code]}} if code_tag else {})}
                                      for uid, code in entries]}
    dataset = {"00081199": items([(uid, None) for uid in referenced]), "00081198": items(failed, "00081197")}
    dataset["00081199"]["Value"] += items(warned, "00081196")["Value"]
    return dicomweb._Response(status, {200: "OK", 202: "Accepted", 409: "Conflict"}[status], dicomweb.DICOM_JSON,
                              json.dumps(dataset).encode())


def test_failure_and_warning_reasons_are_classified_as_c_store_statuses():
    """No real peer answers these on demand (Orthanc refuses only with 0x0110): the PS3.18 response of a
    server that is out of space for one instance, does not take SEG for another and coerced a third."""
    batch = [dicomweb._Instance(Path(f"{n}.dcm"), "1.2", f"1.2.{n}") for n in range(5)]
    response = _response(202, referenced=["1.2.0"], failed=[("1.2.1", 0xA700), ("1.2.2", 0x0122)],
                         warned=[("1.2.3", 0xB000)])
    outcomes = {o.sop_instance_uid: o for o in dicomweb._outcomes(batch, response)}
    assert outcomes["1.2.0"].kind == OutcomeKind.SENT
    assert (outcomes["1.2.1"].kind, outcomes["1.2.1"].status) == (OutcomeKind.TRANSIENT, 0xA700)
    assert outcomes["1.2.2"].kind == OutcomeKind.PERMANENT
    assert outcomes["1.2.2"].refusal == Refusal.SOP_CLASS_NOT_SUPPORTED
    assert (outcomes["1.2.3"].kind, outcomes["1.2.3"].status) == (OutcomeKind.WARNING, 0xB000)
    assert outcomes["1.2.4"].kind == OutcomeKind.PERMANENT and "neither as stored nor as failed" in outcomes[
        "1.2.4"].reason


@pytest.mark.parametrize(("status", "kind"), [
    (503, OutcomeKind.TRANSIENT), (500, OutcomeKind.TRANSIENT), (408, OutcomeKind.TRANSIENT),
    (429, OutcomeKind.TRANSIENT), (401, OutcomeKind.PERMANENT), (403, OutcomeKind.PERMANENT),
    (404, OutcomeKind.PERMANENT), (415, OutcomeKind.PERMANENT)])
def test_http_statuses_without_a_per_instance_answer(status, kind):
    batch = [dicomweb._Instance(Path("a.dcm"), "1.2", "1.2.3")]
    (outcome,) = dicomweb._outcomes(batch, dicomweb._Response(status, "Reason", "text/plain", b"the server's words"))
    assert (outcome.kind, outcome.status) == (kind, None)
    assert outcome.reason == f"HTTP {status} Reason: the server's words" + (" (check url)" if status == 404 else "")


def test_http_200_without_a_body_means_all_stored():
    """PS3.18 10.5.3: 200 is "stored all instances"; a server that adds no data set is taken at its word."""
    batch = [dicomweb._Instance(Path(f"{n}.dcm"), "1.2", f"1.2.{n}") for n in range(2)]
    outcomes = dicomweb._outcomes(batch, dicomweb._Response(200, "OK", "", b""))
    assert [(o.kind, o.status) for o in outcomes] == [(OutcomeKind.SENT, 0x0000)] * 2


@needs_orthanc
def test_forward_rule_over_stow_rs_and_a_refusal_dead_lettered(tmp_path):
    """A `forward` rule sends the received series, as received, to a DICOMweb destination; the same
    Orthanc with a password the node does not have answers 401: dead-lettered at once with that reason."""
    files = real_series(tmp_path / "ct", count=4)
    with orthanc.Orthanc(tmp_path / "orthanc", dicomweb=True, users={"node": "s3cret-pass"}) as pacs:
        web = {"kind": "dicomweb", "url": pacs.dicomweb_url, "batch_size": 3,
               "auth": {"type": "basic", "username": "node", "password": "s3cret-pass"}}
        stranger = web | {"auth": {"type": "basic", "username": "node", "password": "not-the-password"}}
        with running_node(tmp_path / "node", destinations={"web": web, "stranger": stranger},
                          forward={"archive": {"match": {"modality": "CT"}, "destinations": ["web", "stranger"]}}) as node:
            assert dcmtk.storescu(node.port, files, extra=["-xv"]).returncode == 0  # JPEG 2000, as received
            exports = wait_for(lambda: (rows := exports_of(node)) and len(rows) == 8 and all(
                e["state"] != "pending" for e in rows) and rows, 120, "every export settled")
        assert len(pacs.instances()) == 4
        for path in files:  # the spooled originals, as received
            assert dataset_of(wado_instance(pacs, path)) == dataset_bytes(path)
    assert {e["state"] for e in exports if e["destination"] == "web"} == {"sent"}
    refused = [e for e in exports if e["destination"] == "stranger"]
    assert {(e["state"], e["attempts"]) for e in refused} == {("dead", 1)}
    assert all(e["reason"].startswith("HTTP 401 Unauthorized") for e in refused), refused


def test_tls_needs_an_https_url():
    with pytest.raises(ValueError, match="tls is set but the url is not https://"):
        destination("http://127.0.0.1:8042/dicom-web", tls={})
    assert destination("https://pacs.example/dicom-web", tls={}).tls.check_hostname  # names, unlike DICOM peers
    assert destination("http://127.0.0.1:8042/dicom-web", auth={"type": "bearer", "token": "t"}).auth  # loopback
