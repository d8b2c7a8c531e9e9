"""MeshService: the one headless entry point to the mesh for the CLI and the app.

    service = MeshService(serve=True, on_pairing_request=show_prompt)   # serve=False: only browse
    service.start()
    service.devices()                   # -> list[DeviceInfo], a snapshot (heard + paired)
    pairing = service.pair("kitchen")   # name or id prefix (or "host:port"), -> OutgoingPairing
    pairing.code_ready.wait(); pairing.code; pairing.accept(); pairing.wait(75) -> PairingResult
    service.unpair("kitchen")           # forget it here, and tell it to forget us
    with service.connect("kitchen") as peer: peer.request(...)   # a PeerClient
    service.add_address("192.168.1.20", 7000)   # where multicast is blocked
    service.stop()                      # withdraws the mDNS record

`on_pairing_request(IncomingPairing)` is called (on a mesh thread) when someone asks to pair
with this device; the UI shows `code` and `grant`, then calls accept() or reject(). It must not
block. `on_device_change(event, DeviceInfo)` reports seen/updated/gone. Nothing here prints or
reads the terminal; the commands in app/commands do that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from core.errors import HearthError
from mesh.agent import Agent, AgentConfig
from mesh.client import PeerClient
from mesh.discovery import Discovery, SeenDevice
from mesh.errors import MeshError, PairingError
from mesh.identity import load_or_create_identity, short_id
from mesh.pairing import IncomingPairing, OutgoingPairing, call
from mesh.transport import Connection, PeerInfo, dial_pairing
from mesh.trust import TrustStore


@dataclass
class DeviceInfo:
    """One row of the device list; `to_json()` is the stable shape of `hearth devices --json`."""

    id: str
    name: str
    kind: str
    addresses: list[str]
    port: int
    paired: bool
    state: str              # seen, updated, gone (heard by mDNS), manual (added by address), offline (paired, not heard)
    accepts_pairing: bool
    last_seen: float | None
    # Every (address, port) heard claiming this id; the TLS pin decides which one is real.
    endpoints: list[tuple[str, int]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("endpoints")
        data["short_id"] = short_id(self.id)
        return data


class MeshService:
    def __init__(self, serve: bool = False, on_pairing_request: Callable[[IncomingPairing], None] | None = None,
                 on_device_change: Callable[[str, DeviceInfo], None] | None = None, **config_overrides):
        self.config = AgentConfig.from_settings(**config_overrides)
        self.serve = serve
        self.identity = load_or_create_identity()
        self.trust = TrustStore()
        self.on_pairing_request = on_pairing_request
        self.on_device_change = on_device_change
        self.discovery: Discovery | None = None
        self.agent: Agent | None = None

    # lifecycle

    def start(self) -> "MeshService":
        self.discovery = Discovery(self.config.interfaces, own_id=self.identity.device_id,
                                   on_change=self._changed).start()
        if self.serve:
            self.agent = Agent(self.config, self.identity, self.trust, self._incoming)
            try:
                self.agent.start(self.discovery)
            except BaseException:
                self.discovery.close()
                raise
        return self

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()  # closes the shared discovery too (goodbye first)
        elif self.discovery is not None:
            self.discovery.close()

    def __enter__(self) -> "MeshService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    # the list

    def devices(self, include_gone: bool = True) -> list[DeviceInfo]:
        rows: dict[str, DeviceInfo] = {}
        heard = self.discovery.devices(include_gone) if self.discovery else []
        # Several records may claim one id (an impostor, or a stale record): the live, most
        # recently seen one gives the row; every claimed endpoint is kept for dialling.
        for seen in sorted(heard, key=lambda d: (d.state != "gone", d.last_seen)):
            row = self._row(seen)
            old = rows.get(seen.device_id)
            row.endpoints = (old.endpoints if old else []) + [(a, seen.port) for a in seen.addresses if seen.state != "gone"]
            rows[seen.device_id] = row
        for trusted in self.trust.all():
            row = rows.get(trusted.device_id)
            if row is None:
                rows[trusted.device_id] = DeviceInfo(trusted.device_id, trusted.name, trusted.kind, list(trusted.addresses),
                                                     trusted.port, True, "offline", False, None)
        return sorted(rows.values(), key=lambda d: (not d.paired, d.name, d.id))

    def _row(self, seen: SeenDevice) -> DeviceInfo:
        trusted = self.trust.get(seen.device_id)
        state = "manual" if seen.source == "address" and seen.state != "gone" else seen.state
        return DeviceInfo(seen.device_id, seen.name, seen.kind, list(seen.addresses), seen.port, trusted is not None,
                          state, seen.accepts_pairing, seen.last_seen)

    def wait_for(self, ref: str, timeout: float) -> DeviceInfo:
        """The device `ref` once it is heard (or known), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                device = self.find(ref)
                if device.state not in ("gone", "offline") or time.monotonic() >= deadline:
                    return device
            except HearthError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.2)

    def find(self, ref: str) -> DeviceInfo:
        """A device by exact name, or by id prefix (at least 4 letters); HearthError if unknown or ambiguous."""
        devices = self.devices()
        exact = [d for d in devices if d.name == ref]
        matches = exact or [d for d in devices if len(ref) >= 4 and d.id.startswith(ref.upper())]
        if not matches:
            raise HearthError(f"no device called {ref!r} (see `hearth devices`)")
        live = [d for d in matches if d.state != "gone"] or matches
        if len({d.id for d in live}) > 1:
            raise HearthError(f"{ref!r} names {len(live)} devices; use the id: " + ", ".join(short_id(d.id) for d in live))
        return live[0]

    def add_address(self, host: str, port: int) -> DeviceInfo:
        """The add-by-address fallback: ask the device at host:port who it is (pairing-mode hello)."""
        try:
            sock, cert = dial_pairing(self.identity, host, port)
        except OSError as exc:
            raise MeshError(f"cannot reach a Hearth device at {host}:{port}: {exc.strerror or exc}") from None
        conn = Connection(sock, PeerInfo("", "", cert, host))
        try:
            info = call(conn, "pair.info", {}, 10)
        finally:
            conn.close()
        from mesh.identity import device_id_of

        kind = info.get("kind") if info.get("kind") in ("laptop", "desktop", "phone") else "laptop"
        seen = SeenDevice(device_id_of(cert), str(info.get("name", ""))[:64] or host, kind, [host], port,
                          bool(info.get("pairing")), "", f"{host}:{port}", source="address")
        assert self.discovery is not None, "start() the service first"
        self.discovery.add_manual(seen)
        return self._row(seen)

    # pairing

    def pair(self, ref: str, confirm_locally: bool = True) -> OutgoingPairing:
        """Start pairing with a device (name, id prefix, or host:port); see OutgoingPairing."""
        device = self._resolve_for_pairing(ref)
        if device.paired:
            raise PairingError(f"{device.name} is already paired (unpair it first to pair again)")
        if not device.addresses or not device.port:
            raise MeshError(f"no address known for {device.name}")
        my_port = self.agent.port if self.agent else 0
        return OutgoingPairing(self.identity, self.trust, self.config.name, self.config.kind, device.addresses[0],
                               device.port, my_port, confirm_locally).start()

    def _resolve_for_pairing(self, ref: str) -> DeviceInfo:
        host, sep, port = ref.rpartition(":")
        if sep and port.isdigit() and host:
            return self.add_address(host, int(port))
        return self.find(ref)

    def pending_requests(self) -> list[IncomingPairing]:
        return self.agent.responder.pending() if self.agent else []

    def set_accept_pairing(self, accepts: bool) -> None:
        if self.agent is not None:
            self.agent.set_accept_pairing(accepts)

    def _incoming(self, incoming: IncomingPairing) -> None:
        if self.on_pairing_request is None:
            incoming.reject()
        else:
            self.on_pairing_request(incoming)

    # after pairing

    def unpair(self, ref: str) -> DeviceInfo:
        """Forget a paired device here at once, then ask it (if reachable) to forget us."""
        device = self.find(ref)
        trusted = self.trust.get(device.id)
        if trusted is None:
            raise HearthError(f"{device.name} is not paired")
        notice = threading.Thread(target=self._tell_unpaired, args=(device,), daemon=True)
        notice.start()
        notice.join(5)
        self.trust.remove(device.id)
        if self.agent is not None:
            for conn in list(self.agent.connections):
                if conn.peer.device_id == device.id:
                    conn.close("unpaired")
        device.paired = False
        return device

    def _tell_unpaired(self, device: DeviceInfo) -> None:
        try:
            with self.connect(device.id, timeout=3) as peer:
                peer.request("mesh.unpair", {}, timeout=3)
        except (MeshError, OSError):
            pass  # offline: it will be refused when it next connects

    def connect(self, ref: str, timeout: float = 10.0) -> PeerClient:
        device = self.find(ref)
        handlers = self.agent.handlers if self.agent else None
        endpoints = list(reversed(device.endpoints)) or [(a, device.port) for a in device.addresses]
        return PeerClient.connect(device.id, endpoints, self.identity, self.trust, handlers=handlers, timeout=timeout, max_frame=self.config.max_frame,
                                  heartbeat_s=self.config.heartbeat_s)

    def _changed(self, event: str, seen: SeenDevice) -> None:
        # The trust store's addresses change only after an authenticated connection (client.py),
        # never from a TXT record anyone can forge.
        if self.on_device_change is not None:
            self.on_device_change(event, self._row(seen))
