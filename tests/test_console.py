"""The console's parts that need no node: password hashes, its config keys, secret redaction, the PNG
encoder (read back with Pillow) and the preview's drawing of masks and HU bands."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicom_node.config import Config
from dicom_node.ops.console.png import encode_png
from dicom_node.ops.console.preview import BAND_COLOURS, FILL_ALPHA, JobResult, SegmentView, render
from dicom_node.ops.console.views import redacted
from dicom_node.passwords import hash_password, parse_hash, verify_password
from inference.parameters import InvolvementParameters

FAST = (2**14, 8, 1)


def test_a_password_hash_verifies_its_password_only():
    stored = hash_password("correct horse", FAST)
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert hash_password("correct horse", FAST) != stored  # salted
    for broken in ("plain-text", "scrypt$1024$8$1$AAAA$BBBB", stored.replace("$8$", "$x$")):
        with pytest.raises(ValueError):
            parse_hash(broken)


def test_hash_password_prints_a_hash_of_the_line_it_reads(monkeypatch, capsys):
    from dicom_node.ops import cli
    monkeypatch.setattr("sys.stdin", io.StringIO("pass phrase with spaces\n"))
    assert cli.main(["hash-password"]) == 0
    assert verify_password("pass phrase with spaces", capsys.readouterr().out.strip())
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["hash-password"]) == 1
    assert "empty password" in capsys.readouterr().err


def test_console_config_keys_are_checked():
    user = {"name": "ann", "password_hash": hash_password("pw", FAST)}
    config = Config.model_validate({"http": {"allowed_hosts": ["Node.Example", "[::1]"],
                                             "console": {"users": [user]}}})
    assert config.http.allowed_hosts == ["node.example", "::1"]
    with pytest.raises(ValueError, match="not a host name"):
        Config.model_validate({"http": {"allowed_hosts": ["node.example:8080"]}})
    with pytest.raises(ValueError, match="read_only_without_login needs a loopback host"):
        Config.model_validate({"http": {"host": "0.0.0.0", "bearer_token": "t" * 16,
                                        "console": {"read_only_without_login": True}}})
    with pytest.raises(ValueError, match="allowed_hosts"):
        Config.model_validate({"http": {"host": "0.0.0.0", "bearer_token": "t" * 16, "console": {"users": [user]}}})
    with pytest.raises(ValueError, match="password hash"):
        Config.model_validate({"http": {"console": {"users": [{"name": "ann", "password_hash": "pw"}]}}})


def test_secrets_are_redacted_from_the_effective_config():
    config = Config.model_validate({
        "node": {"journal_url": "postgresql+psycopg://node:hunter2@db/journal"},
        "http": {"bearer_token": "b" * 20, "console": {"users": [{"name": "ann",
                                                                  "password_hash": hash_password("pw", FAST)}]},
                 "stow": {"senders": [{"name": "CLOUD", "token": "s" * 20}]}},
        "destinations": {"web": {"kind": "dicomweb", "url": "https://pacs.example/dicom-web",
                                 "auth": {"type": "basic", "username": "u", "password": "p4ss"}}}})
    text = repr(redacted(config.model_dump(mode="json")))
    for secret in ("hunter2", "b" * 20, "s" * 20, "p4ss", "scrypt$"):
        assert secret not in text
    assert "(redacted)" in text and "CLOUD" in text and "node:***@db" in text


def test_png_reads_back_pixel_for_pixel():
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(rgb)))
    assert image.mode == "RGB" and image.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(image), rgb)


def _result(hu: np.ndarray, masks: dict[int, np.ndarray], labels: dict[int, str], bands=None) -> JobResult:
    segments = tuple(SegmentView(n, labels[n], colour, int(masks[n].sum()))
                     for n, colour in zip(sorted(masks), ((255, 64, 0), (0, 170, 255))))
    return JobResult(None, hu, (1.0, 1.0, 2.0), masks, segments, (2, 10, 10), tuple(range(hu.shape[0])),
                     tuple(str(k) for k in range(hu.shape[0])), bands)


def test_masks_are_filled_and_outlined_in_three_planes():
    hu = np.full((5, 20, 20), 40, dtype=np.int16)  # soft tissue level: mid grey
    mask = np.zeros(hu.shape, dtype=bool)
    mask[1:4, 5:15, 6:14] = True
    result = _result(hu, {1: mask}, {1: "Spleen"})
    axial = render(result, "axial", "soft")
    assert axial.shape == (20, 20, 3)
    coloured = (axial[..., 0] != axial[..., 1]) | (axial[..., 1] != axial[..., 2])
    np.testing.assert_array_equal(coloured, mask[2])
    assert tuple(axial[5, 6]) == (255, 64, 0)  # the outline in full colour
    grey = 127.5
    assert tuple(axial[8, 8]) == tuple(np.round(np.array([grey] * 3) * (1 - FILL_ALPHA)
                                                + np.array((255, 64, 0)) * FILL_ALPHA).astype(np.uint8))
    coronal = render(result, "coronal", "soft")
    assert coronal.shape == (5 * 2, 20, 3)  # slices stretched by slice / pixel spacing
    rows = np.flatnonzero(((coronal[..., 0] != coronal[..., 1])).any(axis=1))
    np.testing.assert_array_equal(rows, np.arange(2, 8))  # slices 1-3 of 5, the head end (last slice) up
    sagittal = render(result, "sagittal", "lung")
    assert sagittal.shape == (10, 20, 3) and ((sagittal[..., 0] != sagittal[..., 2]).sum() > 0)


def test_lungs_drawn_by_hu_band():
    hu = np.full((3, 12, 12), -850, dtype=np.int16)  # normally aerated
    hu[2, 2:6, 2:6] = -500  # ground-glass, on the centre slice (k = 2)
    hu[2, 6:10, 6:10] = -100  # consolidation
    lungs = np.zeros(hu.shape, dtype=bool)
    lungs[:, 1:11, 1:11] = True
    result = _result(hu, {1: lungs}, {1: "Right lung"}, InvolvementParameters())
    image = render(result, "axial", "lung", bands=True).astype(int)
    ground_glass, consolidation, normal = image[3, 3], image[8, 8], image[5, 9]
    assert ground_glass[0] > ground_glass[2] and ground_glass[1] > ground_glass[2]  # yellow
    assert consolidation[0] > consolidation[1] + 50 and consolidation[0] > consolidation[2] + 50  # red
    assert normal[0] == normal[1] == normal[2]  # normal parenchyma stays grey
    assert set(BAND_COLOURS) == {"emphysema", "ground_glass", "consolidation"}


def _request(method: str, path: str, host: str = "127.0.0.1:8080", **headers: str):
    from starlette.requests import Request
    raw = [(b"host", host.encode())] + [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": method, "path": path, "query_string": b"", "headers": raw})


def _access(**http):
    from dicom_node.ops.console.access import Access
    return Access(Config.model_validate({"http": http}).http)


def test_access_on_loopback_without_token_or_users():
    from dicom_node.ops.console.access import Caller
    access = _access()
    assert access.check(_request("GET", "/v1/jobs"), False) == Caller("anonymous")  # local scripts, as before
    assert access.check(_request("POST", "/v1/jobs/1/retry"), False) == Caller("anonymous")
    assert access.check(_request("GET", "/v1/jobs", host="evil.example:8080"), False).status_code == 403
    refused = access.check(_request("POST", "/v1/jobs/1/retry", origin="http://evil.example"), False)
    assert refused.status_code == 403
    assert access.check(_request("GET", "/console/series"), False).status_code == 303  # to the login page
    assert access.check(_request("POST", "/console/jobs/1/retry", origin="http://127.0.0.1:8080"),
                        False).status_code == 403  # no session


def test_read_only_pages_without_login_only_where_enabled():
    access = _access(console={"read_only_without_login": True})
    caller = access.check(_request("GET", "/console/series"), False)
    assert caller.actor == "anonymous" and not caller.may_act
    assert access.check(_request("POST", "/console/jobs/1/retry", origin="http://127.0.0.1:8080"),
                        False).status_code == 403


def test_off_loopback_the_host_must_be_allowed_and_the_token_is_needed():
    access = _access(host="0.0.0.0", bearer_token="t" * 20, allowed_hosts=["node.example"])
    assert access.check(_request("GET", "/v1/jobs", host="node.example:8080"), False).status_code == 401
    assert access.check(_request("GET", "/v1/jobs", host="node.example:8080", authorization="Bearer " + "t" * 20),
                        False).actor == "token"
    assert access.check(_request("GET", "/v1/jobs", host="127.0.0.1:8080", authorization="Bearer " + "t" * 20),
                        False).status_code == 403  # not a name of this server
    assert access.check(_request("GET", "/healthz", host="node.example"), True).actor == "anonymous"


def test_a_session_needs_its_csrf_token_and_origin_for_the_api():
    from dicom_node.ops.console.access import SESSION_COOKIE
    access = _access()
    session = access.sessions.start("ann")
    cookie = f"{SESSION_COOKIE}={session.id}"
    assert access.check(_request("GET", "/v1/jobs", cookie=cookie), False).actor == "ann"
    assert access.check(_request("POST", "/v1/jobs/1/retry", cookie=cookie), False).status_code == 403  # no Origin
    own = "http://127.0.0.1:8080"
    assert access.check(_request("POST", "/v1/jobs/1/retry", cookie=cookie, origin=own), False).status_code == 403
    assert access.check(_request("POST", "/v1/jobs/1/retry", cookie=cookie, origin=own,
                                 x_csrf_token=session.csrf_token), False).actor == "ann"
    access.sessions.end(session.id)
    assert access.check(_request("GET", "/console/series", cookie=cookie), False).status_code == 303


def test_failed_logins_are_limited_per_name_and_host_in_a_sliding_window():
    from dicom_node.ops.console.access import FailedLogins
    now = [1000.0]
    limits = FailedLogins(limit=3, window_s=60, clock=lambda: now[0])

    def fail(name: str = "ann", host: str = "10.0.0.1", after_s: float = 10) -> bool:
        reached = limits.failed(name, host)
        now[0] += after_s
        return reached

    assert [fail(), fail(), fail(after_s=0)] == [False, False, True]  # at 1000, 1010, 1020: the 3rd reaches it
    assert limits.retry_after("ann", "10.0.0.1") == 40  # until the one at 1000 is 60 s old
    assert limits.retry_after("ann", "10.0.0.2") == 0 and limits.retry_after("bob", "10.0.0.1") == 0
    now[0] = 1060
    assert limits.retry_after("ann", "10.0.0.1") == 0  # the first fell out of the window: two left
    assert fail(after_s=0)  # a third again, at 1060
    assert limits.retry_after("ann", "10.0.0.1") == 10  # until the one at 1010 is 60 s old
    now[0] = 1130
    assert limits.retry_after("ann", "10.0.0.1") == 0
    fail("bob")
    fail("bob")
    limits.succeeded("bob", "10.0.0.1")  # a login that gets in forgets that name's failures from that host
    assert not fail("bob") and limits.retry_after("bob", "10.0.0.1") == 0


def test_failed_logins_remember_a_bounded_number_of_names():
    from dicom_node.ops.console.access import FailedLogins
    limits = FailedLogins(limit=1, window_s=60)
    limits.KEPT = 3
    for name in ("a", "b", "c", "d"):
        assert limits.failed(name, "10.0.0.9")
    assert limits.retry_after("a", "10.0.0.9") == 0  # the least recently failed was forgotten
    assert all(limits.retry_after(name, "10.0.0.9") > 0 for name in ("b", "c", "d"))
