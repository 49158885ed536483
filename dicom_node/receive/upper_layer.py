"""The receiving side of the DICOM Upper Layer (PS3.8 9) for a Storage SCP: one thread per association.

Why the node does not receive through pynetdicom's AE: pynetdicom moves
every PDU through two polling threads (1 ms sleeps) and reads the socket
4 KiB at a time, so a storage SCP whose handler does nothing answers about
230 instances/s on two cores, where dcmtk's storescp answers 600 (measured,
see bench/ingest.py). Here each association's thread blocks on its socket,
receives each data set fragment with `recv_into` straight into its place in
the message's buffer and answers on the same thread. pynetdicom still does
what it is good at: the A-ASSOCIATE-RQ/AC codecs and presentation context negotiation
(with SCP/SCU role selection) are its own, so the association wire format
is the one the node's SCU side (pynetdicom) speaks. They cost ~20 ms of CPU
for a request of 128 presentation contexts (storescu's), so each distinct
request is negotiated once and its answer kept (`NegotiationCache`).

States, reduced to what an acceptor meets (PS3.8 9.2): waiting for the
A-ASSOCIATE-RQ under the ACSE timeout (ARTIM), then data transfer (C-ECHO,
C-STORE; any other command is answered 0x0211 "unrecognized operation")
until A-RELEASE-RQ (answered A-RELEASE-RP) or A-ABORT. The association's slot
is given back as soon as the A-RELEASE-RP is sent: a peer that keeps its TCP
connection open after it (Sta13, PS3.8 9.2) only holds a thread until ARTIM
expires, never a slot a new association needs. Anything the state
does not allow, a PDU that does not parse, or one longer than we announced,
is answered with A-ABORT (source: service provider, with the PS3.8 9.3.8
reason) and the connection closed. An idle association is aborted after the
network timeout, a message that stops arriving after the DIMSE timeout.
With `tls_port` set a second listener does the same over TLS (dicom_node.tls)
after a handshake under the ACSE timeout; both count against one association
limit. PDUs and command sets on the wire are `dicom_node.receive.pdu`'s.

Over 400 lines for a reason: the association's states (PS3.8 9.2) are one loop
in `Acceptor`, and split across modules a reader could no longer see which PDU
each state allows.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID, generate_uid
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_node import ListenError, __version__
from dicom_node.receive.pdu import (ABORT_SOURCE_PROVIDER, A_ABORT_PDU, A_ASSOCIATE_RJ_PDU, A_ASSOCIATE_RQ_PDU,
                                    A_RELEASE_RP_PDU, A_RELEASE_RQ_PDU, C_CANCEL_RQ, C_ECHO_RQ, C_STORE_RQ,
                                    INVALID_PDU_PARAMETER_VALUE, MAX_ASSOCIATION_PDU, PDU_HEADER, PDV_HEADER,
                                    P_DATA_TF_PDU, STATUS_UNRECOGNIZED_OPERATION, TAG_AFFECTED_SOP_CLASS_UID,
                                    TAG_AFFECTED_SOP_INSTANCE_UID, TAG_COMMAND_FIELD, TAG_MESSAGE_ID, UNEXPECTED_PDU,
                                    Abort, Connection, DataSetBuffer, Message, PeerClosed, command_text, command_us,
                                    response_command)
from dicom_node.tls import peer_subject

log = logging.getLogger("dicom_node.receive.upper_layer")

NEGOTIATIONS_KEPT = 64

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicom-node", __version__])
IMPLEMENTATION_VERSION_NAME = f"DICOM_NODE_{__version__}"[:16]

@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int
    text: str


CALLING_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x03, "calling AE title not recognized")
CALLED_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x07, "called AE title not recognized")
APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(0x01, 0x01, 0x02, "application context name not supported")
PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(0x01, 0x02, 0x02, "protocol version not supported")
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "local limit exceeded")


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae: str
    called_ae: str
    host: str
    port: int
    certificate_subject: str | None = None  # the TLS peer certificate's common name; None on a plain connection


@dataclass(frozen=True)
class RefusedContext:
    """A proposed presentation context the A-ASSOCIATE-AC refused: the result is PS3.8 9.3.3.2's 1 (user
    rejection), 2 (no reason), 3 (abstract syntax not supported) or 4 (transfer syntaxes not supported)."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    result: int


