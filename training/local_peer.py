"""The coordinator's own device as a job member: its requests go straight to the job parts.

Pooled (training/pooled.py) and federated (training/federated.py) coordinators treat every
member alike through `request()` / `send_file()`; for this device those calls are answered by
the same parts a remote worker runs (`jobs.handle`), with no socket in between.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LocalReply:
    def __init__(self, fields: dict, tensors: dict | None):
        self.fields, self.tensors = fields, tensors


class LocalPeer:
    """This device's own share, through the same job parts a remote worker runs. `jobs` is
    anything with `handle(owner, type, fields, tensors) -> (fields, tensors)`."""

    def __init__(self, jobs: Any):
        self.jobs = jobs

    def request(self, type: str, fields: dict | None = None, tensors: dict | None = None,
                data: bytes | None = None, timeout: float = 30.0) -> LocalReply:
        return LocalReply(*self.jobs.handle("local", type, dict(fields or {}), tensors))

    def send_file(self, path: Path, name: str | None = None) -> str:
        return str(path)   # the file is here already


class MemberLost(Exception):
    """A job member's request failed: the coordinator drops it and carries on without it."""

    def __init__(self, member: Any, reason: str):
        super().__init__(reason)
        self.member, self.reason = member, reason
