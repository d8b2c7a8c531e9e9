"""One process at a time for a thing on this device, with a refusal that says who has it.

`exclusive(path, holder, what, advice)` holds an advisory lock (flock) on `path` for the `with`
block and writes "<pid> <holder>" into it, so a second process is refused with one line:
"<what> is already in use by <holder> (pid N): <advice>". The kernel drops the lock when its
process dies, however it dies (SIGKILL, a closed terminal), so a stale lock file never blocks
anyone: there is nothing to clean up. Two holders in one process conflict too (each `exclusive`
opens its own file description).

The two locks Hearth takes: `device_lock` (the app and `hearth worker`) and `job_lock` (every
training run, whichever front end started it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from core.errors import HearthError
from core.paths import hearth_paths

log = logging.getLogger("hearth")
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def exclusive(path: Path, holder: str, what: str, advice: str) -> Iterator[None]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:   # a read-only or foreign-owned data folder
        raise HearthError(f"{path}: cannot be opened ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HearthError(f"{what} is already in use by {_holder(fd)}: {advice}") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            # A file system without locks (some network mounts): run unguarded rather than not at all.
            log.warning("%s: this file system cannot lock files; a second Hearth here would not be refused", path)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}\n".encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)   # releases the lock; the file stays (removing it would race a new holder)


def _holder(fd: int) -> str:
    """Who holds the lock, as the lock file says ('hearth worker (pid 123)'); 'another process'
    while its holder has not written it yet."""
    try:
        pid, _, holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return "another process"
    return f"{holder} (pid {pid})" if pid.isdigit() and holder else "another process"


def device_lock(holder: str) -> contextlib.AbstractContextManager[None]:
    """This device on the mesh: one identity, so one process serves it (the app or a worker);
    two would advertise the same device twice and keep two trust stores and job lists apart."""
    paths = hearth_paths()
    return exclusive(paths.device_lock, holder, f"Hearth on this device ({paths.data_dir})",
                     "quit it first (one app or worker per device), or give this one its own HEARTH_HOME")


def job_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """Training job `name`: a second run would delete or overwrite the first one's checkpoint."""
    return exclusive(hearth_paths().job_lock(name), "another training run", f"training job {name}",
                     "wait for it to finish or stop it, or choose another name")