@dataclass
class Association:
    """An established association; `id` is unique for the life of the process."""

    id: int
    calling_ae: str
    called_ae: str
    host: str
    port: int
    contexts: dict[int, PresentationContext]  # accepted, by presentation context ID
    peer_max_pdu: int  # 0: unlimited
    refused: tuple[RefusedContext, ...] = ()  # proposed contexts the A-ASSOCIATE-AC refused


@dataclass(frozen=True)
class StoreRequest:
    """A complete C-STORE-RQ: its command and the data set exactly as it came off the wire. `data_set` is
    the association's receive buffer: valid while the handler's `store` runs, reused after."""

    association: Association
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    transfer_syntax: str
    data_set: memoryview


class AssociationHandler(Protocol):
    """What the acceptor asks of the application (receive.Receiver)."""

    def requested(self, request: AssociationRequest) -> Rejection | None: ...

    def accepted(self, association: Association) -> None: ...

    def store(self, request: StoreRequest) -> int: ...

    def closed(self, association: Association, released: bool) -> None: ...


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    host: str
    port: int
    max_pdu: int  # the longest P-DATA-TF we receive; 0: unlimited
    max_associations: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    contexts: list[PresentationContext] = field(default_factory=list)
    tls_port: int | None = None  # a second listener, TLS with `tls_context` (dicom_node.tls)
    tls_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Negotiation:
    """An A-ASSOCIATE-RQ decoded and negotiated: its checks' inputs, and the A-ASSOCIATE-AC that accepts it.
    `contexts` (accepted, by presentation context ID) is shared by every association that sent the request."""

    protocol_version: int
    application_context: str
    calling_ae: str
    called_ae: str
    contexts: dict[int, PresentationContext]
    refused: tuple[RefusedContext, ...]
    peer_max_pdu: int  # 0: unlimited
    accept_pdu: bytes


