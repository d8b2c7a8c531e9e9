"""core/locks.py: one holder at a time, a refusal naming the holder, nothing stale after a crash.

The end-to-end cases (two workers, the app after a worker, two runs of a training job) are in
test_mesh_cli.py and test_training_jobs.py; these are the lock's own edges.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys

import pytest

from core.errors import HearthError
from core.locks import exclusive


def test_a_second_holder_is_refused_by_name_and_the_lock_is_free_after(tmp_path):
    path = tmp_path / "a.lock"
    with exclusive(path, "the first", "the thing", "try later"):
        with pytest.raises(HearthError) as refused:
            with exclusive(path, "the second", "the thing", "try later"):
                pass
        assert str(refused.value) == f"the thing is already in use by the first (pid {os.getpid()}): try later"
    with exclusive(path, "the second", "the thing", "try later"):
        assert path.read_text() == f"{os.getpid()} the second\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_killed_holder_leaves_nothing_that_blocks(tmp_path):
    path = tmp_path / "a.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from core.locks import exclusive\n"
         f"with exclusive({str(path)!r}, 'a doomed process', 'x', 'y'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HearthError, match=f"in use by a doomed process \\(pid {holder.pid}\\)"):
            with exclusive(path, "me", "x", "y"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(path, "me", "x", "y"):   # SIGKILLed: the kernel dropped its lock
        pass


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    # A fake: no file system here lacks flock (some network mounts answer ENOLCK).
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with exclusive(tmp_path / "a.lock", "me", "x", "y"):
        ran = True
    assert ran and "cannot lock files" in caplog.text


def test_a_lock_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    # Its folder's place is taken by a file (as a read-only data folder would refuse it too).
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(HearthError, match=r"not-a-folder/a.lock: cannot be opened \(File exists\)"):
        with exclusive(blocker / "a.lock", "me", "x", "y"):
            pass
