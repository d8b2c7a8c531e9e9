"""The jobs a device has open for coordinators (pooled and federated job parts alike).

Each job is kept under its id with the device that opened it; only that device may use it. A
coordinator that crashed leaves its job behind, so a device holds at most `limit` jobs and a new
one pushes out the oldest.
"""

from __future__ import annotations

import threading
from typing import Any


class OpenJobs:
    def __init__(self, limit: int, kind: str = "job"):
        self.limit, self.kind = limit, kind        # `kind` names the jobs in errors
        self._jobs: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, owner: str, job_id: str) -> Any:
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None or entry[0] != owner:
            raise ValueError(f"no open {self.kind} {job_id[:40]!r} for this device")
        return entry[1]

    def make_room(self, job_id: str) -> None:
        """Drop the oldest jobs if `job_id` would be one too many (call before building a big job,
        so that the old one's memory is free first)."""
        with self._lock:
            while job_id not in self._jobs and len(self._jobs) >= self.limit:
                self._jobs.pop(next(iter(self._jobs)))

    def put(self, owner: str, job_id: str, job: Any) -> None:
        self.make_room(job_id)
        with self._lock:
            self._jobs[job_id] = (owner, job)

    def close(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
