"""This install's identity: an Ed25519 key, a self-signed certificate and the device id.

The device id is the base32 form of the SHA-256 of the certificate (DER), as Syncthing does: it
names the certificate, so whoever shows the id must hold the key. The key file is written 0600.
This module does not trust anyone; the trust store (trust.py) decides who is paired.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write_bytes
from core.errors import HearthError
from core.paths import hearth_paths

KEY_FILE = "device.key"
CERT_FILE = "device.crt"


def fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of a certificate's DER bytes: what pairing codes and pinning compare."""
    return hashlib.sha256(cert_der).digest()


def device_id_of(cert_der: bytes) -> str:
    """The device id: base32 (no padding, upper case) of the certificate's SHA-256, 52 letters."""
    return base64.b32encode(fingerprint(cert_der)).decode("ascii").rstrip("=")


def short_id(device_id: str) -> str:
    """The form shown to people: the first 7 letters, as Syncthing shows."""
    return device_id[:7]


@dataclass(frozen=True)
class Identity:
    """This device's key and certificate, with the paths the TLS layer loads them from."""

    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def device_id(self) -> str:
        return device_id_of(self.cert_der)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_der)

    @property
    def cert_pem(self) -> str:
        return der_to_pem(self.cert_der)


def der_to_pem(cert_der: bytes) -> str:
    import ssl

    return ssl.DER_cert_to_PEM_cert(cert_der)


def make_certificate(common_name: str | None = None) -> tuple[bytes, bytes]:
    """A new Ed25519 key and a self-signed certificate: (key PEM, cert DER).

    The certificate is its own CA (basicConstraints CA:TRUE), so a peer can load it as the only
    trust anchor of a TLS context. The subject is random unless given; nothing about the owner
    leaks into it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    cn = common_name or "hearth-" + base64.b32encode(os.urandom(10)).decode("ascii").lower()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.DER)


def load_or_create_identity(directory: Path | None = None) -> Identity:
    """This install's identity, made on first use (key 0600, certificate beside it)."""
    directory = Path(directory or hearth_paths().identity_dir)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not key_path.exists() or not cert_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key_pem, cert_der = make_certificate()
        atomic_write_bytes(key_path, key_pem, mode=0o600)
        atomic_write_bytes(cert_path, der_to_pem(cert_der).encode("ascii"))
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise HearthError(f"{key_path}: private key is readable by others (mode {mode:o}); run chmod 600 on it")
    return Identity(key_path, cert_path, _read_cert_der(cert_path))


def _read_cert_der(path: Path) -> bytes:
    import ssl

    try:
        return ssl.PEM_cert_to_DER_cert(path.read_text("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise HearthError(f"{path}: not a PEM certificate") from None


def default_device_name() -> str:
    return socket.gethostname() or "hearth-device"
