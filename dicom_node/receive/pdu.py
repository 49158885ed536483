"""PDUs and DIMSE command sets on the wire, for the acceptor (`dicom_node.receive.upper_layer`).

PS3.8 9.3 PDU types and A-ABORT reasons, reads from a socket under a deadline,
the reassembly of one DIMSE message from its PDV fragments (PS3.8 E.2), its data
set received in place, and the command set's encoding (PS3.7 9.3, E.1: implicit
VR little endian, group length first). What does not parse raises `Abort` with
the PS3.8 9.3.8 reason the acceptor answers with; a peer gone raises `PeerClosed`.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ_PDU, A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU = 0x01, 0x02, 0x03
P_DATA_TF_PDU, A_RELEASE_RQ_PDU, A_RELEASE_RP_PDU, A_ABORT_PDU = 0x04, 0x05, 0x06, 0x07
_KNOWN_PDUS = range(0x01, 0x08)
# A-ABORT reasons when the source is the service provider (PS3.8 9.3.8)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PDU_PARAMETER_VALUE = 0x01, 0x02, 0x06
ABORT_SOURCE_PROVIDER = 0x02
MAX_ASSOCIATION_PDU = 1 << 20  # an A-ASSOCIATE-RQ proposing every SOP class is far smaller
READ_AHEAD = 1 << 18  # bytes a read may take beyond the PDU it needs: the next PDUs of the sender's burst
SMALL_READ = 1 << 16  # reads up to this go through the read-ahead buffer, longer ones straight to their place
KEPT_DATA_SET_BUFFER = 1 << 24  # a data set buffer up to this size is kept for the next message

# DIMSE (PS3.7 9.3, E.1)
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
STATUS_UNRECOGNIZED_OPERATION = 0x0211
TAG_AFFECTED_SOP_CLASS_UID, TAG_COMMAND_FIELD, TAG_MESSAGE_ID = 0x00000002, 0x00000100, 0x00000110
TAG_MESSAGE_ID_RESPONDED_TO, TAG_PRIORITY, TAG_DATA_SET_TYPE = 0x00000120, 0x00000700, 0x00000800
TAG_STATUS, TAG_AFFECTED_SOP_INSTANCE_UID = 0x00000900, 0x00001000

PDU_HEADER = struct.Struct(">BBI")
PDV_HEADER = struct.Struct(">IBB")
_COMMAND_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


class Abort(Exception):
    """End the association with an A-ABORT from the service provider."""

    def __init__(self, reason: int, text: str):
        super().__init__(text)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed the connection, aborted, or stopped sending within its time."""


