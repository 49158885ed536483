"""Protocol abuse and access control: garbage, malformed PDUs, silent and stalled peers, too many
associations, unknown AEs and wrong hosts are refused or timed out, and the node leaks no thread or file."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.peers import dcmtk, wait_for
from tests.reliability.node import with_journal
from tests.reliability.process_stats import resources
from tests.reliability.summary import CaseResult
from tests.series_factory import ct_datasets, write_ct_series
from tests.test_receive import NODE_AE, Node, running_node

pytestmark = dcmtk.required()

MAX_ASSOCIATIONS = 4
TIMEOUT_S = 3  # ACSE, DIMSE and network timeouts of the node under test
LAZY_SLACK = {"threads": 2, "fds": 4}


def _a_associate_rq_header(length: int) -> bytes:
    return struct.pack(">BBI", 0x01, 0x00, length)


HELD_OPEN = b"held open"  # the node neither answered nor closed: a thread and a slot held by garbage


def _raw(port: int, payload: bytes) -> bytes:
    """Send `payload` on a fresh TCP connection and keep it open; return what the node answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S * 4) as sock:
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # the node reset the connection: an answer too
            return received or b"reset"
        except TimeoutError:
            return HELD_OPEN
        return received


def _silent(port: int) -> bytes:
    """Connect and never send: the node must close the connection itself (ARTIM, PS3.8 9.1.5)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S * 4) as sock:
        try:
            return sock.recv(65536) or b"closed"
        except ConnectionResetError:
            return b"reset"
        except TimeoutError:
            return HELD_OPEN


def _scu(calling_ae: str = "STORESCU", bind: str = "127.0.0.1") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S * 4
    return ae


def _associate(port: int, **kwargs):
    """An association, waiting while the node rejects it transiently for its association limit.

    After abuse the node's slots come free only when its association threads have wound down,
    which on a loaded 2-core runner took a few seconds; a transient A-ASSOCIATE-RJ meanwhile is
    the right answer (PS3.8 9.3.4: the sender retries). A slot held for good still fails here.
    """
    deadline = time.monotonic() + TIMEOUT_S * 5
    while True:
        assoc = _scu().associate("127.0.0.1", port, ae_title=NODE_AE, **kwargs)
        if assoc.is_established or not assoc.is_rejected or time.monotonic() > deadline:
            return assoc
        time.sleep(0.5)


def _stall_mid_dataset(port: int) -> str:
    """Send the C-STORE-RQ command and part of its data set, then nothing: the node must time out and abort."""
    assoc = _associate(port, max_pdu=4096)
    assert assoc.is_established
    (ds,) = ct_datasets(1, rows=64, columns=64)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(buffer.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    pdus = list(message.encode_msg(context.context_id, 4096))
    for primitive in pdus[: len(pdus) // 2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.send(pdu.encode())
    wait_for(lambda: not assoc.is_alive(), TIMEOUT_S * 10, "the node aborting a stalled C-STORE")
    return f"aborted={assoc.is_aborted} sop={ds.SOPInstanceUID}"


def _describe(answer: object) -> str:
    """The node's answer in PS3.8 9.3 words (the PDU type is the first byte)."""
    if answer == b"":
        return "closed"
    if isinstance(answer, bytes) and answer not in (HELD_OPEN, b"closed", b"reset"):
        return {0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}.get(answer[0], f"PDU 0x{answer[0]:02X}") + ", closed"
    return answer.decode() if isinstance(answer, bytes) else str(answer)[:80]


