"""Pairing by numeric comparison with a commitment (MESH.md), over a pairing-mode TLS connection.

The initiator A dials the responder B in pairing mode (transport.py): both certificates are
presented in the TLS handshake, neither is trusted yet. Then, as requests on that connection:

1. `pair.start`  A -> B: A's name, kind and commitment C = SHA-256(nonce_A). B answers nonce_B.
2. `pair.reveal` A -> B: nonce_A. B checks SHA-256(nonce_A) == C (a mismatch is refused and
   counted as a failed attempt). Both compute the code (below) and show it; B asks its person,
   and answers `accepted` once they decide (or false after 60 s).
3. `pair.finish` A -> B: A's own decision. Only if both accepted does each side store the other's
   certificate in its trust store.

code = the SHA-256 of (fp_A || fp_B || nonce_A || nonce_B), read as a big-endian integer, modulo
10^6, written with 6 digits; fp = SHA-256 of the certificate's DER as seen in the TLS handshake.
Because A commits to nonce_A before seeing nonce_B, a man in the middle cannot grind keys or
nonces until the two codes match: it gets one guess in a million per attempt, and three failed
attempts block its address.

The responder keeps rate limits: at most `max_pending` requests wait for an answer at once, and
`max_failures` failed or rejected attempts from one address block it for `block_s` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.errors import MeshError, PairingError
from mesh.frames import Frame
from mesh.identity import Identity, device_id_of, fingerprint
from mesh.transport import Connection, PeerInfo, dial_pairing
from mesh.trust import TrustedDevice, TrustStore

log = logging.getLogger("hearth.mesh")

NONCE_BYTES = 32
PAIRING_EXPIRY_S = 60.0


def grant_text(peer_name: str) -> str:
    """What pairing with `peer_name` grants (MESH.md), said with its name: "this device" read as
    the one in the person's hand, on whichever side it was shown."""
    return (f"Pairing lets {peer_name} send you training work and your device's adapters, "
            "and receive the data of jobs you run with it.")


def commitment(nonce_a: bytes) -> bytes:
    return hashlib.sha256(nonce_a).digest()


def pairing_code(cert_a: bytes, cert_b: bytes, nonce_a: bytes, nonce_b: bytes) -> str:
    """The 6-digit code both devices show (MESH.md)."""
    digest = hashlib.sha256(fingerprint(cert_a) + fingerprint(cert_b) + nonce_a + nonce_b).digest()
    return f"{int.from_bytes(digest, 'big') % 1_000_000:06d}"


# --- the responder ----------------------------------------------------------------------------

@dataclass
class IncomingPairing:
    """A pairing request waiting for this device's person: show `code`, then accept or reject."""

    peer_id: str
    peer_name: str
    peer_kind: str
    address: str
    code: str
    expires_at: float
    _decision: threading.Event = field(default_factory=threading.Event, repr=False)
    accepted: bool | None = None

    @property
    def grant(self) -> str:
        return grant_text(self.peer_name)

    def accept(self) -> None:
        self._decide(True)

    def reject(self) -> None:
        self._decide(False)

    def _decide(self, accepted: bool) -> None:
        if not self._decision.is_set():
            self.accepted = accepted
            self._decision.set()

    @property
    def decided(self) -> bool:
        return self._decision.is_set()

    def wait(self, timeout: float | None = None) -> bool | None:
        self._decision.wait(timeout)
        return self.accepted


@dataclass
class PairingLimits:
    enabled: bool = True
    expiry_s: float = PAIRING_EXPIRY_S
    max_pending: int = 3
    max_failures: int = 3
    block_s: float = 600.0