def _uid_value(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (implicit VR little endian, group length first), elements in tag order."""
    body = b"".join(_COMMAND_ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value for tag, value in elements)
    return _COMMAND_ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def decode_command(raw: bytes) -> dict[int, bytes]:
    """The elements of a command set by tag; raises Abort when it does not parse."""
    elements, pos = {}, 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise Abort(INVALID_PDU_PARAMETER_VALUE, "command set ends inside an element header")
        group, element, length = _COMMAND_ELEMENT.unpack_from(raw, pos)
        pos += 8
        if pos + length > len(raw):
            raise Abort(INVALID_PDU_PARAMETER_VALUE, f"command element (0000,{element:04X}) runs past the set")
        elements[group << 16 | element] = raw[pos:pos + length]
        pos += length
    for tag in (TAG_COMMAND_FIELD, TAG_MESSAGE_ID, TAG_DATA_SET_TYPE):
        if len(elements.get(tag, b"")) != 2:
            raise Abort(INVALID_PDU_PARAMETER_VALUE, f"command set without (0000,{tag & 0xFFFF:04X})")
    return elements


def command_us(elements: dict[int, bytes], tag: int) -> int:
    return _US.unpack(elements[tag])[0]


def command_text(elements: dict[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").rstrip(b"\x00 ").decode("ascii", errors="replace")


def response_command(request: dict[int, bytes], command_field: int, status: int) -> bytes:
    elements = []
    if TAG_AFFECTED_SOP_CLASS_UID in request:
        elements.append((TAG_AFFECTED_SOP_CLASS_UID, request[TAG_AFFECTED_SOP_CLASS_UID]))
    elements += [(TAG_COMMAND_FIELD, _US.pack(command_field)),
                 (TAG_MESSAGE_ID_RESPONDED_TO, request[TAG_MESSAGE_ID]),
                 (TAG_DATA_SET_TYPE, _US.pack(NO_DATA_SET)), (TAG_STATUS, _US.pack(status))]
    if TAG_AFFECTED_SOP_INSTANCE_UID in request:
        elements.append((TAG_AFFECTED_SOP_INSTANCE_UID, request[TAG_AFFECTED_SOP_INSTANCE_UID]))
    return encode_command(elements)


class Connection:
    """One TCP (or TLS) connection: reads under a deadline, PDU writes.

    The socket is non-blocking, waited on with poll only when it has nothing to give: a blocking socket
    with a timeout costs a system call per read just to set that timeout. A read takes whatever has
    arrived, up to READ_AHEAD bytes, so the PDUs of a sender that sends small ones (16 KiB is common)
    come several to a system call instead of two system calls each: at 8 associations sending 16 KiB
    PDUs the node's system CPU per instance fell from 1.2 to 0.8 ms (docs/performance.md). A read
    longer than SMALL_READ goes straight into its destination once what was read ahead is copied there;
    shorter ones are copied out of the read-ahead buffer."""

    def __init__(self, sock: socket.socket, send_timeout_s: float):
        self.sock = sock
        self.send_timeout_s = send_timeout_s
        sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._buffer = bytearray(READ_AHEAD)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # received and not yet handed out: self._buffer[self._start:self._end]

    def read_pdu_header(self, deadline: float, limit: int) -> tuple[int, int]:
        """The next PDU's type and length, checked: raises Abort for an unknown type or one over `limit`."""
        pdu_type, _, length = self.read_struct(PDU_HEADER, deadline)
        if pdu_type not in _KNOWN_PDUS:
            raise Abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")
        if length > limit:
            raise Abort(INVALID_PDU_PARAMETER_VALUE, f"PDU type 0x{pdu_type:02X} of {length} bytes, over {limit}")
        return pdu_type, length

    def read_pdu(self, header_deadline: float, body_timeout: float, limit: int) -> tuple[int, bytearray]:
        """The next whole PDU: its type and body."""
        pdu_type, length = self.read_pdu_header(header_deadline, limit)
        return pdu_type, self.read(length, time.monotonic() + body_timeout)

    def read_struct(self, layout: struct.Struct, deadline: float) -> tuple:
        """The next `layout.size` bytes, unpacked (a PDU or PDV item header)."""
        self._fill(layout.size, deadline)
        values = layout.unpack_from(self._buffer, self._start)
        self._start += layout.size
        return values

    def read(self, length: int, deadline: float) -> bytearray:
        """The next `length` bytes, in a buffer of their own (a command, an association PDU's body)."""
        body = bytearray(length)
        self.read_into(memoryview(body), deadline)
        return body

    def read_into(self, view: memoryview, deadline: float) -> None:
        """Fill `view` with the next len(view) bytes."""
        length = len(view)
        if length <= SMALL_READ:
            self._fill(length, deadline)
            view[:] = self._view[self._start:self._start + length]
            self._start += length
            return
        received = min(self._end - self._start, length)
        view[:received] = self._view[self._start:self._start + received]
        self._start += received
        while received < length:
            received += self._receive_into(view[received:], deadline)

    def _fill(self, count: int, deadline: float) -> None:
        """Receive until `count` bytes (at most READ_AHEAD) are buffered."""
        while self._end - self._start < count:
            if READ_AHEAD - self._start < count:  # no room for them past the start: move what is left to the front
                left = self._end - self._start
                self._view[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            self._end += self._receive_into(self._view[self._end:], deadline)

    def _receive_into(self, view: memoryview, deadline: float) -> int:
        """Receive what has arrived into `view` (at least a byte), waiting for it until `deadline`."""
        while True:
            try:
                count = self.sock.recv_into(view)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(select.POLLIN, deadline)
                continue
            except ssl.SSLWantWriteError:  # TLS may need to write before it can read
                self._wait(select.POLLOUT, deadline)
                continue
            if count == 0:
                raise PeerClosed("the peer closed the connection")
            return count

    def _wait(self, events: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._poll.modify(self.sock, events)
        if not self._poll.poll(remaining * 1000):
            raise TimeoutError

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.send_timeout_s
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait(select.POLLOUT, deadline)
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline)

    def send_abort(self, source: int, reason: int) -> None:
        try:
            self.send(struct.pack(">BBIBBBB", A_ABORT_PDU, 0, 4, 0, 0, source, reason))
        except OSError:
            pass

    def linger_until_closed(self, timeout: float) -> None:
        """After A-ASSOCIATE-RJ or A-RELEASE-RP the requestor closes the transport (PS3.8 9.2, Sta13);
        wait for that (ARTIM) so our close does not race the last PDU."""
        deadline = time.monotonic() + timeout
        scratch = memoryview(bytearray(4096))
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while True:
                self._receive_into(scratch, deadline)
        except (PeerClosed, OSError):  # closed, timed out (TimeoutError is an OSError) or reset
            pass


class DataSetBuffer:
    """Where a message's data set is received: in place, fragment after fragment, in one buffer that the
    next message reuses. Joining a data set's fragments after the fact, and zero-filling a new buffer for
    every PDU, took 7 % of the node's CPU at 4 associations (docs/performance.md). A buffer grown past
    KEPT_DATA_SET_BUFFER (a large multi-frame object) is not kept, so the buffers idle between
    associations hold at most that much each."""

    def __init__(self):
        self._buffer = bytearray()
        self._size = 0

    def extend(self, length: int) -> memoryview:
        """The next `length` bytes of the data set, to be filled."""
        end = self._size + length
        if end > len(self._buffer):
            grown = bytearray(max(end, 2 * len(self._buffer)))
            grown[:self._size] = memoryview(self._buffer)[:self._size]
            self._buffer = grown
        view = memoryview(self._buffer)[self._size:end]
        self._size = end
        return view

    def data_set(self) -> memoryview:
        """The data set received so far: valid until the buffer is cleared for the next message."""
        return memoryview(self._buffer)[:self._size]

    def clear(self) -> None:
        self._size = 0
        if len(self._buffer) > KEPT_DATA_SET_BUFFER:
            self._buffer = bytearray()


class Message:
    """A DIMSE message being reassembled from PDV fragments (PS3.8 E.2), its data set in `data`."""

    def __init__(self, data: DataSetBuffer):
        self.context_id: int | None = None
        self.command_bytes = bytearray()
        self.command: dict[int, bytes] | None = None
        self.announces_data_set = False  # its command is complete and says a data set follows
        self.data = data
        data.clear()

    @property
    def in_progress(self) -> bool:
        return self.context_id is not None

    def _on_context(self, context_id: int) -> None:
        if self.context_id is None:
            self.context_id = context_id
        elif context_id != self.context_id:
            raise Abort(UNEXPECTED_PDU, "a message's fragments came on two presentation contexts")

    def add_command(self, context_id: int, control: int, fragment: bytes) -> bool:
        """Add a command fragment; True when the message is complete (a command without a data set)."""
        self._on_context(context_id)
        if self.command is not None:
            raise Abort(UNEXPECTED_PDU, "a command fragment after the command was complete")
        self.command_bytes += fragment
        if not control & 0x02:
            return False
        self.command = decode_command(bytes(self.command_bytes))
        self.announces_data_set = command_us(self.command, TAG_DATA_SET_TYPE) != NO_DATA_SET
        return not self.announces_data_set

    def data_fragment(self, context_id: int, length: int) -> memoryview:
        """Where the next data set fragment, of `length` bytes, goes."""
        self._on_context(context_id)
        if not self.announces_data_set:
            raise Abort(UNEXPECTED_PDU, "a data set fragment without a command announcing one")
        return self.data.extend(length)
