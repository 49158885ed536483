"""The admin console in a real browser (headless chromium), on one node with Orthanc as its PACS.

One node for the module: a person logs in, the real 20-slice CT is sent with
dcmtk storescu while Orthanc is down, the series page shows it arrive, its
spleen job finish and its SEG dead-lettered; the preview PNG is checked
against the SEG read with pydicom; Orthanc is started and the dead letter
retried from the failures page reaches it; a model version uploaded on the
models page runs the next series' job. Then what must be refused is:
a form on a page of another origin, a foreign Host, a POST with a missing
or wrong CSRF token, the session after logout, and a name past its failed
logins, refused from that host even with its password. The API's Swagger UI
renders from the node's own files. Screenshots are kept in
`test-artifacts/console/` (printed; ignored by git).
"""

from __future__ import annotations

import http.client
import http.server
import io
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.uid import generate_uid

from dicom_node.passwords import hash_password
from dicom_node.states import ExportState, JobState
from dicom_node.store.audit import AuditLog
from tests.model_repository import install_spleen_model
from tests.peers import REPO, browser, dcmtk, free_port, needs, orthanc, wait_for
from tests.test_orthanc_end_to_end import study_series
from tests.test_pipeline import real_series
from tests.test_receive import running_node

pytestmark = [needs(dcmtk.available() and orthanc.available(), "dcmtk and Orthanc needed"), browser.required()]

USER, PASSWORD = "ann", "console-test-password"
GUESSED, GUESSED_PASSWORD = "lab", "another-console-test-password"  # a second console user, for the failed-login limit
PATIENT_ID, ACCESSION = "CONSOLE-0001", "ACC20260315"
SPLEEN = yaml.safe_load((REPO / "config.yaml").read_text())["pipelines"]["spleen_ct"]
ARTIFACTS = REPO / "test-artifacts" / "console"


class Env:
    def __init__(self, node, pacs, driver, files, root):
        self.node, self.pacs, self.driver, self.files, self.root = node, pacs, driver, files, root
        self.base = f"http://127.0.0.1:{node.http_port}"
        self.study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def session(self) -> str:
        return self.driver.get_cookie("dicom_node_session")["value"]

    def request(self, method: str, path: str, *, body: dict | None = None, headers: dict | None = None,
                cookie: str | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        """A raw request (no redirects followed), with the browser's session cookie unless told otherwise."""
        connection = http.client.HTTPConnection("127.0.0.1", self.node.http_port, timeout=60)
        all_headers = {"Cookie": f"dicom_node_session={cookie if cookie is not None else self.session()}",
                       **(headers or {})}
        data = None
        if body is not None:
            data = urllib.parse.urlencode(body).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        content = response.read()
        connection.close()
        return response.status, content, response

    def jobs(self):
        journal = self.node.journal()
        try:
            return journal.jobs_in_state(*JobState)
        finally:
            journal.close()

    def audit(self):
        journal = self.node.journal()
        try:
            return AuditLog(journal).query(limit=1000)
        finally:
            journal.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots in {ARTIFACTS}")
    files = real_series(root / "series")
    for path in files:  # the shared series is anonymised: give it what an admin searches by
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.AccessionNumber, ds.StudyDate = PATIENT_ID, ACCESSION, "20260315"
        ds.save_as(path)
    install_spleen_model(root / "models")
    pacs = orthanc.Orthanc(root / "orthanc")  # not started: the first delivery finds the PACS down
    destination = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
                   "retry": {"initial_delay_s": 0.2, "max_delay_s": 0.2, "jitter": 0, "max_attempts": 2}}
    users = [{"name": USER, "password_hash": hash_password(PASSWORD, (2**14, 8, 1))},
             {"name": GUESSED, "password_hash": hash_password(GUESSED_PASSWORD, (2**14, 8, 1))}]
    with running_node(root / "node", http={"console": {"users": users}}, destinations={"pacs": destination},
                      pipelines={"spleen_ct": SPLEEN},
                      inference={"backend": "embedded", "model_repository": str(root / "models"),
                                 "embedded": {"cpu_threads": 2}}) as node:
        driver = browser.chromium(root / "browser")
        try:
            yield Env(node, pacs, driver, files, root)
        finally:
            driver.quit()
            pacs.stop()


def texts(env: Env, selector: str) -> list[str]:
    """The text of each element `selector` finds; none while the page is reloading itself."""
    from selenium.common.exceptions import StaleElementReferenceException
    try:
        return [element.text for element in env.driver.find_elements("css selector", selector)]
    except StaleElementReferenceException:
        return []


