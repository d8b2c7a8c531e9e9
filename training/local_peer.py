"""The coordinator's own device as a job member: its requests go straight to the job parts.

Pooled (training/pooled.py) and federated (training/federated.py) coordinators treat every
member alike through `request()` / `send_file()`; for this device those calls are answered by
the same parts a remote worker runs (`jobs.handle`), with no socket in between. Also what both
coordinators share about members: `MemberLost` and `close_job_on`.
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


def close_job_on(members: Any, close_type: str, job_id: str) -> None:
    """Ask every member not known to be gone to forget the job; a member that does not answer
    forgets it when it restarts anyway. `members` have `state` and `peer`."""
    for member in members:
        if member.state != "gone":
            try:
                member.peer.request(close_type, {"job": job_id}, None, None, 10)
            except Exception:
                pass
