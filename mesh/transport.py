"""Secure connections between devices: mutual TLS 1.3, frames, request/response, heartbeats.

Every connection starts with a 6-byte prelude in the clear, `HRTH` + version + mode:

- mode `M` (mesh): mutual TLS 1.3 follows. The server trusts only the certificates of its
  trust store, the client only the one pinned certificate of the device it dials. Both are
  enforced by OpenSSL inside the handshake (CERT_REQUIRED, the pinned certificates as the only
  CAs; every Hearth certificate is self-signed, so only the holder of that key can pass), and the
  exact DER fingerprint is compared again right after the handshake, before any application
  byte is sent. An unpaired or impostor certificate never gets to send a frame.
- mode `P` (pairing): the client's certificate (DER, u16 length first) follows the prelude, then
  mutual TLS where the server trusts only that certificate and the client trusts nothing yet.
  Both sides have proved they hold their keys; pairing.py binds the two fingerprints into the
  code. Python's ssl cannot accept an unknown client certificate, hence the certificate in the
  prelude; it is public anyway.

A Connection runs one reader thread (responses go to waiting callers by id, requests go to the
handler registry) and one heartbeat thread; a peer that sends nothing for `3 * heartbeat_s`, or
stops reading what we send for as long, is dropped. The TLS socket of a started Connection is
blocking: one thread reads while another writes, and a socket timeout would make OpenSSL
report "want read/write" through state the two threads share (a writer could then wait for
the wrong event); the heartbeat thread watches for silence instead. This module knows nothing
about pairing or discovery.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConnectionClosed, FrameError, PeerRefused, RemoteError, RequestTimeout
from mesh.frames import DEFAULT_MAX_FRAME, PREFIX, Frame, attach_payload, decode_header, decode_prefix, encode_frame
from mesh.identity import Identity, der_to_pem, device_id_of

log = logging.getLogger("hearth.mesh")

MAGIC = b"HRTH"
VERSION = 1
MODE_MESH = b"M"
MODE_PAIR = b"P"
MAX_CERT = 8192
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_HEARTBEAT = 5.0
SEND_SLICE = 1 << 20  # bytes per sendall: the stall watchdog sees progress at least this often


@dataclass(frozen=True)
class PeerInfo:
    """Who is at the other end, as the TLS handshake proved it."""

    device_id: str
    name: str
    cert_der: bytes
    address: str


@dataclass
class Reply:
    """What a request gets back: fields, and tensors or raw bytes."""

    fields: dict[str, Any]
    tensors: dict[str, Any] | None = None
    data: bytes | None = None


# --- TLS contexts ---------------------------------------------------------------------------

def _base_context(server: bool, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are certificates, not host names
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    if server:
        ctx.num_tickets = 0  # no session resumption: every connection proves its key again
    return ctx


def server_context(identity: Identity, trusted_pem: str) -> ssl.SSLContext:
    """The mesh server's context: a client must present one of `trusted_pem`'s certificates."""
    ctx = _base_context(True, identity)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if trusted_pem:
        ctx.load_verify_locations(cadata=trusted_pem)
    return ctx


def client_context(identity: Identity, pinned_der: bytes | None) -> ssl.SSLContext:
    """A client context trusting only `pinned_der` (None: trusts nothing, for pairing)."""
    ctx = _base_context(False, identity)
    if pinned_der is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=der_to_pem(pinned_der))
    return ctx


def prelude(mode: bytes, cert_der: bytes | None = None) -> bytes:
    head = MAGIC + bytes([VERSION]) + mode
    if mode == MODE_PAIR:
        assert cert_der is not None
        head += struct.pack(">H", len(cert_der)) + cert_der
    return head


def read_prelude(sock: socket.socket) -> tuple[bytes, bytes | None]:
    """(mode, client certificate for pairing) from a fresh plain socket; FrameError if malformed."""
    head = _recv_plain(sock, 6)
    if head[:4] != MAGIC or head[4] != VERSION or head[5:6] not in (MODE_MESH, MODE_PAIR):
        raise FrameError("not a Hearth connection (bad prelude)")
    mode = head[5:6]
    if mode == MODE_MESH:
        return mode, None
    (length,) = struct.unpack(">H", _recv_plain(sock, 2))
    if not 0 < length <= MAX_CERT:
        raise FrameError(f"pairing certificate of {length} bytes is out of range")
    cert = _recv_plain(sock, length)
    try:
        ssl.DER_cert_to_PEM_cert(cert)
        from cryptography import x509

        x509.load_der_x509_certificate(cert)
    except Exception:
        raise FrameError("pairing certificate is not a valid DER certificate") from None
    return mode, cert


def _recv_plain(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise FrameError("connection closed during the prelude")
        buf += chunk
    return buf


# --- dialling ---------------------------------------------------------------------------------

def dial_mesh(identity: Identity, pinned_der: bytes, address: str, port: int,
              timeout: float = HANDSHAKE_TIMEOUT) -> tuple[ssl.SSLSocket, PeerInfo]:
    """A mutual-TLS socket to the device holding `pinned_der`; PeerRefused if it is not that one."""
    raw = socket.create_connection((address, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        raw.sendall(prelude(MODE_MESH))
        sock = client_context(identity, pinned_der).wrap_socket(raw, do_handshake_on_connect=False)
        _handshake(sock, address)
    except BaseException:
        raw.close()
        raise
    got = sock.getpeercert(binary_form=True)
    if got != pinned_der:  # second, exact check: the pinned bytes themselves, not just the key
        sock.close()
        raise PeerRefused(f"{address}:{port} presented a certificate other than the paired one")
    return sock, PeerInfo(device_id_of(got), "", got, address)


def dial_pairing(identity: Identity, address: str, port: int,
                 timeout: float = HANDSHAKE_TIMEOUT) -> tuple[ssl.SSLSocket, bytes]:
    """A TLS socket for pairing and the server's (not yet trusted) certificate."""
    raw = socket.create_connection((address, port), timeout=timeout)
    try:
        raw.sendall(prelude(MODE_PAIR, identity.cert_der))
        sock = client_context(identity, None).wrap_socket(raw, do_handshake_on_connect=False)
        _handshake(sock, address)
    except BaseException:
        raw.close()
        raise
    return sock, sock.getpeercert(binary_form=True)


