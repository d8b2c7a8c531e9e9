"""The trust store: the certificates of paired devices, one JSON file each.

Pairing adds an entry; unpairing deletes it. The TLS layer loads these certificates as the only
trust anchors, and every request re-checks that its peer is still here, so an unpaired device is
refused at once, by every process that shares this HEARTH_HOME (the worker and the CLI read the
same files). TXT records and names are never trusted: only the certificate is.
"""

from __future__ import annotations

import datetime
import json
import re
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.atomic import atomic_write_text
from core.errors import HearthError
from core.paths import hearth_paths
from mesh.identity import device_id_of

_ID_RE = re.compile(r"^[A-Z2-7]{52}$")


@dataclass
class TrustedDevice:
    """A paired device: its certificate (DER) and what we last knew of where it lives."""

    device_id: str
    name: str
    kind: str
    cert_der: bytes
    paired_at: str
    addresses: list[str] = field(default_factory=list)
    port: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["cert_pem"] = ssl.DER_cert_to_PEM_cert(data.pop("cert_der"))
        return data


class TrustStore:
    """Paired devices under `directory` (default: hearth_paths().trust_dir)."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory or hearth_paths().trust_dir)

    def _path(self, device_id: str) -> Path:
        if not _ID_RE.match(device_id):
            raise HearthError(f"not a device id: {device_id!r}")
        return self.directory / f"{device_id}.json"

    def add(self, cert_der: bytes, name: str, kind: str, addresses: list[str] | None = None, port: int = 0) -> TrustedDevice:
        device = TrustedDevice(
            device_id=device_id_of(cert_der),
            name=name,
            kind=kind,
            cert_der=cert_der,
            paired_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            addresses=list(addresses or []),
            port=port,
        )
        self._write(device)
        return device

    def _write(self, device: TrustedDevice) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(device.device_id), json.dumps(device.to_json(), indent=2) + "\n", mode=0o600)

    def update_location(self, device_id: str, addresses: list[str], port: int) -> None:
        """Remember where a paired device was last seen (for the add-by-address fallback)."""
        device = self.get(device_id)
        if device and (device.addresses != addresses or device.port != port):
            device.addresses, device.port = list(addresses), port
            self._write(device)

    def remove(self, device_id: str) -> bool:
        path = self._path(device_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def get(self, device_id: str) -> TrustedDevice | None:
        path = self._path(device_id)
        try:
            return self._read(path)
        except FileNotFoundError:
            return None

    def is_trusted(self, cert_der: bytes) -> bool:
        """True when exactly this certificate is paired (a stat and one read: cheap per request)."""
        device = self.get(device_id_of(cert_der))
        return device is not None and device.cert_der == cert_der

    def all(self) -> list[TrustedDevice]:
        if not self.directory.is_dir():
            return []
        return sorted((self._read(p) for p in self.directory.glob("*.json")), key=lambda d: d.name)

    def _read(self, path: Path) -> TrustedDevice:
        try:
            data = json.loads(path.read_text("utf-8"))
            cert_der = ssl.PEM_cert_to_DER_cert(data["cert_pem"])
            device = TrustedDevice(
                device_id=data["device_id"], name=str(data["name"]), kind=str(data["kind"]),
                cert_der=cert_der, paired_at=str(data["paired_at"]),
                addresses=[str(a) for a in data.get("addresses", [])], port=int(data.get("port", 0)),
            )
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise HearthError(f"{path}: damaged trust store entry ({exc})") from None
        if device_id_of(cert_der) != device.device_id or path.stem != device.device_id:
            raise HearthError(f"{path}: certificate does not match the device id")
        return device

    def cadata(self) -> str:
        """Every paired certificate as PEM: the only trust anchors of the mesh's TLS server."""
        return "".join(ssl.DER_cert_to_PEM_cert(d.cert_der) for d in self.all())
