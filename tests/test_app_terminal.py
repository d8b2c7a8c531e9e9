"""The app leaves when its terminal does. A real `hearth` on a real pseudo-terminal:

- closed under a session leader that outlives the hang-up (as `make run` does: make catches
  SIGHUP and waits for its child), the app gets no signal at all; it must notice by itself and
  exit, not spin on end-of-file at 100% CPU for ever (it once did, for 20 minutes, slowing CI);
- sent SIGHUP, it shuts down cleanly (terminal restored, exit status 129), not killed mid-write.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from app_helpers import stories_chat, write_config

pytestmark = pytest.mark.skipif(not hasattr(pty, "fork"), reason="needs a POSIX pseudo-terminal")

_SCRIPT = Path(sys.executable).with_name("hearth")
HEARTH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "app"]


def _start(home: Path, argv: list[str]) -> tuple[int, int]:
    """Fork `argv` on a new pseudo-terminal (its own session); returns (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:   # the child: a terminal-less environment would make Textual refuse to start
        os.environ.update(HEARTH_HOME=str(home), TERM="xterm-256color")
        for name in ("COLUMNS", "LINES"):   # set by pytest; they would override the pty's size
            os.environ.pop(name, None)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return pid, fd


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; the app wrote {len(seen)} bytes")
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:   # EIO: everything on the other side closed the terminal
                break
    return seen


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def home(tmp_path, stories_gguf) -> Path:
    home = tmp_path / "home"
    write_config(home, chat=stories_chat(stories_gguf))
    return home


def test_app_exits_when_its_terminal_hangs_up_without_telling_it(home, tmp_path):
    status_file, pid_file = tmp_path / "status", tmp_path / "pid"
    # The shell plays make: the hang-up's SIGHUP reaches it (the session leader), it catches it
    # and waits for the app, so no SIGHUP ever reaches the app.
    # The inner shell writes its pid and becomes the app (exec), so the pid is the app's.
    script = (f"trap 'echo caught' HUP; sh -c 'echo $$ > {pid_file}; exec {' '.join(HEARTH)}'; "
              f"echo $? > {status_file}; sleep 30")
    shell, fd = _start(home, ["/bin/sh", "-c", script])
    try:
        _read_until(fd, b"Conversations", 90)
        app_pid = int(pid_file.read_text())
        os.close(fd)                                   # the terminal window closes
        gone = _wait_gone(app_pid, 20)
        if not gone:
            os.kill(app_pid, signal.SIGKILL)
        assert gone, "the app kept running after its terminal hung up"
        deadline = time.monotonic() + 5
        while not status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status_file.read_text().strip() == "129"
    finally:
        os.kill(shell, signal.SIGKILL)
        os.waitpid(shell, 0)


def test_sighup_shuts_the_app_down_cleanly(home):
    pid, fd = _start(home, HEARTH)
    try:
        _read_until(fd, b"Conversations", 90)
        os.kill(pid, signal.SIGHUP)
        # Textual's last words: leave the alternate screen, so the shell gets its screen back.
        _read_until(fd, b"\x1b[?1049l", 20)
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the app did not exit after SIGHUP"
            time.sleep(0.1)
        status = done[1]
        assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)} instead of exiting"
        assert os.WEXITSTATUS(status) == 129
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
