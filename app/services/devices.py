"""The devices the app shows, and pairing, over mesh's MeshService.

`DevicesService` adapts `mesh.service.MeshService` to what the Devices screen needs: one row per
device with its kind, memory, cores and state (this device first), pairing in both directions,
unpairing. Memory and cores of another device come from its profile (`mesh.profile`), which only
a paired device answers; they are fetched once per device and remembered. Every method blocks
(network): the app calls them from worker threads. No UI code here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeviceRow:
    id: str
    name: str
    kind: str
    memory_gb: float | None
    cores: int | None
    state: str                 # this device, idle, seen, gone, offline, training
    paired: bool
    this_device: bool = False
    address: str = ""


@dataclass
class PairingRequest:
    """Someone asks to pair with this device: show `code` and `grant`, then accept or reject."""

    peer_name: str
    peer_kind: str
    address: str
    code: str
    grant: str
    expires_at: float = 0.0    # epoch seconds; the request is refused unanswered after that
    _incoming: Any = field(default=None, repr=False)   # mesh.pairing.IncomingPairing

    @property
    def decided(self) -> bool:
        """Answered already: here, or by expiry, or withdrawn by the other device."""
        return self._incoming.decided

    def accept(self) -> None:
        self._incoming.accept()

    def reject(self) -> None:
        self._incoming.reject()


@dataclass
class OutgoingPair:
    """A pairing this device started: `code` to compare, then confirm() or cancel()."""

    peer_name: str
    code: str
    grant: str
    _pairing: Any = field(default=None, repr=False)    # mesh.pairing.OutgoingPairing

    def confirm(self, timeout: float = 75.0) -> tuple[bool, str]:
        """Accept here and wait for the other side: (paired, what happened)."""
        self._pairing.accept()
        result = self._pairing.wait(timeout)
        return result.paired, result.message

    def cancel(self) -> None:
        self._pairing.reject()


class DevicesService:
    def __init__(self, mesh: Any = None, mesh_factory: Callable[..., Any] | None = None,
                 this_device: DeviceRow | None = None):
        """`mesh`: a started MeshService, or None to start one on `start()` (with `mesh_factory`,
        default `MeshService(serve=True)`). `this_device` pins the first row (snapshot tests do,
        so that the picture does not depend on the machine); by default it is measured."""
        self._mesh = mesh
        self._this = this_device
        self._factory = mesh_factory
        self._profiles: dict[str, tuple[float | None, int | None]] = {}
        self._listeners: list[Callable[[PairingRequest], None]] = []
        self._changes: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.error = ""
        self.private: Any = _no_private_data()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening and browsing (seconds: mDNS). Errors are kept in `error`, not raised:
        the app still works on this device alone."""
        if self._mesh is not None:
            self._hook(self._mesh)
            return
        try:
            if self._factory is not None:
                mesh = self._factory(on_pairing_request=self._incoming, on_device_change=self._changed)
            else:
                from mesh.service import MeshService

                mesh = MeshService(serve=True, on_pairing_request=self._incoming,
                                   on_device_change=self._changed)
            mesh.start()
        except Exception as exc:  # noqa: BLE001 - no network is a state, not a crash
            self.error = f"the mesh did not start: {exc}"
            return
        self._serve_jobs(mesh)
        with self._lock:
            if self._stopped:  # the app quit while the mesh was starting
                mesh.stop()
                return
            self._mesh = mesh

    def _serve_jobs(self, mesh: Any) -> None:
        """Take part in the jobs paired devices start, as `hearth worker` does: pooled parts, and
        federated parts that train on this device's private data (config mesh.private_data),
        which stays here. A bad data file is reported in `error`; the rest still works."""
        agent = getattr(mesh, "agent", None)
        if agent is None:
            return
        from core.config import load_config
        from mesh.job_parts import register_job_parts
        from training.part_fields import LocalData, local_data

        try:
            self.private = local_data(load_config().get("mesh.private_data"))
        except Exception as exc:  # noqa: BLE001 - a HearthError names the file and line
            self.private = LocalData()
            self.error = f"private data not used: {exc}"
        register_job_parts(agent, None, self.private)

    def offer_private_data(self, path: str) -> None:
        """Offer `path` (a notes folder or a JSONL of chats) to federated jobs from now on, as
        `hearth worker --data` does: checked first (a bad line is named, and nothing changes),
        then kept in the config's mesh.private_data. Reads the files: call it from a worker."""
        from core.config import load_config, set_value
        from training.data import source_path
        from training.part_fields import local_data

        offered = load_config().get("mesh.private_data")
        new = str(source_path(path))
        paths = offered if new in offered else [*offered, new]   # offered again: kept once
        found = local_data(paths)          # every source, the new one with the others
        set_value("mesh.private_data", paths)
        self._now_offered(found)

    def withdraw_private_data(self) -> None:
        """Offer no data to federated jobs any more (the files themselves are untouched)."""
        from core.config import set_value
        from training.part_fields import LocalData

        set_value("mesh.private_data", [])
        self._now_offered(LocalData())

    def _now_offered(self, found: Any) -> None:
        # In place: the federated parts registered at start hold this object, and a job opened
        # from now on reads what it holds now.
        self.private.paths[:] = found.paths
        self.private.conversations = found.conversations

    def private_data_statement(self) -> str:
        """What this device offers federated jobs, in words (a count, never the text)."""
        if not self.private.paths:
            return ("No private data on this device. Offer a notes folder or a JSONL of chats below for "
                    "federated jobs to train on here, without sending it anywhere.")
        names = ", ".join(p.name for p in self.private.paths)
        return (f"Private data on this device: {self.private.conversations} conversations ({names}). "
                "Federated jobs train on it here; it is never sent to another device.")

    def _hook(self, mesh: Any) -> None:
        mesh.on_pairing_request = self._incoming
        mesh.on_device_change = self._changed

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            mesh = self._mesh
        if mesh is not None:
            mesh.stop()

    @property
    def started(self) -> bool:
        return self._mesh is not None

    @property
    def port(self) -> int:
        """The port this device answers on (0 until started)."""
        agent = getattr(self._mesh, "agent", None)
        return int(agent.port) if agent is not None else 0

    def on_pairing_request(self, listener: Callable[[PairingRequest], None]) -> None:
        self._listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._changes.append(listener)

    # --- the list --------------------------------------------------------------------------

    def devices(self, fetch_profiles: bool = True) -> list[DeviceRow]:
        rows = [self.this_device()]
        if self._mesh is None:
            return rows
        for device in self._mesh.devices():
            if device.state == "gone" and not device.paired:
                continue     # a guest heard once would stay for ever; nothing to do with it
            memory, cores = self._profiles.get(device.id, (None, None))
            if fetch_profiles and device.paired and memory is None and device.state not in ("gone", "offline"):
                memory, cores = self._fetch_profile(device.id)
            state = "idle" if device.paired and device.state in ("seen", "updated", "manual") else device.state
            rows.append(DeviceRow(
                device.id, device.name, device.kind, memory, cores, state, device.paired,
                address=f"{device.addresses[0]}:{device.port}" if device.addresses else "",
            ))
        return rows

    def paired_count(self) -> int:
        if self._mesh is None:
            from mesh.trust import TrustStore

            return len(TrustStore().all())
        return sum(1 for d in self._mesh.devices() if d.paired)

    def this_device(self) -> DeviceRow:
        if self._this is not None:
            return self._this
        name = self._mesh.config.name if self._mesh is not None else os.uname().nodename
        kind = self._mesh.config.kind if self._mesh is not None else "laptop"
        device_id = self._mesh.device_id if self._mesh is not None else ""
        return DeviceRow(device_id, name, kind, _memory_gb(), os.cpu_count(), "this device", True, True)

    def _fetch_profile(self, device_id: str) -> tuple[float | None, int | None]:
        try:
            with self._mesh.connect(device_id, timeout=3) as peer:
                profile = peer.profile(measure_link=False).device
            found = (round(profile.memory_total_mb / 1024, 1), profile.cores)
        except Exception:  # noqa: BLE001 - an unreachable device just shows no figures
            return (None, None)
        self._profiles[device_id] = found
        return found

    def add_address(self, address: str) -> DeviceRow:
        """Add a device by "host:port" (for networks where multicast does not reach it)."""
        from core.errors import HearthError

        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise HearthError(f"address {address!r}: write it as host:port, e.g. 192.168.1.20:7000")
        if self._mesh is None:
            raise HearthError(self.error or "the mesh is not running yet")
        device = self._mesh.add_address(host, int(port))
        return DeviceRow(device.id, device.name, device.kind, None, None, device.state, device.paired,
                         address=f"{host}:{port}")

    # --- training with other devices ------------------------------------------------------

    def paired_names(self) -> list[str]:
        """Names of the paired devices (the Train screen offers them)."""
        if self._mesh is None:
            return []
        return [d.name for d in self._mesh.devices() if d.paired]

    def job_peers(self, names: list[str], wait_s: float = 5.0) -> list[tuple[str, Any]]:
        """Connections to these paired devices for a pooled job (each must answer)."""
        from core.errors import HearthError
        from mesh.job_parts import connect_job_peers

        if self._mesh is None:
            raise HearthError(self.error or "the mesh is not running: other devices cannot train")
        # By id: a device heard on the network may share a paired device's name.
        paired = {d.name: d.id for d in self._mesh.devices() if d.paired}
        missing = [name for name in names if name not in paired]
        if missing:
            raise HearthError(f"devices: {', '.join(missing)} not paired with this device")
        return connect_job_peers(self._mesh, ",".join(paired[name] for name in names), wait_s)

    def reconnect(self, name: str) -> Any:
        from mesh.job_parts import reconnect

        return reconnect(self._mesh, name) if self._mesh is not None else None

    # --- pairing ---------------------------------------------------------------------------

    def pair(self, ref: str, timeout: float = 20.0) -> OutgoingPair:
        """Start pairing with `ref` (a name, an id prefix or host:port) and wait for the code."""
        from mesh.pairing import grant_text

        pairing = self._mesh.pair(ref)
        if not pairing.code_ready.wait(timeout):
            pairing.reject()
            from core.errors import HearthError

            raise HearthError(f"{ref} did not answer the pairing request within {timeout:.0f} s")
        peer_name = pairing.peer_name or ref
        return OutgoingPair(peer_name, pairing.code or "", grant_text(peer_name), pairing)

    def unpair(self, ref: str) -> str:
        device = self._mesh.unpair(ref)
        self._profiles.pop(device.id, None)
        return device.name

    def _incoming(self, incoming: Any) -> None:
        request = PairingRequest(incoming.peer_name, incoming.peer_kind, incoming.address, incoming.code,
                                 incoming.grant, incoming.expires_at, incoming)
        if not self._listeners:
            incoming.reject()
        for listener in list(self._listeners):
            listener(request)

    def _changed(self, event: str, device: Any) -> None:
        for listener in list(self._changes):
            listener()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _no_private_data() -> Any:
    from training.part_fields import LocalData

    return LocalData()
