"""The node's Upper Layer acceptor on the wire (PS3.8 9, PS3.7 9.3), driven PDU by PDU over a raw socket:
the PDUs are built and the answers decoded with pynetdicom and pydicom, not with the node's own codec."""

from __future__ import annotations

import random
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.receive.upper_layer import NegotiationCache
from tests.peers import wait_for
from tests.test_api import samples
from tests.series_factory import ct_datasets
from tests.test_receive import NODE_AE, Node, dataset_bytes, running_node

NODE_MAX_PDU = 16384
ACSE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("upper-layer"), node={"max_pdu": NODE_MAX_PDU,
                                                                                "acse_timeout_s": ACSE_TIMEOUT_S}) as running:
        yield running


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data
    pdu_type, _, length = struct.unpack(">BBI", exactly(6))
    return pdu_type, exactly(length)


def _associate(port: int, max_pdu: int, application_context: str = "1.2.840.10008.3.1.1.1",
               contexts: list[PresentationContext] | None = None, calling_ae: str = "STORESCU",
               source: str = "127.0.0.1") -> tuple[socket.socket, int, bytes]:
    """Open a connection from `source` and send an A-ASSOCIATE-RQ for `contexts` (IDs 1, 3, 5...); by default
    Verification (context 1) and CT (context 3)."""
    request = A_ASSOCIATE()
    request.application_context_name = application_context
    request.calling_ae_title, request.called_ae_title = calling_ae, NODE_AE
    contexts = contexts or [build_context(Verification), build_context(CTImageStorage)]
    for index, context in enumerate(contexts):
        context.context_id = 2 * index + 1
    request.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    request.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(pdu.encode())
    pdu_type, body = _read_pdu(sock)
    return sock, pdu_type, body


def _send_message(sock: socket.socket, message, context_id: int) -> None:
    for primitive in message.encode_msg(context_id, NODE_MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())


def _read_command(sock: socket.socket, max_pdu: int) -> Dataset:
    """Reassemble one command set from P-DATA-TF PDUs, checking none is longer than we announced."""
    command = b""
    while True:
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x04, f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}"
        assert len(body) <= max_pdu
        pos = 0
        while pos < len(body):
            length, _, control = struct.unpack_from(">IBB", body, pos)
            command += body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control == 0x03:
                return read_dataset(BytesIO(command), True, True)


def _echo(sock: socket.socket, message_id: int) -> None:
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = message_id, Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    _send_message(sock, message, 1)


def test_association_is_accepted_with_our_implementation_and_limits(node):
    sock, pdu_type, body = _associate(node.port, 0)
    with sock:
        assert pdu_type == 0x02
        accept = A_ASSOCIATE_AC()
        accept.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
        primitive = accept.to_primitive()
        assert primitive.maximum_length_received == NODE_MAX_PDU
        versions = [item.implementation_version_name for item in primitive.user_information
                    if isinstance(item, ImplementationVersionNameNotification)]
        assert versions and versions[0].startswith("DICOM_NODE_")
        results = {cx.context_id: cx.result for cx in primitive.presentation_context_definition_results_list}
        assert results == {1: 0x00, 3: 0x00}
        sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))  # A-RELEASE-RQ
        assert _read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


def test_a_repeated_request_gets_the_first_answer_and_each_connection_is_checked(node):
    """A sender's associations all send the same A-ASSOCIATE-RQ, negotiated once: the second is accepted with
    the first's A-ASSOCIATE-AC, and the same bytes from a host the calling AE is not allowed from are still
    rejected (the allow-list entry for ECHOSCU names 127.0.0.1)."""
    answers = []
    for _ in range(2):
        sock, pdu_type, body = _associate(node.port, 0, calling_ae="ECHOSCU")
        with sock:
            assert pdu_type == 0x02
            answers.append(body)
            sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))  # A-RELEASE-RQ
            assert _read_pdu(sock)[0] == 0x06
    assert answers[0] == answers[1]
    sock, pdu_type, body = _associate(node.port, 0, calling_ae="ECHOSCU", source="127.0.0.2")
    with sock:
        assert pdu_type == 0x03 and body[1:4] == bytes([0x01, 0x01, 0x03])  # calling AE title not recognized


