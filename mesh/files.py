"""Large files between paired devices: chunks, a SHA-256 check, and resume.

The sender offers (name, size, sha256); the receiver answers how many bytes of that file it
already holds (a partial file survives a dropped connection), the sender streams the rest as
`file.chunk` requests with raw-byte payloads, and `file.done` makes the receiver check the
SHA-256 of the whole file before moving it into place (atomically). A worker that lacks a job's
base model receives it this way; where the file lands is `received_path(sha256, name)`.
This module does not decide which files to send.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from core.digest import file_sha256
from mesh.errors import MeshError
from mesh.handlers import HandlerRegistry, Request
from mesh.transport import Connection

CHUNK_BYTES = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_FILE = 1 << 40


def received_dir() -> Path:
    from core.paths import hearth_paths

    return hearth_paths().cache_dir / "received"


def received_path(sha256: str, name: str, root: Path | None = None) -> Path:
    return (root or received_dir()) / sha256 / name


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 200 or name in (".", "..") or "/" in name \
            or "\\" in name or "\x00" in name or name.startswith("."):
        raise MeshError(f"bad file name {name!r}")
    return name


def _check_sha(value: object) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise MeshError("sha256 must be 64 lower-case hex digits")
    return value


class FileReceiver:
    """The receiving side: registers file.offer, file.chunk and file.done on a registry."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or received_dir())
        self._lock = threading.Lock()
        self._offers: dict[str, tuple[str, int]] = {}  # sha256 -> (name, size)

    def register(self, registry: HandlerRegistry) -> None:
        registry.register("file.offer", self.offer, {"name": str, "size": int, "sha256": str})
        registry.register("file.chunk", self.chunk, {"sha256": str, "offset": int})
        registry.register("file.done", self.done, {"sha256": str})

    def _part(self, sha: str) -> Path:
        return self.root / ".partial" / f"{sha}.part"

    def offer(self, request: Request) -> dict:
        name, sha, size = _check_name(request.fields["name"]), _check_sha(request.fields["sha256"]), request.fields["size"]
        if not 0 <= size <= _MAX_FILE:
            raise MeshError("file size out of range")
        final = received_path(sha, name, self.root)
        if final.exists() and final.stat().st_size == size:
            return {"offset": size, "complete": True, "path": str(final)}
        part = self._part(sha)
        part.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._offers[sha] = (name, size)
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        return {"offset": have, "complete": False}

    def chunk(self, request: Request) -> dict:
        sha, offset = _check_sha(request.fields["sha256"]), request.fields["offset"]
        with self._lock:
            offer = self._offers.get(sha)
        if offer is None:
            raise MeshError("file.chunk before file.offer")
        data = request.data or b""
        part = self._part(sha)
        have = part.stat().st_size if part.exists() else 0
        if offset > have or offset + len(data) > offer[1]:
            raise MeshError(f"chunk at {offset} does not fit (have {have} of {offer[1]})")
        with open(part, "r+b" if part.exists() else "wb") as f:
            f.truncate(offset)
            f.seek(offset)
            f.write(data)
        return {"have": offset + len(data)}

    def done(self, request: Request) -> dict:
        sha = _check_sha(request.fields["sha256"])
        with self._lock:
            offer = self._offers.pop(sha, None)
        if offer is None:
            raise MeshError("file.done before file.offer")
        part = self._part(sha)
        if not part.exists() or part.stat().st_size != offer[1] or file_sha256(part) != sha:
            part.unlink(missing_ok=True)
            raise MeshError("file checksum mismatch; the partial file was dropped, send it again")
        final = received_path(sha, offer[0], self.root)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        return {"path": str(final)}


def send_file(conn: Connection, path: Path, name: str | None = None, chunk_bytes: int = CHUNK_BYTES,
              progress: Callable[[int, int], None] | None = None, timeout: float = 60.0) -> str:
    """Send `path` to the peer (resuming a partial copy); returns the path on the peer."""
    path = Path(path)
    name = _check_name(name or path.name)
    size, sha = path.stat().st_size, file_sha256(path)
    offer = conn.request("file.offer", {"name": name, "size": size, "sha256": sha}, timeout=timeout).fields
    if offer.get("complete"):
        return str(offer.get("path", ""))
    offset = offer.get("offset", 0)
    if not isinstance(offset, int) or not 0 <= offset <= size:
        raise MeshError("peer answered a bad resume offset")
    with open(path, "rb") as f:
        f.seek(offset)
        while offset < size:
            data = f.read(chunk_bytes)
            conn.request("file.chunk", {"sha256": sha, "offset": offset}, data=data, timeout=timeout)
            offset += len(data)
            if progress is not None:
                progress(offset, size)
    return str(conn.request("file.done", {"sha256": sha}, timeout=timeout).fields.get("path", ""))
