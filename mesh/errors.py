"""The mesh's errors. Each is a HearthError, so the command line prints it as one line."""

from __future__ import annotations

from core.errors import HearthError


class MeshError(HearthError):
    """Something went wrong between devices."""


class FrameError(MeshError):
    """A frame was malformed, truncated or over the size limit; its connection is closed."""


class PeerRefused(MeshError):
    """The TLS handshake failed or the peer's certificate is not the pinned one."""


class ConnectionClosed(MeshError):
    """The connection ended (closed, reset, or the peer stopped sending heartbeats)."""


class RequestTimeout(MeshError):
    """No response arrived in time."""


class RemoteError(MeshError):
    """The peer answered a request with an error message."""


class PairingError(MeshError):
    """A pairing attempt failed: rejected, expired, refused, or the commitment did not match."""