def wait_text(env: Env, path: str, predicate, timeout: float, what: str) -> str:
    """Reload `path` until its text satisfies `predicate` (the page also refreshes itself)."""
    def check():
        env.open(path)
        text = env.text()
        return text if predicate(text) else None
    return wait_for(check, timeout, what, interval=1.0)


def test_login_sets_a_strict_httponly_session_cookie(env):
    env.open("/")
    assert env.driver.current_url.startswith(env.base + "/login")
    env.driver.find_element("id", "username").send_keys(USER)
    env.driver.find_element("id", "password").send_keys("wrong")
    env.driver.find_element("id", "login").click()
    wait_for(lambda: texts(env, "#login-failed"), 20, "the failed login said on the login page")
    assert env.driver.get_cookie("dicom_node_session") is None
    env.driver.find_element("id", "username").send_keys(USER)
    env.driver.find_element("id", "password").send_keys(PASSWORD)
    env.driver.find_element("id", "login").click()
    wait_for(lambda: env.driver.current_url == env.base + "/" and texts(env, "#ready") == ["ready"], 20,
             "the overview, ready, after logging in")
    cookie = env.driver.get_cookie("dicom_node_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert env.driver.execute_script("return document.cookie") == ""  # HttpOnly: not readable by scripts
    events = [(a.event, a.actor) for a in env.audit()]
    assert ("login", USER) in events and ("login-failed", USER) in events
    env.shot("01-overview")


def test_series_arrives_and_finishes_on_its_series_page(env):
    result = dcmtk.storescu(env.node.port, env.files, extra=["-xv"])  # as JPEG 2000
    assert result.returncode == 0, result.output
    text = wait_text(env, f"/console/series?patient_id={PATIENT_ID}", lambda t: env.series_uid in t, 30,
                     "the series in the search")
    assert ACCESSION in text and "STORESCU" in text
    env.driver.find_element("link text", env.series_uid).click()
    wait_for(lambda: texts(env, "#series-uid") == [env.series_uid], 20, "the series page")
    # The job runs, its SEG goes to the PACS, which is down: two attempts, then the dead letter.
    wait_for(lambda: texts(env, ".export-state") == [ExportState.DEAD], 150,
             "the SEG's export dead-lettered on the self-refreshing series page", interval=1.0)
    assert env.driver.find_element("css selector", ".job-state").text == JobState.DONE
    steps = env.driver.find_element("css selector", "table.steps").text
    assert "spleen ok" in steps
    assert "inference" in env.driver.find_element("css selector", ".job").text  # stage timings shown
    env.shot("02-series-done")


def _seg_frame_for(job_output_dir: str, source_uid: str) -> tuple[np.ndarray, list[int]]:
    """The SEG's mask for one source instance, read with pydicom alone, and every frame's mask pixel count by
    source slice (for the organ's centre)."""
    (seg_path,) = [p for p in Path(job_output_dir).glob("*.dcm")
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    by_source: dict[str, np.ndarray] = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        by_source[str(uid)] = by_source.get(str(uid), 0) + frames[index].astype(bool)
    return by_source.get(source_uid, np.zeros((seg.Rows, seg.Columns), dtype=bool)), by_source


def test_preview_shows_the_seg_where_pydicom_reads_it(env):
    (job,) = [j for j in env.jobs() if j.series_instance_uid == env.series_uid]
    env.open(f"/console/series/{env.series_uid}")
    images = env.driver.find_elements("css selector", "img.preview")
    assert {(i.get_attribute("data-plane"), i.get_attribute("data-window")) for i in images} == {
        (plane, window) for plane in ("axial", "coronal", "sagittal") for window in ("soft", "lung")}
    assert env.driver.find_element("css selector", ".legend").text.strip() == "Spleen"
    wait_for(lambda: all(env.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                         for i in images), 60, "the previews loaded in the browser")
    env.driver.execute_script("arguments[0].scrollIntoView()", images[0])
    env.shot("03-previews")

    status, png, response = env.request("GET", f"/console/jobs/{job.id}/preview/axial.png?window=soft")
    assert status == 200 and response.getheader("Content-Type") == "image/png"
    axial = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    source_uid = response.getheader("X-Preview-Source-SOP-Instance-UID")
    expected, by_source = _seg_frame_for(job.output_dir, source_uid)
    assert axial.shape == (*expected.shape, 3) == (512, 512, 3)
    coloured = (axial[..., 0] != axial[..., 1]) | (axial[..., 1] != axial[..., 2])
    assert expected.sum() > 200  # the plane goes through the spleen
    np.testing.assert_array_equal(coloured, expected)  # colour exactly where the SEG says, nowhere else
    # ...and through its centre: the slice of the spleen's centre of mass, slices in position order.
    order = sorted(env.files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in order]
    counts = np.array([by_source.get(uid, np.zeros(1)).sum() for uid in uids], dtype=float)
    centre = (counts * np.arange(len(uids))).sum() / counts.sum()
    assert abs(uids.index(source_uid) - centre) <= 1.0

    status, png, _ = env.request("GET", f"/console/jobs/{job.id}/preview/coronal.png?window=soft")
    coronal = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    ds = pydicom.dcmread(order[0], stop_before_pixels=True)
    spacing_z = abs(float(pydicom.dcmread(order[1], stop_before_pixels=True).ImagePositionPatient[2])
                    - float(ds.ImagePositionPatient[2]))
    assert coronal.shape[1] == 512
    assert abs(coronal.shape[0] - 20 * spacing_z / float(ds.PixelSpacing[1])) <= 1
    assert ((coronal[..., 0] != coronal[..., 1]).sum()) > 100  # the spleen in the coronal plane too


def test_dead_letter_retried_from_the_console_reaches_orthanc(env):
    env.pacs.start()
    env.open("/console/failures")
    buttons = env.driver.find_elements("css selector", "button[id^=retry-export-]")
    assert len(buttons) == 1
    buttons[0].click()
    wait_for(lambda: texts(env, "#message") == ["export 1 requeued"], 20, "the retry confirmed on the page")
    env.shot("04-dead-letter-retried")
    seg = wait_for(lambda: study_series(env.pacs, env.study_uid).get("SEG"), 60, "the SEG in Orthanc")
    assert len(seg) == 1
    wait_text(env, f"/console/series/{env.series_uid}",
              lambda t: texts(env, ".export-state") == [ExportState.SENT], 30,
              "the export sent on the series page")
    audit = env.driver.find_element("id", "audit").text
    assert f"retry {USER}" in audit  # who did it
    env.shot("05-delivered")


def _as_new_series(files: list[Path], folder: Path) -> tuple[list[Path], str]:
    """The series again under a new Series Instance UID and new SOP Instance UIDs (the same study)."""
    folder.mkdir(parents=True)
    series_uid, copies = generate_uid(), []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(folder / f"{index:03d}.dcm")
        ds.save_as(copies[-1])
    return copies, series_uid


def test_a_model_version_uploaded_from_the_console_runs_the_next_job(env):
    entry = env.root / "models" / "spleen_ct"
    env.open("/console/models")
    env.driver.find_element("name", "name").send_keys("spleen_ct")
    env.driver.find_element("name", "config").send_keys(str(entry / "config.pbtxt"))
    env.driver.find_element("name", "model").send_keys(str(entry / "1" / "model.onnx"))
    env.driver.find_element("css selector", "#upload-form button").click()
    wait_for(lambda: any("version 2 installed" in text for text in texts(env, "#message")), 120,
             "the new version confirmed on the models page (after its check in a child process)")
    env.shot("08-model-installed")
    assert (entry / "2" / "model.onnx").read_bytes() == (entry / "1" / "model.onnx").read_bytes()
    assert ("model_installed", USER) in [(a.event, a.actor) for a in env.audit()]

    files, series_uid = _as_new_series(env.files, env.root / "again")
    result = dcmtk.storescu(env.node.port, files, extra=["-xv"])  # JPEG 2000, as stored
    assert result.returncode == 0, result.output
    wait_for(lambda: [j.state for j in env.jobs() if j.series_instance_uid == series_uid] == [JobState.DONE], 150,
             "the next series' job done")
    (job,) = [j for j in env.jobs() if j.series_instance_uid == series_uid]
    assert f"job {job.id} (spleen_ct): step spleen runs model spleen_ct version 2" in env.node.log_text()


class _ForeignPage(http.server.BaseHTTPRequestHandler):
    """Another origin's page: a form that posts itself to the node as soon as it loads."""

    target = ""

    def do_GET(self):
        body = (f'<html><body><form id="f" method="post" action="{self.target}">'
                '<input name="csrf_token" value="guessed"></form>'
                '<script>document.getElementById("f").submit()</script></body></html>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet: the test reads the node's log, not this page server's."""


def test_a_form_on_another_origin_is_refused(env):
    (job,) = [j for j in env.jobs() if j.series_instance_uid == env.series_uid]
    handler = type("Foreign", (_ForeignPage,), {"target": f"{env.base}/console/jobs/{job.id}/retry"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        retries = sum(a.event == "retry" for a in env.audit())
        env.driver.get(f"http://localhost:{server.server_port}/")  # another site, with the session cookie set
        wait_for(lambda: env.driver.current_url.startswith(env.base)
                 and any("cross-origin POST" in text for text in texts(env, "body")), 20,
                 "the node's refusal of the form another origin posted")
        env.shot("06-foreign-form-refused")
        assert [j.state for j in env.jobs() if j.id == job.id] == [JobState.DONE]
        assert sum(a.event == "retry" for a in env.audit()) == retries
        assert "refused" in env.node.log_text()
    finally:
        server.shutdown()
        server.server_close()


def test_foreign_host_and_missing_or_wrong_csrf_token_are_refused(env):
    (job,) = [j for j in env.jobs() if j.series_instance_uid == env.series_uid]
    origin = {"Origin": env.base}
    status, body, _ = env.request("GET", "/", headers={"Host": f"evil.example:{env.node.http_port}"})
    assert status == 403 and b"not a name of this server" in body
    status, body, _ = env.request("POST", f"/console/jobs/{job.id}/retry", body={}, headers=origin)
    assert status == 403 and b"CSRF" in body
    status, body, _ = env.request("POST", f"/console/jobs/{job.id}/retry", body={"csrf_token": "wrong"},
                                  headers=origin)
    assert status == 403 and b"CSRF" in body
    status, body, _ = env.request("POST", f"/v1/jobs/{job.id}/retry", headers=origin)  # the API: header token
    assert status == 403 and b"CSRF" in body
    env.open("/console/failures")  # a right token without Origin (not a browser's request) is refused too
    token = env.driver.find_element("name", "csrf_token").get_attribute("value")
    status, body, _ = env.request("POST", f"/console/jobs/{job.id}/retry", body={"csrf_token": token})
    assert status == 403 and b"without Origin" in body
    assert [j.state for j in env.jobs() if j.id == job.id] == [JobState.DONE]


def test_logout_ends_the_session(env):
    old = env.session()
    env.open("/")
    env.driver.find_element("id", "logout").click()
    wait_for(lambda: env.driver.current_url.startswith(env.base + "/login"), 20, "the login page after logout")
    assert env.driver.get_cookie("dicom_node_session") is None
    status, _, response = env.request("GET", "/console/failures", cookie=old)  # the old cookie is dead
    assert status == 303 and response.getheader("Location").startswith("/login")
    assert ("logout", USER) in [(a.event, a.actor) for a in env.audit()]
    env.shot("07-logged-out")


def test_a_name_past_its_failed_logins_is_refused_from_that_host_even_with_its_password(env):
    limit = 5  # http.console.failed_logins, the default

    def log_in(name: str, password: str):
        return env.request("POST", "/login", body={"username": name, "password": password, "next": "/"},
                           headers={"Origin": env.base}, cookie="")

    for _ in range(limit):
        status, body, _ = log_in(GUESSED, "a wrong guess")
        assert status == 401 and b"Unknown user or wrong password" in body
    status, body, response = log_in(GUESSED, GUESSED_PASSWORD)
    assert status == 429 and b"Too many failed logins" in body
    assert 1 <= int(response.getheader("Retry-After")) <= 15 * 60
    assert response.getheader("Set-Cookie") is None  # no session
    # Another name from the same host is not held back: the limit is per name and host.
    status, _, response = log_in(USER, PASSWORD)
    assert status == 303 and "dicom_node_session=" in response.getheader("Set-Cookie")
    events = [(a.event, a.actor) for a in env.audit()]
    assert events.count(("login-failed", GUESSED)) == limit and ("login-locked", GUESSED) in events
    assert ("login", GUESSED) not in events
    env.open("/login")  # and a person is told so on the login page
    env.driver.find_element("id", "username").send_keys(GUESSED)
    env.driver.find_element("id", "password").send_keys(GUESSED_PASSWORD)
    env.driver.find_element("id", "login").click()
    wait_for(lambda: texts(env, "#login-locked"), 20, "the lockout said on the login page")
    assert env.driver.get_cookie("dicom_node_session") is None
    env.shot("09-login-locked")


def test_the_api_docs_render_from_the_nodes_own_files(env):
    env.open("/docs")
    def paths() -> set[str]:
        return set(texts(env, ".opblock-summary-path"))
    wait_for(lambda: {"/v1/jobs", "/admin/model/{name}", "/v1/infer/{pipeline_or_model}"} <= paths(), 30,
             "Swagger UI listing the API's operations")
    loaded = env.driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href)")
    assert loaded and all(url.startswith(env.base + "/docs/assets/") for url in loaded), loaded
    status, _, _ = env.request("GET", "/docs/assets/swagger-editor-bundle.js", cookie="")
    assert status == 404  # only the files /docs loads
    env.shot("10-api-docs")
