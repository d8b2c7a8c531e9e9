"""The device agent (`hearth worker`, and the app's own side of the mesh).

It listens on the chosen interfaces, advertises itself by mDNS, answers pairing-mode
connections (the person accepts on this device), and serves authenticated requests from paired
devices through a handler registry:

    agent.register_handler("job.forward", fn, fields={"step": int})

Built in: `mesh.hello`, `mesh.profile`, `mesh.echo`, `mesh.sink` (link measurement),
`file.offer/chunk/done` (files.py) and `mesh.unpair`. Training work plugs in as more handlers.
Every accepted socket gets its own thread; a bad prelude, a failed handshake or a bad frame
closes that socket only. This module does not browse for others (service.py does).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.errors import HearthError
from mesh.discovery import Discovery
from mesh.errors import FrameError, MeshError, PeerRefused
from mesh.files import FileReceiver
from mesh.frames import DEFAULT_MAX_FRAME
from mesh.handlers import Handler, HandlerRegistry, Request
from mesh.identity import Identity, default_device_name, load_or_create_identity
from mesh.pairing import IncomingPairing, PairingLimits, PairingResponder
from mesh.profile import measure_device
from mesh.transport import (
    DEFAULT_HEARTBEAT, HANDSHAKE_TIMEOUT, MODE_MESH, Connection, PeerInfo, Reply, accept_tls, read_prelude,
    server_context,
)
from mesh.trust import TrustStore

log = logging.getLogger("hearth.mesh")

MAX_PAIRING_CONNECTIONS = 8


@dataclass
class AgentConfig:
    name: str = ""
    kind: str = "laptop"
    port: int = 0
    interfaces: list[str] = field(default_factory=list)
    accept_pairing: bool = True
    advertise: bool = True
    heartbeat_s: float = DEFAULT_HEARTBEAT
    max_frame: int = DEFAULT_MAX_FRAME
    pairing: PairingLimits = field(default_factory=PairingLimits)

    @classmethod
    def from_settings(cls, **overrides) -> "AgentConfig":
        """The [mesh] section of the config, with command-line overrides (None: keep)."""
        from core.config import load_config

        loaded = load_config()
        mesh = loaded.section("mesh")
        config = cls(
            name=mesh["name"] or default_device_name(), kind=mesh["kind"], port=int(mesh["port"]),
            interfaces=list(mesh["interfaces"]), accept_pairing=bool(mesh["accept_pairing"]),
            heartbeat_s=float(mesh["heartbeat_s"]), max_frame=int(mesh["max_frame_mb"]) << 20,
            pairing=PairingLimits(expiry_s=float(mesh["pairing_expiry_s"]), max_pending=int(mesh["pairing_max_pending"]),
                                  max_failures=int(mesh["pairing_max_failures"]), block_s=float(mesh["pairing_block_s"])),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.pairing.enabled = config.accept_pairing
        for dotted, value, low in (("mesh.heartbeat_s", config.heartbeat_s, 0.1), ("mesh.max_frame_mb", mesh["max_frame_mb"], 1),
                                   ("mesh.pairing_expiry_s", config.pairing.expiry_s, 1), ("mesh.pairing_max_pending", config.pairing.max_pending, 1),
                                   ("mesh.pairing_max_failures", config.pairing.max_failures, 1)):
            if value < low:
                raise HearthError(f"{loaded.path}: {dotted} must be at least {low}, got {value}")
        return config


class Agent:
    def __init__(self, config: AgentConfig, identity: Identity | None = None, trust: TrustStore | None = None,
                 on_pairing_request: Callable[[IncomingPairing], None] | None = None):
        self.config = config
        self.config.name = config.name or default_device_name()
        self.config.pairing.enabled = config.accept_pairing
        self.identity = identity or load_or_create_identity()
        self.trust = trust or TrustStore()
        self.handlers = HandlerRegistry(authorize=lambda peer: self.trust.is_trusted(peer.cert_der))
        self.files = FileReceiver()
        self.files.register(self.handlers)
        self._register_builtins()
        self.responder = PairingResponder(self.identity, self.trust, self.config.name, self.config.kind,
                                          on_pairing_request or (lambda incoming: incoming.reject()),
                                          self.config.pairing)
        self.discovery: Discovery | None = None
        self.connections: list[Connection] = []
        self.refused: deque[str] = deque(maxlen=100)  # recent refusals, for the UI and tests
        self._listeners: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairing_slots = threading.BoundedSemaphore(MAX_PAIRING_CONNECTIONS)
        self._profile_cache: tuple[float, dict] | None = None
        self.port = 0

    # extension point

    def register_handler(self, type: str, fn: Handler, fields: dict | None = None) -> None:
        """Serve requests of `type` from paired devices (see handlers.py)."""
        self.handlers.register(type, fn, fields)

    # lifecycle

    def start(self, discovery: Discovery | None = None) -> "Agent":
        addresses = self.config.interfaces or ["0.0.0.0"]
        port = self.config.port
        for address in addresses:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((address, port))
            except OSError as exc:
                listener.close()
                self.stop()
                raise MeshError(f"cannot listen on {address}:{port}: {exc.strerror or exc} (mesh.port, --port, --interface)") from None
            listener.listen(64)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            self._listeners.append(listener)
            self._selector.register(listener, selectors.EVENT_READ)
        self.port = port
        self.responder.port = port
        threading.Thread(target=self._accept_loop, name="mesh-accept", daemon=True).start()
        if self.config.advertise:
            self.discovery = discovery or Discovery(self.config.interfaces, own_id=self.identity.device_id).start()
            self.discovery.advertise(self.identity.device_id, self.config.name, self.config.kind, port,
                                     self.config.accept_pairing)
        log.info("agent %s (%s) listening on port %d", self.config.name, self.identity.device_id[:7], port)
        return self

    def stop(self) -> None:
        """Withdraw the mDNS record, stop listening, close every connection."""
        self._stop.set()
        if self.discovery is not None:
            self.discovery.close()
        for listener in self._listeners:
            try:
                self._selector.unregister(listener)
            except (KeyError, ValueError):
                pass
            listener.close()
        with self._lock:
            connections = list(self.connections)
        for conn in connections:
            conn.close("agent stopped")
        self.handlers.shutdown()

    def set_accept_pairing(self, accepts: bool) -> None:
        self.config.accept_pairing = accepts
        self.config.pairing.enabled = accepts
        if self.discovery is not None:
            self.discovery.set_accepts_pairing(self.identity.device_id, self.config.name, self.config.kind, accepts)

    # accepting

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select(timeout=0.5)
            except (OSError, ValueError):
                return
            for key, _ in events:
                try:
                    raw, (address, _port) = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue
                raw.setblocking(True)
                threading.Thread(target=self._serve_socket, args=(raw, address), daemon=True,
                                 name=f"mesh-conn-{address}").start()

    def _serve_socket(self, raw: socket.socket, address: str) -> None:
        raw.settimeout(HANDSHAKE_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode, client_cert = read_prelude(raw)
        except (FrameError, OSError) as exc:
            # Liveness probes connect and hang up without a byte; anything else is noise too.
            log.debug("dropped connection from %s before TLS: %s", address, exc)
            raw.close()
            return
        if mode == MODE_MESH:
            self._serve_mesh(raw, address)
        else:
            self._serve_pairing(raw, address, client_cert)

    def _serve_mesh(self, raw: socket.socket, address: str) -> None:
        try:
            sock = accept_tls(raw, server_context(self.identity, self.trust.cadata()), address)
        except PeerRefused as exc:
            self._refuse(address, str(exc))
            return
        cert = sock.getpeercert(binary_form=True)
        device = self.trust.get(_device_id(cert))
        if device is None or device.cert_der != cert:  # belt and braces after OpenSSL's check
            sock.close()
            self._refuse(address, "certificate is not paired")
            return
        sock.settimeout(None)
        peer = PeerInfo(device.device_id, device.name, cert, address)
        conn = Connection(sock, peer, self.handlers.dispatch, self.config.max_frame, self.config.heartbeat_s)
        with self._lock:
            self.connections.append(conn)
        conn.on_close.append(self._forget)
        conn.start()
        log.info("%s (%s) connected from %s", device.name, device.device_id[:7], address)

    def _serve_pairing(self, raw: socket.socket, address: str, client_cert: bytes | None) -> None:
        if not self._pairing_slots.acquire(blocking=False):
            raw.close()
            self._refuse(address, "too many pairing connections at once")
            return
        try:
            ctx = server_context(self.identity, _pem(client_cert))
            try:
                sock = accept_tls(raw, ctx, address)
            except PeerRefused as exc:
                self._refuse(address, f"pairing handshake failed: {exc}")
                return
            if sock.getpeercert(binary_form=True) != client_cert:
                sock.close()
                self._refuse(address, "pairing certificate differs from the one announced")
                return
            # The initiator may take up to the expiry to confirm on its side too.
            sock.settimeout(self.config.pairing.expiry_s + 30)
            peer = PeerInfo(_device_id(client_cert), "", client_cert, address)
            self.responder.serve(Connection(sock, peer, max_frame=1 << 16), client_cert)
        finally:
            self._pairing_slots.release()

    def _refuse(self, address: str, reason: str) -> None:
        self.refused.append(f"{address}: {reason}")
        log.warning("refused connection from %s: %s", address, reason)

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            if conn in self.connections:
                self.connections.remove(conn)
        if conn.close_reason.startswith("bad frame"):
            self.refused.append(f"{conn.peer.address}: {conn.close_reason}")

    # built-in handlers

    def _register_builtins(self) -> None:
        self.register_handler("mesh.hello", self._hello)
        self.register_handler("mesh.profile", self._profile)
        self.register_handler("mesh.echo", self._echo)
        self.register_handler("mesh.sink", self._sink)
        self.register_handler("mesh.unpair", self._unpair)

    def _hello(self, request: Request) -> dict:
        from mesh.discovery import PROTOCOL_VERSION

        return {"id": self.identity.device_id, "name": self.config.name, "kind": self.config.kind,
                "version": PROTOCOL_VERSION, "handlers": self.handlers.types()}

    def _profile(self, request: Request) -> dict:
        # The matmul measurement takes a moment: reuse it for a minute.
        now = time.monotonic()
        if self._profile_cache is None or now - self._profile_cache[0] > 60:
            self._profile_cache = (now, measure_device().to_fields())
        return dict(self._profile_cache[1])

    def _echo(self, request: Request) -> Reply:
        return Reply(dict(request.fields), request.tensors, request.data)

    def _sink(self, request: Request) -> dict:
        size = len(request.data or b"")
        for tensor in (request.tensors or {}).values():
            size += tensor.numel() * tensor.element_size()
        return {"bytes": size}

    def _unpair(self, request: Request) -> dict:
        self.trust.remove(request.peer.device_id)
        log.info("%s unpaired itself from this device", request.peer.name)
        if request.connection is not None:
            conn = request.connection
            threading.Timer(0.2, conn.close, args=("unpaired",)).start()
        return {"removed": True}


def _device_id(cert: bytes) -> str:
    from mesh.identity import device_id_of

    return device_id_of(cert)


def _pem(cert: bytes | None) -> str:
    from mesh.identity import der_to_pem

    return der_to_pem(cert) if cert else ""