class NegotiationCache:
    """Negotiations by the A-ASSOCIATE-RQ's bytes, the `size` latest.

    The same request always negotiates to the same answer, and a sender sends the same request for every
    association: dcmtk's storescu proposes 128 presentation contexts, which pynetdicom's codecs take
    about 20 ms of CPU to decode, negotiate and answer, under the GIL the receiving associations share.
    A request arriving while its first copy is being worked out waits for that answer."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, Future[Negotiation]] = OrderedDict()

    def get(self, body: bytes, negotiate: Callable[[bytes], Negotiation]) -> Negotiation:
        """The negotiation of `body`, from `negotiate` the first time; raises what it raised."""
        with self._lock:
            entry = self._entries.get(body)
            first = entry is None
            if first:
                entry = self._entries[body] = Future()
                if len(self._entries) > self._size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(body)
        if first:
            try:
                entry.set_result(negotiate(body))
            except BaseException as error:  # not kept: the next copy is worked out again
                entry.set_exception(error)
                with self._lock:
                    if self._entries.get(body) is entry:
                        del self._entries[body]
        return entry.result()


class Acceptor:
    """Listens on the node's port (and its TLS port) and runs each association on its own thread."""

    def __init__(self, settings: AcceptorSettings, handler: AssociationHandler):
        self.settings = settings
        self.handler = handler
        self._listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._established = 0  # over both listeners: max_associations is the node's limit
        self._ids = itertools.count(1)
        self._accept_threads: list[threading.Thread] = []
        self._supported = {str(cx.abstract_syntax): frozenset(str(ts) for ts in cx.transfer_syntax)
                           for cx in settings.contexts}
        self._negotiations = NegotiationCache(NEGOTIATIONS_KEPT)
        self._data_set_buffers: list[DataSetBuffer] = []  # those of ended associations, for the next ones

    def start(self) -> None:
        settings = self.settings
        ports = [(settings.port, None)]
        if settings.tls_port is not None and settings.tls_context is not None:
            ports.append((settings.tls_port, settings.tls_context))
        for port, tls_context in ports:
            try:
                listener = socket.create_server((settings.host, port), backlog=64)
            except OSError as error:
                self.stop()
                raise ListenError(f"DICOM {'TLS ' if tls_context else ''}port could not listen on "
                                  f"{settings.host}:{port}: {error.strerror}") from None
            listener.settimeout(0.5)  # the accept loop notices stop() within this
            self._listeners.append((listener, tls_context))
            thread = threading.Thread(target=self._accept_loop, args=(listener, tls_context),
                                      name=f"dicom-acceptor-{port}", daemon=True)
            self._accept_threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting; connections still open are shut down (their peers see the connection close)."""
        self._stopping.set()
        for thread in self._accept_threads:
            thread.join(timeout)
        for listener, _ in self._listeners:
            listener.close()
        with self._lock:
            connections = list(self._connections.values())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            thread.join(timeout)

    def listening(self) -> bool:
        """Every port started (plain, TLS) still accepts: its loop runs and stop() was not called."""
        return (bool(self._accept_threads) and not self._stopping.is_set()
                and all(thread.is_alive() for thread in self._accept_threads))

    def _accept_loop(self, listener: socket.socket, tls_context: ssl.SSLContext | None) -> None:
        while not self._stopping.is_set():
            try:
                sock, (host, port, *_) = listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if self._stopping.is_set():
                    return
                log.error("accepting a DICOM connection failed: %s", error)
                time.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else each response waits ~40 ms
            number = next(self._ids)
            thread = threading.Thread(target=self._serve, args=(number, sock, host, port, tls_context),
                                      name=f"association-{number}-{host}:{port}", daemon=True)
            with self._lock:
                self._connections[number] = (sock, thread)
            thread.start()

    def _secure(self, number: int, sock: socket.socket, host: str, port: int,
                tls_context: ssl.SSLContext) -> socket.socket | None:
        """The TLS handshake, under the ACSE timeout; the TLS socket, or None when it failed (logged)."""
        try:
            sock.settimeout(self.settings.acse_timeout_s)
            secure = tls_context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as error:
            log.warning("TLS handshake with %s:%d failed: %s", host, port, error)
            sock.close()
            return None
        with self._lock:
            self._connections[number] = (secure, self._connections[number][1])
        log.info("TLS %s with %s:%d, peer certificate %r", secure.version(), host, port, peer_subject(secure))
        return secure

    # --- one connection ---------------------------------------------------------------------------

    def _serve(self, number: int, sock: socket.socket, host: str, port: int,
               tls_context: ssl.SSLContext | None) -> None:
        if tls_context is not None:
            secure = self._secure(number, sock, host, port, tls_context)
            if secure is None:
                with self._lock:
                    self._connections.pop(number, None)
                return
            sock = secure
        connection = Connection(sock, self.settings.dimse_timeout_s)
        association: Association | None = None
        released = False
        try:
            association = self._establish(connection, number, host, port)
            if association is not None:
                released = self._transfer(connection, association)
                if released:  # the slot is free once A-RELEASE-RP is sent, whether or not the peer closes TCP
                    self._end(association, released=True)
                    association = None
                    connection.linger_until_closed(self.settings.acse_timeout_s)
        except Abort as abort:
            log.warning("A-ABORT to %s:%d: %s", host, port, abort)
            connection.send_abort(ABORT_SOURCE_PROVIDER, abort.reason)
        except TimeoutError:
            if association is None:  # ARTIM expired waiting for the A-ASSOCIATE-RQ (PS3.8 9.1.5): just close
                log.warning("connection from %s:%d closed: no A-ASSOCIATE-RQ within %.0f s", host, port,
                            self.settings.acse_timeout_s)
            else:
                log.warning("association from %s:%d aborted: nothing received within its timeout", host, port)
                connection.send_abort(ABORT_SOURCE_PROVIDER, 0x00)
        except PeerClosed:
            pass
        except OSError as error:
            log.warning("connection from %s:%d failed: %s", host, port, error)
        except Exception:  # a handler bug must not take the node down with it
            log.exception("association from %s:%d failed; aborting it", host, port)
            connection.send_abort(ABORT_SOURCE_PROVIDER, 0x00)
        finally:
            sock.close()
            if association is not None:
                self._end(association, released)
            with self._lock:
                self._connections.pop(number, None)

    def _end(self, association: Association, released: bool) -> None:
        """Give the association's slot back and tell the handler it ended."""
        with self._lock:
            self._established -= 1
        self.handler.closed(association, released)

    def _establish(self, connection: Connection, number: int, host: str, port: int) -> Association | None:
        """Read and answer the A-ASSOCIATE-RQ; the Association when accepted, None when rejected."""
        settings = self.settings
        pdu_type, body = connection.read_pdu(time.monotonic() + settings.acse_timeout_s,
                                             settings.acse_timeout_s, MAX_ASSOCIATION_PDU)
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise Abort(UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} before an association")
        negotiation = self._negotiations.get(bytes(body), self._negotiate)
        calling, called = negotiation.calling_ae, negotiation.called_ae
        subject = peer_subject(connection.sock) if isinstance(connection.sock, ssl.SSLSocket) else None
        rejection = self._rejection(negotiation, AssociationRequest(calling, called, host, port, subject))
        if rejection is not None:
            log.info("A-ASSOCIATE-RJ to %s from %s:%d (called %r): %s", calling, host, port, called, rejection.text)
            connection.send(struct.pack(">BBIBBBB", A_ASSOCIATE_RJ_PDU, 0, 4, 0, rejection.result,
                                        rejection.source, rejection.reason))
            connection.linger_until_closed(settings.acse_timeout_s)
            return None
        try:  # the slot counted for us in _rejection is ours until _serve gives it back; free it on failure
            association = Association(id=number, calling_ae=calling, called_ae=called, host=host, port=port,
                                      contexts=negotiation.contexts, peer_max_pdu=negotiation.peer_max_pdu,
                                      refused=negotiation.refused)
            connection.send(negotiation.accept_pdu)
            self.handler.accepted(association)
        except BaseException:
            with self._lock:
                self._established -= 1
            raise
        return association

    def _negotiate(self, body: bytes) -> Negotiation:
        """Decode an A-ASSOCIATE-RQ's body and work out the A-ASSOCIATE-AC that accepts it."""
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(PDU_HEADER.pack(A_ASSOCIATE_RQ_PDU, 0, len(body)) + body)
            request = pdu.to_primitive()
        except Exception as error:
            raise Abort(INVALID_PDU_PARAMETER_VALUE, f"A-ASSOCIATE-RQ does not decode: {error}") from None
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        proposed = request.presentation_context_definition_list
        results, role_replies = negotiate_as_acceptor(proposed, self.settings.contexts, roles)
        self._keep_requestor_preference(proposed, results)
        transfer_syntaxes = {cx.context_id: tuple(str(ts) for ts in cx.transfer_syntax) for cx in proposed}
        return Negotiation(
            protocol_version=pdu.protocol_version, application_context=str(request.application_context_name),
            calling_ae=request.calling_ae_title.strip(), called_ae=request.called_ae_title.strip(),
            contexts={cx.context_id: cx for cx in results if cx.result == 0x00},
            refused=tuple(RefusedContext(str(cx.abstract_syntax), transfer_syntaxes.get(cx.context_id, ()), cx.result)
                          for cx in results if cx.result != 0x00),
            peer_max_pdu=request.maximum_length_received or 0,
            accept_pdu=self._accept_pdu(request, results, role_replies))

    def _keep_requestor_preference(self, proposed: list[PresentationContext],
                                   results: list[PresentationContext]) -> None:
        """Accept the first transfer syntax the requestor proposed that we support, not our first: an SCU
        lists the syntax its file is in first, and a node that stores what it is sent should receive just
        that, not make the sender transcode (PS3.8 leaves the choice to the acceptor, 9.3.3.2)."""
        supported = self._supported
        offered = {cx.context_id: cx.transfer_syntax for cx in proposed}
        for result in results:
            ours = supported.get(str(result.abstract_syntax), frozenset())
            first = next((ts for ts in offered.get(result.context_id, ()) if str(ts) in ours), None)
            if result.result == 0x00 and first is not None:
                result.transfer_syntax = [first]

    def _rejection(self, negotiation: Negotiation, asked: AssociationRequest) -> Rejection | None:
        """PS3.8 checks first, then the application's, then the association limit (which counts us in)."""
        if not negotiation.protocol_version & 0x01:
            return PROTOCOL_VERSION_NOT_SUPPORTED
        if negotiation.application_context != APPLICATION_CONTEXT_NAME:
            return APPLICATION_CONTEXT_NOT_SUPPORTED
        rejection = self.handler.requested(asked)
        if rejection is not None:
            return rejection
        with self._lock:
            if self._established >= self.settings.max_associations:
                return LOCAL_LIMIT_EXCEEDED
            self._established += 1
        return None

    def _accept_pdu(self, request: A_ASSOCIATE, results: list[PresentationContext],
                    role_replies: list[SCP_SCU_RoleSelectionNegotiation]) -> bytes:
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [max_length, implementation, version, *role_replies]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(accept)
        return pdu.encode()

    def _transfer(self, connection: Connection, association: Association) -> bool:
        """Serve DIMSE messages until release (returns True once A-RELEASE-RP is sent) or the peer's A-ABORT
        (False)."""
        settings = self.settings
        limit = settings.max_pdu or (1 << 32)
        with self._data_set_buffer() as data:
            message = Message(data)
            while True:
                wait = settings.dimse_timeout_s if message.in_progress else settings.network_timeout_s
                pdu_type, length = connection.read_pdu_header(time.monotonic() + wait, limit)
                if pdu_type == P_DATA_TF_PDU:
                    message = self._receive_pdvs(connection, association, message, length)
                    continue
                connection.read(length, time.monotonic() + settings.dimse_timeout_s)
                if pdu_type == A_RELEASE_RQ_PDU:
                    connection.send(struct.pack(">BBII", A_RELEASE_RP_PDU, 0, 4, 0))
                    return True
                if pdu_type == A_ABORT_PDU:
                    log.info("A-ABORT from %s at %s:%d", association.calling_ae, association.host, association.port)
                    return False
                raise Abort(UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} during data transfer")

    @contextmanager
    def _data_set_buffer(self) -> Iterator[DataSetBuffer]:
        """A data set buffer for one association, taken from those that ended associations gave back, so
        that a sender opening an association per instance does not grow a new one each time either."""
        with self._lock:
            data = self._data_set_buffers.pop() if self._data_set_buffers else DataSetBuffer()
        try:
            yield data
        finally:
            data.clear()
            with self._lock:
                self._data_set_buffers.append(data)

    def _receive_pdvs(self, connection: Connection, association: Association, message: Message,
                      length: int) -> Message:
        """Read the PDV items of a P-DATA-TF of `length` bytes (PS3.8 9.3.5), data set fragments straight
        into the message's buffer; dispatch each message they complete. Returns the message in progress."""
        timeout = self.settings.dimse_timeout_s
        deadline = time.monotonic() + timeout
        while length:
            if length < PDV_HEADER.size:
                raise Abort(INVALID_PDU_PARAMETER_VALUE, "P-DATA-TF ends inside a PDV item header")
            item_length, context_id, control = connection.read_struct(PDV_HEADER, deadline)
            value_length = item_length - 2
            if value_length < 0 or PDV_HEADER.size + value_length > length:
                raise Abort(INVALID_PDU_PARAMETER_VALUE, f"PDV item length {item_length} does not fit its P-DATA-TF")
            if context_id not in association.contexts:
                raise Abort(INVALID_PDU_PARAMETER_VALUE, f"PDV on presentation context {context_id}, not accepted")
            length -= PDV_HEADER.size + value_length
            if control & 0x01:  # a command fragment
                complete = message.add_command(context_id, control, connection.read(value_length, deadline))
            else:
                connection.read_into(message.data_fragment(context_id, value_length), deadline)
                complete = bool(control & 0x02)
            if complete:
                self._dispatch(connection, association, message)
                message = Message(message.data)
                deadline = time.monotonic() + timeout
        return message

    def _dispatch(self, connection: Connection, association: Association, message: Message) -> None:
        command = message.command
        assert command is not None and message.context_id is not None
        command_field = command_us(command, TAG_COMMAND_FIELD)
        context = association.contexts[message.context_id]
        if command_field == C_STORE_RQ:
            request = StoreRequest(
                association=association, message_id=command_us(command, TAG_MESSAGE_ID),
                affected_sop_class_uid=command_text(command, TAG_AFFECTED_SOP_CLASS_UID),
                affected_sop_instance_uid=command_text(command, TAG_AFFECTED_SOP_INSTANCE_UID),
                transfer_syntax=str(context.transfer_syntax[0]), data_set=message.data.data_set())
            status = self.handler.store(request)
        elif command_field == C_ECHO_RQ:
            status = 0x0000
        elif command_field == C_CANCEL_RQ:  # nothing of ours is cancellable; no response (PS3.7 9.3.2.3)
            return
        else:
            log.warning("command 0x%04X from %s answered 0x0211 (unrecognized operation)", command_field,
                        association.calling_ae)
            status = STATUS_UNRECOGNIZED_OPERATION
        self._send_command(connection, association, message.context_id,
                           response_command(command, command_field | 0x8000, status))

    @staticmethod
    def _send_command(connection: Connection, association: Association, context_id: int, command: bytes) -> None:
        """A command set as P-DATA-TF PDUs no longer than the peer accepts."""
        room = association.peer_max_pdu - 6 if association.peer_max_pdu else len(command)
        room = max(room, 16)
        chunks = [command[i:i + room] for i in range(0, len(command), room)]
        pdus = []
        for index, chunk in enumerate(chunks):
            control = 0x03 if index == len(chunks) - 1 else 0x01
            pdus.append(PDU_HEADER.pack(P_DATA_TF_PDU, 0, len(chunk) + 6) + PDV_HEADER.pack(len(chunk) + 2, context_id,
                                                                                              control) + chunk)
        connection.send(b"".join(pdus))