def test_the_negotiation_cache_works_a_request_out_once_keeps_no_failure_and_stays_bounded():
    """Eight connections sending one request at once share one negotiation; a request that failed is worked
    out again; the oldest request is dropped past the cache's size."""
    calls: list[bytes] = []

    def negotiate(body: bytes) -> str:
        calls.append(body)
        time.sleep(0.2)  # the other seven arrive while the first is being worked out
        if body == b"bad":
            raise ValueError("does not decode")
        return f"answer to {body!r}"

    cache = NegotiationCache(2)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: cache.get(b"rq", negotiate), range(8)))
    assert answers == ["answer to b'rq'"] * 8 and calls == [b"rq"]
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get(b"bad", negotiate)
    assert calls.count(b"bad") == 2
    cache.get(b"other", negotiate)
    cache.get(b"third", negotiate)  # past the size of 2: b"rq", the least recently used, is dropped
    cache.get(b"rq", negotiate)
    assert calls.count(b"rq") == 2


def test_responses_respect_a_small_peer_maximum_pdu(node):
    peer_max = 40  # forces the ~80-byte C-ECHO-RSP into several P-DATA-TF PDUs
    sock, pdu_type, _ = _associate(node.port, peer_max)
    with sock:
        assert pdu_type == 0x02
        _echo(sock, 7)
        response = _read_command(sock, peer_max)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8030, 7, 0x0000)


def test_an_operation_the_node_does_not_perform_is_answered_and_the_association_goes_on(node):
    sock, pdu_type, _ = _associate(node.port, 0)
    with sock:
        assert pdu_type == 0x02
        identifier = DicomBytesIO()
        identifier.is_little_endian, identifier.is_implicit_VR = True, True
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID = "PATIENT", "*"
        write_dataset(identifier, query)
        request = C_FIND()
        request.MessageID, request.AffectedSOPClassUID, request.Priority = 3, Verification, 2
        request.Identifier = BytesIO(identifier.getvalue())
        message = C_FIND_RQ()
        message.primitive_to_message(request)
        _send_message(sock, message, 1)
        response = _read_command(sock, NODE_MAX_PDU)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8020, 3, 0x0211)
        _echo(sock, 4)
        assert _read_command(sock, NODE_MAX_PDU).Status == 0x0000


def test_a_pdu_longer_than_announced_is_aborted(node):
    sock, pdu_type, _ = _associate(node.port, 0)
    with sock:
        assert pdu_type == 0x02
        too_long = NODE_MAX_PDU + 100
        pdv = struct.pack(">IBB", too_long - 4, 3, 0x00) + bytes(too_long - 6)
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x07 and body[2:4] == bytes([0x02, 0x06])  # A-ABORT, provider, invalid parameter
        try:  # then the node closes; the rest of our PDU was never read, so the close may come as a reset
            after_abort = sock.recv(10)
        except ConnectionResetError:
            after_abort = b""
        assert after_abort == b""


def test_a_data_set_fragment_without_a_command_is_aborted(node):
    sock, pdu_type, _ = _associate(node.port, 0)
    with sock:
        assert pdu_type == 0x02
        pdv = struct.pack(">IBB", 10, 3, 0x02) + bytes(8)
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x07 and body[2:4] == bytes([0x02, 0x02])  # A-ABORT, provider, unexpected PDU


def test_an_unknown_application_context_is_rejected(node):
    sock, pdu_type, body = _associate(node.port, 0, application_context="1.2.3.4")
    with sock:
        assert pdu_type == 0x03 and body[1:4] == bytes([0x01, 0x01, 0x02])  # A-ASSOCIATE-RJ permanent, user, 2


