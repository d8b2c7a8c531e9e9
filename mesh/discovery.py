"""Discovery: advertise `_hearth._tcp.local.` and keep a live list of the devices heard.

The TXT record (MESH.md) holds `v`, `id`, `name`, `kind` and `pair`. It is public and
unauthenticated: a hint for the list, never trusted for anything (TLS pinning is what counts).

Each entry is `seen` when first resolved, `updated` when its record changes, and `gone` when it
says goodbye or stops answering. A device killed without a goodbye would stay in mDNS caches for
a long time (zeroconf keeps PTR records at least 1125 s), so the list also probes each device's
port with a plain TCP connect every `probe_s` seconds: two failures in a row mark it gone, which
bounds the report at about `2 * probe_s + connect timeout` (GONE_WITHIN_S). The probe sends no
byte; the agent drops such connections before TLS.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

log = logging.getLogger("hearth.mesh")

SERVICE_TYPE = "_hearth._tcp.local."
PROTOCOL_VERSION = "1"
PROBE_S = 2.0
PROBE_TIMEOUT_S = 2.0
GONE_WITHIN_S = 2 * PROBE_S + 2 * PROBE_TIMEOUT_S + 2  # what the docs and the test promise


@dataclass
class SeenDevice:
    """A device heard on the network (from its public TXT record: a hint, not a proof)."""

    device_id: str
    name: str
    kind: str
    addresses: list[str]
    port: int
    accepts_pairing: bool
    version: str
    instance: str
    state: str = "seen"             # seen, updated, gone
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    source: str = "mdns"            # mdns, or address (added by hand)


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses, loopback excluded."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found


class Discovery:
    """Browse (and optionally advertise) Hearth devices; `on_change(event, device)` on changes.

    `interfaces`: IPv4 addresses to bind mDNS to (empty: all).
    """

    def __init__(self, interfaces: list[str] | None = None, own_id: str = "",
                 on_change: Callable[[str, SeenDevice], None] | None = None, probe_s: float = PROBE_S):
        self.interfaces = list(interfaces or [])
        self.own_id = own_id
        self.on_change = on_change
        self.probe_s = probe_s
        # By mDNS instance name, not by the id the TXT claims: an impostor claiming a paired
        # device's id must not overwrite where the real one lives.
        self._devices: dict[str, SeenDevice] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._zc = None
        self._browser = None
        self._info = None

    def start(self) -> "Discovery":
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, Zeroconf

        interfaces = self.interfaces or InterfaceChoice.All
        self._zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_service])
        threading.Thread(target=self._probe_loop, name="mesh-probe", daemon=True).start()
        return self

    def advertise(self, device_id: str, name: str, kind: str, port: int, accepts_pairing: bool,
                  instance: str | None = None) -> None:
        """Publish this device's record (goodbye is sent by close()); instance defaults to the name."""
        from zeroconf import ServiceInfo

        addresses = self.interfaces or local_addresses()
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{_instance_label(instance or name)}.{SERVICE_TYPE}",
            port=port,
            properties=_txt(device_id, name, kind, accepts_pairing),
            server=f"hearth-{os.urandom(6).hex()}.local.",
            parsed_addresses=addresses,
        )
        self._zc.register_service(info, allow_name_change=True)
        self._info = info

    def set_accepts_pairing(self, device_id: str, name: str, kind: str, accepts: bool) -> None:
        if self._info is not None:
            self._info.properties = _txt(device_id, name, kind, accepts)  # type: ignore[misc]
            self._zc.update_service(self._info)

    def close(self) -> None:
        self._stop.set()
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._info is not None:
            try:
                zc.unregister_service(self._info)  # the goodbye packet: others mark us gone at once
            except Exception:
                log.debug("unregister failed", exc_info=True)
        if self._browser is not None:
            self._browser.cancel()
        zc.close()

    # the list

    def devices(self, include_gone: bool = True) -> list[SeenDevice]:
        with self._lock:
            found = [replace(d, addresses=list(d.addresses)) for d in self._devices.values()]
        return sorted((d for d in found if include_gone or d.state != "gone"), key=lambda d: (d.name, d.instance))

    def add_manual(self, device: SeenDevice) -> None:
        """The add-by-address fallback: a device found by dialling it, not by mDNS."""
        self._upsert(device)

    def _upsert(self, device: SeenDevice) -> None:
        if device.device_id == self.own_id:
            return
        with self._lock:
            old = self._devices.get(device.instance)
            if old is None:
                event = "seen"
            else:
                device.first_seen = old.first_seen
                same = (old.name, old.kind, old.addresses, old.port, old.accepts_pairing) == (
                    device.name, device.kind, device.addresses, device.port, device.accepts_pairing)
                event = "seen" if old.state == "gone" else ("updated" if not same else "")
            if event:
                device.state = event
            else:
                device.state = old.state  # type: ignore[union-attr]
            self._devices[device.instance] = device
            self._failures.pop(device.instance, None)
        if event:
            self._emit(event, device)

    def _mark_gone(self, instance: str) -> None:
        with self._lock:
            device = self._devices.get(instance)
            if device is None or device.state == "gone":
                return
            device.state = "gone"
            device.last_seen = time.time()
        log.debug("device %s is gone", device.name)   # as "seen": any device on the network, paired or not
        self._emit("gone", device)

    def _emit(self, event: str, device: SeenDevice) -> None:
        if self.on_change is not None:
            try:
                self.on_change(event, replace(device))
            except Exception:
                log.exception("discovery callback failed")

    # zeroconf callbacks (on the browser's thread)

    def _on_service(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            self._mark_gone(name)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None:
            return
        device = _from_info(info, name)
        if device is not None:
            self._upsert(device)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_s):
            for device in self.devices(include_gone=False):
                if self._stop.is_set():
                    return
                if _reachable(device.addresses, device.port):
                    with self._lock:
                        self._failures.pop(device.instance, None)
                        if device.instance in self._devices:
                            self._devices[device.instance].last_seen = time.time()
                    continue
                with self._lock:
                    count = self._failures.get(device.instance, 0) + 1
                    self._failures[device.instance] = count
                if count >= 2:
                    self._mark_gone(device.instance)


def _reachable(addresses: list[str], port: int) -> bool:
    for address in addresses:
        try:
            with socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            continue
    return False


def _txt(device_id: str, name: str, kind: str, accepts: bool) -> dict[str, str]:
    return {"v": PROTOCOL_VERSION, "id": device_id, "name": name, "kind": kind, "pair": "1" if accepts else "0"}


def _instance_label(name: str) -> str:
    label = "".join(ch for ch in name if ch.isprintable() and ch != ".").strip() or "hearth"
    return label.encode("utf-8")[:60].decode("utf-8", "ignore")


def _from_info(info, instance: str) -> SeenDevice | None:
    """A SeenDevice from a resolved record, or None when the TXT is not a Hearth record."""
    props = {}
    for key, value in (info.properties or {}).items():
        try:
            props[key.decode("utf-8")] = (value or b"").decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            return None
    device_id = props.get("id", "")
    if len(device_id) != 52 or not device_id.isalnum() or not info.port:
        return None
    kind = props.get("kind", "laptop")
    return SeenDevice(
        device_id=device_id,
        name=props.get("name", "")[:64] or instance.split(".")[0],
        kind=kind if kind in ("laptop", "desktop", "phone") else "laptop",
        addresses=list(info.parsed_addresses()),
        port=int(info.port),
        accepts_pairing=props.get("pair") == "1",
        version=props.get("v", ""),
        instance=instance,
    )