class PairingResponder:
    """Answers pairing-mode connections; `on_request(IncomingPairing)` shows the prompt.

    `on_request` must not block: it shows the request and later calls accept() or reject().
    """

    def __init__(self, identity: Identity, trust: TrustStore, name: str, kind: str,
                 on_request: Callable[[IncomingPairing], None], limits: PairingLimits | None = None,
                 port: int = 0):
        self.identity = identity
        self.trust = trust
        self.name = name
        self.kind = kind
        self.port = port
        self.on_request = on_request
        self.limits = limits or PairingLimits()
        self.on_result: Callable[[IncomingPairing, str], None] | None = None
        self._lock = threading.Lock()
        self._pending: list[IncomingPairing] = []
        self._failures: dict[str, list[float]] = {}  # address -> times of failed attempts

    def pending(self) -> list[IncomingPairing]:
        with self._lock:
            return list(self._pending)

    def is_blocked(self, address: str) -> bool:
        with self._lock:
            return self._blocked_locked(address)

    def _blocked_locked(self, address: str) -> bool:
        cutoff = time.monotonic() - self.limits.block_s
        times = [t for t in self._failures.get(address, []) if t > cutoff]
        self._failures[address] = times
        return len(times) >= self.limits.max_failures

    def _fail(self, address: str) -> None:
        with self._lock:
            self._failures.setdefault(address, []).append(time.monotonic())

    def serve(self, conn: Connection, client_cert: bytes) -> None:
        """Run one pairing conversation on `conn` (not started; frames are read here)."""
        address = conn.peer.address
        state: dict = {}
        try:
            while True:
                frame = conn.read_frame()
                if frame.kind == "hb":
                    continue
                if frame.kind != "req":
                    raise PairingError("unexpected frame")
                try:
                    answer = self._step(frame, state, client_cert, address, conn)
                except PairingError as exc:
                    conn.reply_error(frame, str(exc))
                    if state.get("counted_failure") is not True and state.get("started"):
                        self._fail(address)
                    return
                conn.send(Frame("res", frame.type, frame.id, answer))
                if frame.type == "pair.finish" or frame.type == "pair.info":
                    return
        except (MeshError, OSError) as exc:  # includes timeouts and TLS errors: this socket only
            if state.get("started") and not state.get("done"):
                self._fail(address)
            log.info("pairing conversation with %s ended: %s", address, exc)
        finally:
            incoming = state.get("incoming")
            if incoming is not None:
                incoming.reject()  # a vanished initiator withdraws its prompt
                with self._lock:
                    if incoming in self._pending:
                        self._pending.remove(incoming)
            conn.close("pairing done")

    def _step(self, frame: Frame, state: dict, client_cert: bytes, address: str, conn: Connection) -> dict:
        f = frame.fields
        if frame.type == "pair.info":
            return {"id": self.identity.device_id, "name": self.name, "kind": self.kind,
                    "pairing": self.limits.enabled}
        if frame.type == "pair.start" and "started" not in state:
            if not self.limits.enabled:
                raise PairingError(f"{self.name} does not accept pairing requests")
            with self._lock:
                if self._blocked_locked(address):
                    state["counted_failure"] = True
                    raise PairingError("too many failed pairing attempts from this address; try later")
                if len(self._pending) >= self.limits.max_pending:
                    state["counted_failure"] = True
                    raise PairingError(f"{self.name} has too many pairing requests waiting; try later")
            commit, name, kind = f.get("commitment"), f.get("name"), f.get("kind")
            if not isinstance(commit, bytes) or len(commit) != 32:
                raise PairingError("pair.start: commitment must be 32 bytes")
            if not isinstance(name, str) or not 0 < len(name) <= 64 or kind not in ("laptop", "desktop", "phone"):
                raise PairingError("pair.start: bad name or kind")
            port = f.get("port", 0)
            state.update(started=True, commitment=commit, name=name, kind=kind,
                         port=port if isinstance(port, int) and 0 <= port < 65536 else 0,
                         nonce_b=os.urandom(NONCE_BYTES))
            return {"nonce": state["nonce_b"], "name": self.name, "kind": self.kind}
        if frame.type == "pair.reveal" and state.get("started") and "incoming" not in state:
            nonce_a = f.get("nonce")
            if not isinstance(nonce_a, bytes) or len(nonce_a) != NONCE_BYTES or commitment(nonce_a) != state["commitment"]:
                raise PairingError("the pairing commitment does not match the revealed nonce; refused")
            code = pairing_code(client_cert, self.identity.cert_der, nonce_a, state["nonce_b"])
            incoming = IncomingPairing(device_id_of(client_cert), state["name"], state["kind"], address, code,
                                       time.time() + self.limits.expiry_s)
            with self._lock:
                if len(self._pending) >= self.limits.max_pending:
                    raise PairingError(f"{self.name} has too many pairing requests waiting; try later")
                self._pending.append(incoming)
            state["incoming"] = incoming
            self.on_request(incoming)
            accepted = self._await_decision(incoming, conn)
            with self._lock:
                if incoming in self._pending:
                    self._pending.remove(incoming)
            if not accepted:
                state["done"] = True
                self._fail(address)
                state["counted_failure"] = True
                reason = "expired" if incoming.accepted is None else "rejected"
                self._report(incoming, reason)
                raise PairingError(f"{self.name}: pairing {reason}")
            return {"accepted": True}
        if frame.type == "pair.finish" and state.get("incoming") is not None:
            incoming = state["incoming"]
            state["done"] = True
            if f.get("accepted") is not True:
                self._fail(address)
                state["counted_failure"] = True
                self._report(incoming, "rejected by the other device")
                raise PairingError("pairing cancelled by the initiator")
            self.trust.add(client_cert, state["name"], state["kind"], [address], state["port"])
            with self._lock:
                self._failures.pop(address, None)
            self._report(incoming, "paired")
            return {"stored": True}
        raise PairingError(f"unexpected {frame.type} at this point of pairing")

    def _await_decision(self, incoming: IncomingPairing, conn: Connection) -> bool:
        """Wait for the person (up to the expiry); give up early if the initiator hangs up."""
        while time.time() < incoming.expires_at:
            if incoming.wait(0.25) is not None:
                return bool(incoming.accepted)
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable and not conn.sock.pending():
                # Settle the request first, so that the prompt showing it closes too.
                incoming._decide(False)
                try:
                    if conn.sock.recv(1, ) == b"":
                        raise PairingError("the initiator hung up")
                except (OSError, ValueError):
                    raise PairingError("the initiator hung up") from None
                raise PairingError("unexpected data while waiting for the decision")
        incoming._decide(False)
        incoming.accepted = None
        return False

    def _report(self, incoming: IncomingPairing, outcome: str) -> None:
        if self.on_result is not None:
            try:
                self.on_result(incoming, outcome)
            except Exception:
                log.exception("pairing result callback failed")