def test_a_request_trickled_byte_by_byte_is_cut_off_at_the_acse_timeout(node):
    """A deadline per PDU, not a timeout per read: one byte every half second must not hold the slot."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 200))
        started = time.monotonic()
        closed_after = None
        for _ in range(40):
            time.sleep(0.5)
            try:
                sock.sendall(b"\x00")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "the node kept reading a trickled A-ASSOCIATE-RQ for 20 s"
        assert closed_after < ACSE_TIMEOUT_S + 3


def _results(pdu_type: int, body: bytes) -> dict[int, tuple[int, str]]:
    """(result, transfer syntax) of each presentation context of an A-ASSOCIATE-AC."""
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}"
    accept = A_ASSOCIATE_AC()
    accept.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
    return {cx.context_id: (cx.result, str(cx.transfer_syntax[0]) if cx.transfer_syntax else "")
            for cx in accept.to_primitive().presentation_context_definition_results_list}


def _release(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))  # A-RELEASE-RQ
    assert _read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


@pytest.fixture(scope="module")
def narrow_node(tmp_path_factory) -> Iterator[Node]:
    """One association at a time, a long ACSE timeout, Secondary Capture denied."""
    with running_node(tmp_path_factory.mktemp("narrow"), node={
            "max_associations": 1, "acse_timeout_s": 30,
            "sop_classes": {"deny": ["SecondaryCaptureImageStorage"]}}) as running:
        yield running


def test_a_peer_keeping_tcp_open_after_release_does_not_hold_the_only_slot(narrow_node):
    """Released means the slot is free, even while the peer leaves its connection open (Sta13) for as long
    as the ACSE timeout would let it."""
    sock, pdu_type, _ = _associate(narrow_node.port, 0)
    with sock:
        assert pdu_type == 0x02
        _release(sock)
        released_at = time.monotonic()
        accepted = None
        while time.monotonic() - released_at < 5:  # the node's thread gives the slot back right after the RP
            second, second_type, _ = _associate(narrow_node.port, 0)
            with second:
                if second_type == 0x02:
                    _echo(second, 1)
                    assert _read_command(second, NODE_MAX_PDU).Status == 0x0000
                    _release(second)
                    accepted = time.monotonic() - released_at
                    break
            time.sleep(0.1)
        assert accepted is not None, "a new association was refused while a released peer kept its TCP open"
        assert sock.fileno() != -1  # ours is still open: the node did not wait for it


def test_refused_contexts_are_logged_once_per_association_and_counted(narrow_node):
    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    find = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve - FIND: not a storage class
    contexts = [build_context(CTImageStorage, ["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1"]),
                build_context(secondary_capture, ["1.2.840.10008.1.2.1"]),
                build_context(secondary_capture, ["1.2.840.10008.1.2.4.50"]),  # proposed again: one line
                build_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.3.4.5.6.7"]),  # MR in an unknown syntax
                build_context(find)]
    before = narrow_node.log_text()
    sock, pdu_type, body = _associate(narrow_node.port, 0, contexts=contexts)
    with sock:
        results = _results(pdu_type, body)
        _release(sock)
    # HTJ2K accepted as the requestor's first choice; the rest refused with PS3.8 9.3.3.2 reasons
    assert results == {1: (0, "1.2.840.10008.1.2.4.201"), 3: (3, "1.2.840.10008.1.2.1"),
                       5: (3, "1.2.840.10008.1.2.4.50"), 7: (4, "1.2.3.4.5.6.7"),
                       9: (3, "1.2.840.10008.1.2")}
    wait_for(lambda: "Patient Root Query" in narrow_node.log_text()[len(before):], timeout=10,
             what="refused contexts logged")
    lines = [line for line in narrow_node.log_text()[len(before):].splitlines()
             if "presentation context refused" in line]
    assert len(lines) == 3, lines
    (denied,) = [line for line in lines if "Secondary Capture Image Storage" in line]
    assert "calling AE STORESCU" in denied and "denied by node.sop_classes.deny" in denied
    assert "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in denied and "JPEG Baseline" in denied
    (unknown,) = [line for line in lines if "MR Image Storage" in line]
    assert "transfer-syntaxes-not-supported" in unknown and "1.2.3.4.5.6.7" in unknown
    (query,) = [line for line in lines if find in line]
    assert "not a storage SOP class" in query
    counted = samples(narrow_node)
    assert counted[("dicom_node_presentation_contexts_refused_total",
                    (("calling_ae", "STORESCU"), ("reason", "denied")))] == 1
    assert counted[("dicom_node_presentation_contexts_refused_total",
                    (("calling_ae", "STORESCU"), ("reason", "transfer syntax not supported")))] == 1
    assert counted[("dicom_node_presentation_contexts_refused_total",
                    (("calling_ae", "STORESCU"), ("reason", "not a storage class")))] == 1


def _store_pdvs(data: bytes, sop_instance_uid: str, sizes: list[int], message_id: int = 9) -> list[bytes]:
    """The PDV items (context 3, CT) of a C-STORE-RQ carrying `data`: the command, then the data set cut into
    fragments of the `sizes` in turn."""
    request = C_STORE()
    request.MessageID, request.Priority = message_id, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, sop_instance_uid
    request.DataSet = BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command = next(iter(message.encode_msg(3, 1 << 31))).presentation_data_value_list[0][1][1:]

    def pdv(control: int, fragment: bytes) -> bytes:
        return struct.pack(">IBB", len(fragment) + 2, 3, control) + fragment

    items, pos, turn = [pdv(0x03, command)], 0, 0
    while pos < len(data):
        fragment = data[pos:pos + sizes[turn % len(sizes)]]
        pos, turn = pos + len(fragment), turn + 1
        items.append(pdv(0x02 if pos == len(data) else 0x00, fragment))
    return items


def _p_data_tf(items: list[bytes]) -> bytes:
    return struct.pack(">BBI", 0x04, 0, sum(len(item) for item in items)) + b"".join(items)


def _store_pdus(data: bytes, sop_instance_uid: str, sizes: list[int]) -> bytes:
    """A C-STORE-RQ carrying `data` as P-DATA-TF PDUs of one PDV each (`_store_pdvs`)."""
    return b"".join(_p_data_tf([item]) for item in _store_pdvs(data, sop_instance_uid, sizes))


def _implicit_vr(dataset: Dataset) -> bytes:
    """The data set as the CT context's transfer syntax (implicit VR little endian) encodes it."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def _stored_in_pieces(node: Node, sizes: list[int], pieces: list[int], pause_every: int) -> None:
    """Store a 512x512 CT slice over a raw association, its PDUs cut into fragments of `sizes` and written
    to the socket in pieces of `pieces` bytes (a short pause every `pause_every` pieces, so the node finds
    a PDU header or body cut short), and check the spool holds the data set byte for byte."""
    dataset = next(iter(ct_datasets(1)))
    data = _implicit_vr(dataset)
    wire = _store_pdus(data, dataset.SOPInstanceUID, sizes)
    sock, pdu_type, body = _associate(node.port, 0)
    with sock:
        assert _results(pdu_type, body)[3] == (0, "1.2.840.10008.1.2")
        pos, turn = 0, 0
        while pos < len(wire):
            piece = pieces[turn % len(pieces)]
            sock.sendall(wire[pos:pos + piece])
            pos, turn = pos + piece, turn + 1
            if turn % pause_every == 0:
                time.sleep(0.002)
        response = _read_command(sock, 0xFFFFFFFF)
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8001, 9, 0x0000)
        _release(sock)
    (stored,) = [path for path in node.spool_files() if path.stem == dataset.SOPInstanceUID]
    assert dataset_bytes(stored) == data


