"""The handler registry: the agent's extension point for request types.

    registry.register("job.forward", fn, fields={"step": int, "layer": str})

`fn(request)` receives a validated `Request` and returns a `Reply` (or a dict of fields, or
None). The declared fields are checked (present, right type) before `fn` runs; a handler that
raises MeshError or ValueError answers the peer with that message; any other exception answers
"internal error" and is logged. Handlers run on a small thread pool, never on the reader thread,
so a slow handler does not stop heartbeats. A bad request never closes the connection; a bad
frame does (transport.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mesh.errors import MeshError
from mesh.frames import Frame
from mesh.transport import Connection, PeerInfo, Reply

log = logging.getLogger("hearth.mesh")


@dataclass
class Request:
    """An authenticated request: who sent it (proved by TLS) and what it carries."""

    type: str
    fields: dict[str, Any]
    peer: PeerInfo
    tensors: dict[str, Any] | None = None
    data: bytes | None = None
    connection: Connection | None = None


Handler = Callable[[Request], "Reply | dict[str, Any] | None"]


@dataclass
class _Entry:
    fn: Handler
    fields: dict[str, type | tuple[type, ...]]


class HandlerRegistry:
    def __init__(self, workers: int = 8, authorize: Callable[[PeerInfo], bool] | None = None):
        self._handlers: dict[str, _Entry] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mesh-handler")
        # Checked before each request: a device unpaired a moment ago is refused at once.
        self._authorize = authorize

    def register(self, type: str, fn: Handler, fields: dict[str, type | tuple[type, ...]] | None = None) -> None:
        if type in self._handlers:
            raise ValueError(f"a handler for {type!r} is already registered")
        self._handlers[type] = _Entry(fn, dict(fields or {}))

    def types(self) -> list[str]:
        return sorted(self._handlers)

    def dispatch(self, conn: Connection, frame: Frame) -> None:
        """Called on the reader thread: hand the request to the pool."""
        self._pool.submit(self._run, conn, frame)

    def _run(self, conn: Connection, frame: Frame) -> None:
        try:
            reply = self._answer(conn, frame)
        except Exception as exc:  # never let a handler take the connection or agent down
            log.exception("handler for %s failed", frame.type)
            reply = exc
        try:
            if isinstance(reply, Exception):
                message = str(reply) if isinstance(reply, (MeshError, ValueError)) else "internal error"
                conn.reply_error(frame, message)
            else:
                conn.reply(frame, reply)
        except MeshError:
            pass  # the connection went away; nothing to answer

    def _answer(self, conn: Connection, frame: Frame) -> Reply | Exception:
        if self._authorize is not None and not self._authorize(conn.peer):
            conn.close("peer is no longer paired")
            return MeshError("not paired")
        entry = self._handlers.get(frame.type)
        if entry is None:
            return MeshError(f"unknown request type {frame.type!r}")
        for name, kind in entry.fields.items():
            value = frame.fields.get(name)
            if value is None or not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
                return MeshError(f"{frame.type}: field {name!r} is missing or has the wrong type")
        request = Request(frame.type, frame.fields, conn.peer, frame.tensors, frame.data, conn)
        result = entry.fn(request)
        if result is None:
            return Reply({})
        if isinstance(result, dict):
            return Reply(result)
        if not isinstance(result, Reply):
            raise TypeError(f"handler for {frame.type} returned {type(result).__name__}")
        return result

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
