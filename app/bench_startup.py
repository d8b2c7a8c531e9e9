"""`hearth bench startup`: time from launching the app to its first frame, under a real pty.

Each run starts a fresh process in a pseudo-terminal of 120x36 with a private HEARTH_HOME, reads
what it draws until a marker of the first frame appears ("Conversations", the chat sidebar),
then presses Ctrl-Q and waits for the exit. Side by side, in the same run: a bare Textual app
that draws one word (the floor any Textual app pays) and `hearth --help` (the interpreter plus
the command line, no UI). The result gives medians and the ratio of the app to the bare app.
Torch and llama.cpp are not loaded before the first frame; the model loads after it, in a worker.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import struct
import sys
import tempfile
import time

HELLO = (
    "from textual.app import App\n"
    "from textual.widgets import Static\n"
    "class Hello(App):\n"
    "    def compose(self):\n"
    "        yield Static('Conversations')\n"
    "Hello().run()\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="launches per variant (default 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a first frame")


def run(args: argparse.Namespace) -> dict:
    python = sys.executable
    variants = {
        "hearth_app": [python, "-m", "app"],
        "bare_textual_app": [python, "-c", HELLO],
        "hearth_help": [python, "-m", "app", "--help"],
    }
    results: dict[str, dict] = {}
    for name, argv in variants.items():
        times = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="hearth-bench-") as home:
                if name == "hearth_help":
                    times.append(_time_to_exit(argv, home, args.timeout))
                else:
                    times.append(_time_to_first_frame(argv, home, b"Conversations", args.timeout))
        results[name] = {
            "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "runs_s": [round(t, 3) for t in times],
        }
    app, bare = results["hearth_app"]["median_s"], results["bare_textual_app"]["median_s"]
    return {
        "benchmark": "startup",
        "what": "seconds from launch to the first frame (120x36 pty), median of runs",
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "results": results,
        "app_vs_bare_textual": round(app / bare, 2) if bare else None,
        "app_vs_help": round(app / results["hearth_help"]["median_s"], 2),
        "target_s": 2.0,
        "under_target": app < 2.0,
    }


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(HEARTH_HOME=home, TERM="xterm-256color")
    return env


def _spawn(argv: list[str], home: str) -> tuple[int, int]:
    import fcntl
    import pty
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: become the program
        try:
            os.execve(argv[0], argv, _env(home))
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 120, 0, 0))
    return pid, fd


def _time_to_first_frame(argv: list[str], home: str, marker: bytes, timeout: float) -> float:
    started = time.perf_counter()
    pid, fd = _spawn(argv, home)
    seen = b""
    elapsed = None
    try:
        while time.perf_counter() - started < timeout:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
                if marker in seen:
                    elapsed = time.perf_counter() - started
                    break
        if elapsed is None:
            raise RuntimeError(f"{' '.join(argv[:3])}: no first frame within {timeout:.0f} s")
        os.write(fd, b"\x11")  # Ctrl-Q
        if _reap(pid, fd, 15):
            pid = 0
    finally:
        _kill(pid)
        os.close(fd)
    return elapsed


def _time_to_exit(argv: list[str], home: str, timeout: float) -> float:
    started = time.perf_counter()
    pid, fd = _spawn(argv, home)
    try:
        if _reap(pid, fd, timeout):
            pid = 0
        return time.perf_counter() - started
    finally:
        _kill(pid)
        os.close(fd)


def _reap(pid: int, fd: int, timeout: float) -> bool:
    """Wait for the child to exit (True), draining its output; False if it is still running."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                os.read(fd, 65536)  # keep the pty drained so the child can write and exit
            except OSError:
                pass
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    return False


def _kill(pid: int) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