def _handshake(sock: ssl.SSLSocket, address: str) -> None:
    try:
        sock.do_handshake()
    except ssl.SSLError as exc:
        raise PeerRefused(f"TLS handshake with {address} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise PeerRefused(f"TLS handshake with {address} failed: {exc}") from None


def accept_tls(raw: socket.socket, ctx: ssl.SSLContext, address: str) -> ssl.SSLSocket:
    """Server side of the handshake; PeerRefused (the socket closed) when the client fails it."""
    sock = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    try:
        _handshake(sock, address)
    except PeerRefused:
        sock.close()
        raise
    return sock


# --- connections ------------------------------------------------------------------------------

class _Pending:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: Frame | None = None


class PendingReply:
    """A request already sent (Connection.submit); `result()` waits for its response."""

    def __init__(self, conn: "Connection", type: str, request_id: int, pending: _Pending):
        self._conn, self._type, self._id, self._pending = conn, type, request_id, pending

    def result(self, timeout: float = 30.0) -> Reply:
        """The response's Reply; RemoteError if the peer answered an error, RequestTimeout, ..."""
        conn = self._conn
        try:
            if not self._pending.event.wait(timeout):
                raise RequestTimeout(f"{self._type} to {conn._who()}: no response in {timeout:g} s")
        finally:
            with conn._pending_lock:
                conn._pending.pop(self._id, None)
        frame = self._pending.frame
        if frame is None and conn.refused:
            raise PeerRefused(f"{conn._who()} {conn.close_reason}")
        if frame is None:
            raise ConnectionClosed(f"connection to {conn._who()} closed: {conn.close_reason}")
        if frame.kind == "err":
            raise RemoteError(f"{conn._who()} answered {self._type}: {frame.fields.get('message', 'error')}")
        return Reply(frame.fields, frame.tensors, frame.data)


# Where a frame's payload is received instead of a fresh buffer: called on the reader thread with
# the connection, the frame (header only) and the payload's length; returns a writable memoryview
# of exactly that length, or None for a fresh buffer. See Connection.payload_buffers.
PayloadBuffer = Callable[["Connection", Frame, int], "memoryview | None"]


class Connection:
    """A framed, authenticated connection: requests both ways, heartbeats, a frame size limit.

    `on_request(conn, frame)` is called on the reader thread for each incoming request; it must
    not block (the handler registry hands work to a thread pool).
    """

    def __init__(self, sock: ssl.SSLSocket, peer: PeerInfo,
                 on_request: Callable[["Connection", Frame], None] | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, heartbeat_s: float = DEFAULT_HEARTBEAT):
        self.sock = sock
        self.peer = peer
        self.on_request = on_request
        self.max_frame = max_frame
        self.heartbeat_s = heartbeat_s
        self.closed = threading.Event()
        self.close_reason = ""
        self.refused = False
        self.on_close: list[Callable[["Connection"], None]] = []
        self._send_lock = threading.RLock()
        self._close_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._last_sent = time.monotonic()
        self._last_received = time.monotonic()
        self._send_stalled_since: float | None = None  # a send in progress: when it last moved
        self._threads: list[threading.Thread] = []
        # Message type -> PayloadBuffer. A bulk receiver (collective.py) registers one so that
        # its payloads land in buffers it reuses: no fresh allocation (and page faults) per
        # frame. The frame is still decoded and checked exactly as any other.
        self.payload_buffers: dict[str, PayloadBuffer] = {}

    def start(self) -> "Connection":
        # Blocking (see the module docstring); silence for three heartbeats means the peer is
        # gone, which the heartbeat thread enforces.
        self.sock.settimeout(None)
        self._last_received = time.monotonic()
        for target, name in ((self._read_loop, "reader"), (self._heartbeat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"mesh-{name}-{self.peer.address}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    # sending

    def send(self, frame: Frame) -> None:
        # The parts are the header and zero-copy views of the tensors' storage; each goes to
        # SSL_write whole (OpenSSL cuts it into records), so no payload is copied in Python.
        parts = encode_frame(frame, self.max_frame)
        failure: OSError | None = None
        with self._send_lock:
            if self.closed.is_set():
                self._raise_closed()
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    for start in range(0, len(view), SEND_SLICE):
                        self._send_stalled_since = time.monotonic()  # progress, for the watchdog
                        self.sock.sendall(view[start : start + SEND_SLICE])
                self._last_sent = time.monotonic()
            except OSError as exc:
                failure = exc
            finally:
                self._send_stalled_since = None
        if failure is not None:
            # The reader usually knows why (a TLS alert refusing our certificate arrives after
            # our side of the handshake is done): give it a moment to say so.
            reader = self._threads[0] if self._threads else None
            if reader is not None and reader is not threading.current_thread():
                reader.join(2.0)
            self.close(f"send failed: {failure}")
            self._raise_closed()

    def _raise_closed(self) -> None:
        if self.refused:
            raise PeerRefused(f"{self._who()} {self.close_reason}")
        raise ConnectionClosed(f"connection to {self._who()} closed: {self.close_reason}")

    def request(self, type: str, fields: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None,
                data: bytes | None = None, timeout: float = 30.0) -> Reply:
        """Send a request and wait for its response; RemoteError if the peer answers an error."""
        return self.submit(type, fields, tensors, data).result(timeout)

    def submit(self, type: str, fields: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None,
               data: bytes | None = None) -> PendingReply:
        """Send a request and return at once; the PendingReply waits for the response. Lets a
        caller keep several requests in flight on one connection (pipelining)."""
        request_id = next(self._ids)
        pending = _Pending()
        with self._pending_lock:
            self._pending[request_id] = pending
        try:
            self.send(Frame("req", type, request_id, dict(fields or {}), tensors, data))
        except BaseException:
            with self._pending_lock:
                self._pending.pop(request_id, None)
            raise
        return PendingReply(self, type, request_id, pending)

    def reply(self, request: Frame, reply: Reply) -> None:
        self.send(Frame("res", request.type, request.id, reply.fields, reply.tensors, reply.data))

    def reply_error(self, request: Frame, message: str) -> None:
        self.send(Frame("err", request.type, request.id, {"message": message[:500]}))

    # receiving

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_into(self, view: memoryview) -> None:
        # recv_into straight into the destination: TLS hands back at most one record (16 KiB)
        # per call, and each lands where it belongs, with no intermediate bytes objects.
        got, n = 0, len(view)
        while got < n:
            count = self.sock.recv_into(view[got:], n - got)
            if count == 0:
                raise ConnectionClosed("peer closed the connection")
            got += count
            self._last_received = time.monotonic()

    def read_frame(self) -> Frame:
        header_len, payload_len = decode_prefix(bytes(self._recv_exact(PREFIX.size)), self.max_frame)
        frame, fmt = decode_header(bytes(self._recv_exact(header_len)))
        payload: bytearray | memoryview = b""  # type: ignore[assignment]
        if payload_len:
            target = self.payload_buffers.get(frame.type)
            view = target(self, frame, payload_len) if target is not None and fmt else None
            if view is not None and (view.readonly or view.nbytes != payload_len):
                view = None  # a wrong buffer is the receiver's bug; a fresh one is always safe
            if view is None:
                payload = self._recv_exact(payload_len)
            else:
                self._recv_into(view)
                payload = view
        attach_payload(frame, fmt, payload)  # tensors share `payload`: no copy
        return frame

    def _read_loop(self) -> None:
        reason = "closed"
        try:
            while not self.closed.is_set():
                frame = self.read_frame()
                if frame.kind == "hb":
                    continue
                if frame.kind == "req":
                    if self.on_request is None:
                        self.reply_error(frame, "this side serves no requests")
                    else:
                        self.on_request(self, frame)
                    continue
                with self._pending_lock:
                    pending = self._pending.get(frame.id)
                if pending is not None:
                    pending.frame = frame
                    pending.event.set()
        except FrameError as exc:
            reason = f"bad frame: {exc}"
            log.warning("closing connection to %s: %s", self._who(), reason)
        except socket.timeout:
            reason = "peer stopped answering (no heartbeat)"
        except ssl.SSLError as exc:
            # In TLS 1.3 a server's refusal of our certificate arrives after our side of the
            # handshake is done: it shows up here, on the first read.
            reason = f"refused by the peer in the TLS handshake: {exc.reason or exc}"
            self.refused = True
        except (ConnectionClosed, OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.close(reason)
            self._release()

    def _heartbeat_loop(self) -> None:
        while not self.closed.wait(self.heartbeat_s / 2):
            now = time.monotonic()
            if now - self._last_received > 3 * self.heartbeat_s:
                self.close("peer stopped answering (no heartbeat)")
                return
            stalled = self._send_stalled_since
            if stalled is not None and now - stalled > 3 * self.heartbeat_s:
                self.close("peer stopped reading (send stalled, no heartbeat)")
                return
            # A send in progress is as good as a heartbeat; never queue behind it here.
            if now - self._last_sent >= self.heartbeat_s and self._send_lock.acquire(blocking=False):
                try:
                    self.send(Frame("hb", "hb"))
                except Exception:
                    return
                finally:
                    self._send_lock.release()

    def close(self, reason: str = "closed") -> None:
        with self._close_lock:
            if self.closed.is_set():
                return
            self.close_reason = reason
            self.closed.set()
        # Shut the socket down (wakes the reader, fails a blocked send) but let only the reader
        # thread close the descriptor: closing it under a blocked reader could let the number be
        # reused by a new socket while the old reader still polls it. SSLSocket.shutdown would
        # also drop the TLS object under a sender, so the plain socket's shutdown is used.
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        reader = self._threads[0] if self._threads else None
        if reader is None or reader is threading.current_thread():
            self._release()
        with self._pending_lock:
            for pending in self._pending.values():
                pending.event.set()
        for callback in list(self.on_close):
            try:
                callback(self)
            except Exception:
                log.exception("on_close callback failed")

    def _release(self) -> None:
        with self._send_lock:  # no send is running on this socket once we hold the lock
            try:
                self.sock.close()
            except OSError:
                pass

    def _who(self) -> str:
        return self.peer.name or self.peer.device_id[:7] or self.peer.address

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