ABUSE: dict[str, Callable[[int], object]] = {
    "random bytes": lambda port: _raw(port, os.urandom(8192)),
    "HTTP request on the DICOM port": lambda port: _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "unknown PDU type 0xFF": lambda port: _raw(port, struct.pack(">BBI", 0xFF, 0, 4) + b"abcd"),
    "A-ASSOCIATE-RQ length past the data": lambda port: _raw(port, _a_associate_rq_header(1000) + b"\x00\x01"),
    "A-ASSOCIATE-RQ claiming 4 GB": lambda port: _raw(port, _a_associate_rq_header(0xFFFFFFFF) + os.urandom(64)),
    "A-ASSOCIATE-RQ with garbage items": lambda port: _raw(
        port, _a_associate_rq_header(68 + 16) + b"\x00\x01\x00\x00" + b"DICOMNODE       STORESCU        "
        + b"\x00" * 32 + b"\x10\x00\x00\x0c" + os.urandom(12)),
    "P-DATA-TF before any association": lambda port: _raw(port, struct.pack(">BBI", 0x04, 0, 10) + os.urandom(10)),
    "A-RELEASE-RQ before any association": lambda port: _raw(port, struct.pack(">BBIi", 0x05, 0, 4, 0)),
    "connection that never sends": _silent,
    "sender that stops mid-dataset": _stall_mid_dataset,
}


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    overrides = {"node": {"max_associations": MAX_ASSOCIATIONS, "acse_timeout_s": TIMEOUT_S,
                          "dimse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S}}
    with running_node(tmp_path_factory.mktemp("protocol"), **overrides) as running:
        yield running


def _serves(node: Node, tmp_dir) -> bool:
    """A good sender gets its series stored (after a transient rejection for the association limit
    at most TIMEOUT_S x 5 seconds long, see `_associate`)."""
    files = write_ct_series(tmp_dir, 3, rows=64, columns=64)
    deadline = time.monotonic() + TIMEOUT_S * 5
    while True:
        result = dcmtk.storescu(node.port, files)
        if len(result.acknowledged) == 3:
            return True
        if "Local limit exceeded" not in result.output or time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _abuse_round(node: Node, tmp_dir: Path) -> dict[str, tuple[str, bool]]:
    """Every abuse once, each followed by a good send; name -> (the node's answer, still serving)."""
    outcomes = {}
    for name, abuse in ABUSE.items():
        try:
            answer = abuse(node.port)
            served = answer != HELD_OPEN and _serves(node, tmp_dir / name.replace(" ", "_"))
        except Exception as error:  # the abuse helper itself must not fail either
            answer, served = f"{type(error).__name__}: {error}", False
        outcomes[name] = (_describe(answer), served)
    return outcomes


def test_protocol_abuse_is_survived_without_leaks(node, tmp_path, ledger):
    """Two rounds of abuse: the first brings pools and caches to their working size, the second must
    leave the thread and file-descriptor counts where the first left them. A leak grows by at least one
    thread or socket per abusive connection, ten a round; the slack covers what the node creates lazily
    and keeps (a worker thread, a socket pair, one more SQLite connection's three files)."""
    first = _abuse_round(node, tmp_path / "round1")
    time.sleep(TIMEOUT_S * 2)
    baseline = resources(node.process.pid)
    second = _abuse_round(node, tmp_path / "round2")
    for name, (answer, served) in second.items():
        ledger.record(CaseResult("protocol", name, "closed or aborted by the node, node still serving",
                                 f"{answer}, serving={served}", served and first[name][1]))
    assert node.process.alive(), node.log_text()[-3000:]
    assert [n for n, (_, served) in {**first, **second}.items() if not served] == [], node.log_text()[-3000:]
    after = wait_for(lambda: (r := resources(node.process.pid)).within(baseline, **LAZY_SLACK) and r,
                     TIMEOUT_S * 10,
                     f"threads/fds back to {baseline} (now {resources(node.process.pid)})", interval=0.5)
    ledger.record(CaseResult("protocol", "threads and fds after a second round",
                             f"<= {baseline} + {LAZY_SLACK}", str(after), True))


def test_stalled_instance_leaves_no_file_or_row(node):
    outcome = _stall_mid_dataset(node.port)
    sop = outcome.split("sop=")[1]
    assert "aborted=True" in outcome
    assert not list((node.storage / "spool").rglob(f"*{sop}*"))
    assert with_journal(node, lambda journal: journal.find_instance(sop)) is None


def test_more_associations_than_the_limit_are_rejected_then_served(node, tmp_path, ledger):
    held = [_associate(node.port) for _ in range(MAX_ASSOCIATIONS)]
    try:
        assert all(a.is_established for a in held)
        # The node closes an association idle for its network timeout (TIMEOUT_S): on a loaded runner,
        # opening the others can take that long, so each held one says something just before the extra.
        assert all(a.send_c_echo().Status == 0x0000 for a in held)
        extra = _scu().associate("127.0.0.1", node.port, ae_title=NODE_AE)
        rejected = extra.is_rejected
        if extra.is_established:
            extra.release()
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    served = _serves(node, tmp_path / "after")
    ledger.record(CaseResult("protocol", f"association {MAX_ASSOCIATIONS + 1} of max {MAX_ASSOCIATIONS}",
                             "A-ASSOCIATE-RJ, then served", f"rejected={rejected}, served={served}",
                             rejected and served))
    assert rejected and served, f"rejected={rejected}, served={served}\n{node.log_text()[-3000:]}"


def test_idle_association_is_closed_by_the_node(node):
    assoc = _associate(node.port)
    assert assoc.is_established
    wait_for(lambda: not assoc.is_alive(), TIMEOUT_S * 10, "the node closing an idle association")
    assert assoc.is_aborted or assoc.is_released


# --- access -----------------------------------------------------------------------------------------

def test_unknown_calling_ae_is_refused(node, tmp_path, ledger):
    files = write_ct_series(tmp_path / "intruder", 2, rows=64, columns=64)
    result = dcmtk.storescu(node.port, files, calling_ae="INTRUDER")
    refused = result.acknowledged == [] and "Calling AE Title Not Recognized" in result.output
    ledger.record(CaseResult("access", "unknown calling AE", "A-ASSOCIATE-RJ 1/1/3",
                             "rejected: Calling AE Title Not Recognized" if refused else result.output[-200:], refused))
    assert refused, result.output
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert with_journal(node, lambda journal: journal.get_series(uid)) is None


def test_known_ae_from_the_wrong_host_is_refused(tmp_path, ledger):
    """STORESCU is allowed from 127.0.0.2 only: refused from 127.0.0.1, accepted from 127.0.0.2 (both loopback)."""
    overrides = {"security": {"calling_aes": [{"ae_title": "STORESCU", "host": "127.0.0.2"}]}}
    with running_node(tmp_path / "node", **overrides) as node:
        wrong = _scu().associate("127.0.0.1", node.port, ae_title=NODE_AE, bind_address=("127.0.0.1", 0))
        right = _scu().associate("127.0.0.1", node.port, ae_title=NODE_AE, bind_address=("127.0.0.2", 0))
        rejected, accepted = wrong.is_rejected, right.is_established
        if accepted:
            right.release()
        log = node.log_text()
    ledger.record(CaseResult("access", "known AE from a wrong host", "rejected from the wrong host only",
                             f"wrong host rejected={rejected}, right host accepted={accepted}", rejected and accepted))
    assert rejected and accepted
    assert "calling AE 'STORESCU' from 127.0.0.1 not recognized" in log
