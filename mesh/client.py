"""Calling a paired device: the API coordinators use.

    with PeerClient.connect(device_id) as peer:
        reply = peer.request("job.forward", {"step": 3}, tensors={"x": x})
        peer.send_file(path)
        profile = peer.profile()

`connect` dials the addresses given (from discovery) or else the last ones the trust store
remembers, with the device's stored certificate as the only trust anchor; an impostor fails the
TLS handshake (PeerRefused). A PeerClient can also serve requests the peer sends back
(`handlers`). This module does not discover or pair.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from mesh.errors import MeshError, PairingError, PeerRefused
from mesh.files import send_file
from mesh.frames import DEFAULT_MAX_FRAME
from mesh.handlers import HandlerRegistry
from mesh.identity import Identity, load_or_create_identity
from mesh.profile import DeviceProfile, LinkMeasurement, PeerProfile
from mesh.transport import DEFAULT_HEARTBEAT, Connection, PeerInfo, Reply, dial_mesh
from mesh.trust import TrustStore


class PeerClient:
    def __init__(self, conn: Connection):
        self.conn = conn

    @property
    def peer(self) -> PeerInfo:
        return self.conn.peer

    @classmethod
    def connect(cls, device_id: str, endpoints: list[tuple[str, int]] | None = None,
                identity: Identity | None = None, trust: TrustStore | None = None,
                handlers: HandlerRegistry | None = None, timeout: float = 10.0,
                max_frame: int = DEFAULT_MAX_FRAME, heartbeat_s: float = DEFAULT_HEARTBEAT) -> "PeerClient":
        """Dial a paired device at `endpoints` (address, port), then at its last known address.

        An endpoint whose certificate is not the pinned one is skipped (anyone can claim an id
        in mDNS); PeerRefused if no endpoint was the real device and one was an impostor.
        """
        identity = identity or load_or_create_identity()
        trust = trust or TrustStore()
        device = trust.get(device_id)
        if device is None:
            raise PairingError(f"device {device_id[:7]} is not paired with this one")
        candidates = list(endpoints or [])
        candidates += [(a, device.port) for a in device.addresses if device.port and (a, device.port) not in candidates]
        if not candidates:
            raise MeshError(f"no known address for {device.name}; is it on the network?")
        refused: PeerRefused | None = None
        last: Exception | None = None
        for address, port in candidates:
            try:
                sock, _ = dial_mesh(identity, device.cert_der, address, port, timeout)
            except PeerRefused as exc:
                refused = exc
                continue
            except OSError as exc:
                last = exc
                continue
            # Proven by the handshake: remember where it lives (the fallback when mDNS is silent).
            trust.update_location(device.device_id, [address], port)
            peer = PeerInfo(device.device_id, device.name, device.cert_der, address)
            conn = Connection(sock, peer, handlers.dispatch if handlers else None, max_frame, heartbeat_s)
            return cls(conn.start())
        if refused is not None:
            raise refused
        where = ", ".join(f"{a}:{p}" for a, p in candidates)
        raise MeshError(f"cannot reach {device.name} at {where}: {last}")

    def request(self, type: str, fields: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None,
                data: bytes | None = None, timeout: float = 30.0) -> Reply:
        return self.conn.request(type, fields, tensors, data, timeout)

    def hello(self) -> dict[str, Any]:
        return self.request("mesh.hello").fields

    def send_file(self, path: Path, name: str | None = None, progress=None) -> str:
        """Send a file in chunks (resumes a partial copy on the peer); returns its path there."""
        return send_file(self.conn, Path(path), name, progress=progress)

    def measure_link(self, pings: int = 5, payload_bytes: int = 4 << 20) -> LinkMeasurement:
        """Round trip and bandwidth to the peer, over this very connection."""
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            self.request("mesh.echo", {})
            rtts.append(time.perf_counter() - start)
        rtt = statistics.median(rtts)
        start = time.perf_counter()
        self.request("mesh.sink", {}, data=bytes(payload_bytes), timeout=120)
        elapsed = max(time.perf_counter() - start - rtt, 1e-6)
        return LinkMeasurement(rtt_ms=round(rtt * 1000, 3), bandwidth_mbps=round(payload_bytes * 8 / elapsed / 1e6, 1))

    def profile(self, measure_link: bool = True) -> PeerProfile:
        device = DeviceProfile.from_fields(self.request("mesh.profile", timeout=60).fields)
        link = self.measure_link() if measure_link else None
        return PeerProfile(self.peer.device_id, self.peer.name, device, link)

    def close(self) -> None:
        self.conn.close("closed by us")

    def __enter__(self) -> "PeerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