def test_small_pdus_arriving_in_odd_pieces_make_the_instance_byte_for_byte(node):
    """The node announces 16 KiB here: many PDUs, read ahead several at a time, headers cut across reads."""
    _stored_in_pieces(node, sizes=[1, 7, 1000, NODE_MAX_PDU - 6, 333], pieces=[3, 5, 4093, 16387, 70001],
                      pause_every=3)


def test_long_pdus_among_short_ones_make_the_instance_byte_for_byte(narrow_node):
    """256 KiB announced: fragments longer than a read through the read-ahead buffer are received straight into
    the data set, after what was read ahead."""
    _stored_in_pieces(narrow_node, sizes=[500, 200_000, 700, 150_000, 65_530, 65_542], pieces=[1 << 20, 9, 99_999],
                      pause_every=2)


def test_instances_shorter_and_longer_than_the_one_before_and_pdus_spanning_two_messages_are_byte_for_byte(
        narrow_node):
    """Data sets are received in place, into a buffer the next message and the next association reuse: one
    shorter than the one before must hold none of its bytes, a longer one grows the buffer keeping what it
    holds, and a P-DATA-TF may end one message and begin the next (PS3.8 9.3.5 allows several PDVs)."""
    rng = random.Random(7)
    datasets = list(ct_datasets(5, series_description="receive buffer"))
    for dataset, (rows, columns) in zip(datasets, [(512, 512), (8, 8), (1024, 768), (300, 200), (4, 4)]):
        dataset.Rows, dataset.Columns = rows, columns
        dataset.PixelData = rng.randbytes(rows * columns * 2)
    encoded = [_implicit_vr(dataset) for dataset in datasets]
    items = [item for number, (dataset, data) in enumerate(zip(datasets[:4], encoded))
             for item in _store_pdvs(data, dataset.SOPInstanceUID, [70_000, 3, 120_000, 65_530], number + 1)]
    pdus, packed = [], []
    for item in items:  # up to three PDVs a PDU, within the node's 256 KiB
        if packed and (len(packed) == 3 or sum(map(len, packed)) + len(item) > 262_144):
            pdus.append(_p_data_tf(packed))
            packed = []
        packed.append(item)
    pdus.append(_p_data_tf(packed))
    sock, pdu_type, body = _associate(narrow_node.port, 0)
    with sock:
        assert _results(pdu_type, body)[3] == (0, "1.2.840.10008.1.2")
        sock.sendall(b"".join(pdus))
        responses = [_read_command(sock, 0xFFFFFFFF) for _ in range(4)]
        assert [(r.MessageIDBeingRespondedTo, r.Status) for r in responses] == [(1, 0), (2, 0), (3, 0), (4, 0)]
        _release(sock)
    sock, pdu_type, body = _associate(narrow_node.port, 0)  # the next association takes the grown buffer
    with sock:
        assert _results(pdu_type, body)[3] == (0, "1.2.840.10008.1.2")
        sock.sendall(_store_pdus(encoded[4], datasets[4].SOPInstanceUID, [100]))
        assert _read_command(sock, 0xFFFFFFFF).Status == 0x0000
        _release(sock)
    stored = {path.stem: path for path in narrow_node.spool_files()}
    for dataset, data in zip(datasets, encoded):
        assert dataset_bytes(stored[dataset.SOPInstanceUID]) == data