# --- the initiator ----------------------------------------------------------------------------

@dataclass
class PairingResult:
    paired: bool
    device: TrustedDevice | None
    message: str


class OutgoingPairing:
    """A pairing this device started. `code` is set once known (`code_ready` fires); the local
    person confirms with accept() (or reject()); `wait()` returns the PairingResult."""

    def __init__(self, identity: Identity, trust: TrustStore, name: str, kind: str, address: str, port: int,
                 my_port: int = 0, confirm_locally: bool = True, timeout_s: float = PAIRING_EXPIRY_S + 15):
        self.identity, self.trust = identity, trust
        self.name, self.kind = name, kind
        self.address, self.port, self.my_port = address, port, my_port
        self.timeout_s = timeout_s
        self.code: str | None = None
        self.peer_name = ""
        self.peer_id = ""
        self.code_ready = threading.Event()
        self._local = threading.Event()
        self._local_ok: bool | None = None if confirm_locally else True
        if not confirm_locally:
            self._local.set()
        self._done = threading.Event()
        self._result: PairingResult | None = None
        self._conn: Connection | None = None
        # Tests replace this to send a nonce that does not match the commitment.
        self.reveal_nonce: Callable[[bytes], bytes] = lambda nonce: nonce

    def start(self) -> "OutgoingPairing":
        threading.Thread(target=self._run, name="mesh-pair", daemon=True).start()
        return self

    def accept(self) -> None:
        self._local_ok = True
        self._local.set()

    def reject(self) -> None:
        self._local_ok = False
        self._local.set()
        if self._conn is not None and not self._done.is_set():
            self._conn.close("rejected here")

    def wait(self, timeout: float | None = None) -> PairingResult:
        if not self._done.wait(timeout):
            return PairingResult(False, None, "still waiting")
        assert self._result is not None
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._converse()
        except MeshError as exc:
            message = "pairing rejected on this device" if self._local_ok is False else str(exc)
            self._result = PairingResult(False, None, message)
        except OSError as exc:
            self._result = PairingResult(False, None, f"cannot reach {self.address}:{self.port}: {exc}")
        finally:
            if self._conn is not None:
                self._conn.close("pairing done")
            self.code_ready.set()
            self._done.set()

    def _converse(self) -> PairingResult:
        sock, server_cert = dial_pairing(self.identity, self.address, self.port)
        conn = Connection(sock, PeerInfo(device_id_of(server_cert), "", server_cert, self.address))
        self._conn = conn
        self.peer_id = device_id_of(server_cert)
        if self.peer_id == self.identity.device_id:
            raise PairingError("that is this device")
        nonce_a = os.urandom(NONCE_BYTES)
        started = call(conn, "pair.start", {"name": self.name, "kind": self.kind, "commitment": commitment(nonce_a),
                                            "port": self.my_port}, 15)
        nonce_b = started.get("nonce")
        if not isinstance(nonce_b, bytes) or len(nonce_b) != NONCE_BYTES:
            raise PairingError("the other device sent a bad nonce")
        self.peer_name = str(started.get("name", ""))[:64]
        peer_kind = started.get("kind") if started.get("kind") in ("laptop", "desktop", "phone") else "laptop"
        self.code = pairing_code(self.identity.cert_der, server_cert, nonce_a, nonce_b)
        self.code_ready.set()
        answer = call(conn, "pair.reveal", {"nonce": self.reveal_nonce(nonce_a)}, self.timeout_s)
        if answer.get("accepted") is not True:
            raise PairingError(f"{self.peer_name} did not accept")
        if not self._local.wait(self.timeout_s) or not self._local_ok:
            call(conn, "pair.finish", {"accepted": False}, 10, expect_error=True)
            raise PairingError("pairing rejected on this device")
        call(conn, "pair.finish", {"accepted": True}, 15)
        device = self.trust.add(server_cert, self.peer_name or self.peer_id[:7], peer_kind, [self.address], self.port)
        return PairingResult(True, device, f"paired with {device.name}")


def call(conn: Connection, type: str, fields: dict, timeout: float, expect_error: bool = False) -> dict:
    """A request on a connection that has no reader thread (pairing is strictly sequential)."""
    conn.sock.settimeout(timeout)
    conn.send(Frame("req", type, 1, fields))
    deadline = time.monotonic() + timeout
    while True:
        try:
            frame = conn.read_frame()
        except TimeoutError:
            raise PairingError(f"{type}: no answer in {timeout:g} s") from None
        except OSError as exc:
            raise PairingError(f"{type}: connection lost ({exc})") from None
        if frame.kind == "hb":
            if time.monotonic() > deadline:
                raise PairingError(f"{type}: no answer in {timeout:g} s")
            continue
        if frame.kind == "err":
            if expect_error:
                return {}
            raise PairingError(str(frame.fields.get("message", "refused")))
        if frame.kind != "res":
            raise PairingError("unexpected frame during pairing")
        return frame.fields