@pytest.fixture(scope="module")
def impatient_node(tmp_path_factory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("impatient"),
                      node={"network_timeout_s": 3.0, "dimse_timeout_s": 1.0}) as running:
        yield running


def _aborted_after(sock: socket.socket) -> float:
    """Seconds until the node's A-ABORT (service provider) arrives on `sock`."""
    started = time.monotonic()
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x07 and body[2] == 0x02, (pdu_type, body)
    return time.monotonic() - started


def test_an_idle_association_is_aborted_after_the_network_timeout(impatient_node):
    sock, pdu_type, _ = _associate(impatient_node.port, 0)
    with sock:
        assert pdu_type == 0x02
        assert 2.9 < _aborted_after(sock) < 6
    assert impatient_node.logs("aborted: nothing received within its timeout")


def test_a_message_that_stops_arriving_is_aborted_after_the_dimse_timeout(impatient_node):
    """Mid-message the DIMSE timeout applies (1 s here), not the network timeout (3 s)."""
    data = bytes(4096)
    sock, pdu_type, _ = _associate(impatient_node.port, 0)
    with sock:
        assert pdu_type == 0x02
        wire = _store_pdus(data, "1.2.826.0.1.3680043.9.9999.77", [1024])
        sock.sendall(wire[:len(wire) // 2])  # the command and the first fragments; the rest never comes
        assert 0.9 < _aborted_after(sock) < 2.5
