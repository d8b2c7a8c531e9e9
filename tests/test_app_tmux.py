"""End to end, the way a person uses it: tmux runs `hearth`, keys switch to Chat, a question is
typed, the streamed answer appears on the captured screen, Esc stops a second answer mid-stream,
and Ctrl-Q quits cleanly. Real terminal, real bundled model, real history file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app_helpers import write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Tmux:
    def __init__(self, name: str):
        self.base = ["tmux", "-L", name]          # a private server: never the person's own tmux

    def __call__(self, *args: str) -> str:
        return subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=20).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "e2e")

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{self.screen()}")

    def type_prompt(self, text: str) -> None:
        """Type `text` into the chat prompt and check it arrived whole before Enter. Keys that
        land while Textual is still switching screens go to the screen being left, so a prompt
        missing its first characters is cleared (Ctrl-U) and typed again, at most three times.
        The text must fit the prompt's width: a longer one scrolls, and only a check of the
        whole text catches lost first characters (CI once sent "dragon who bakes bread.")."""
        assert len(text) <= 40, "a prompt longer than the input's width cannot be checked whole"
        visible = f"▊  {text}"                               # the input's left edge, then the text
        for _ in range(3):
            self("send-keys", "-t", "e2e", "C-u")
            self("send-keys", "-t", "e2e", "-l", text)
            deadline = time.monotonic() + 15   # a loaded CI host can take seconds to echo keys
            while time.monotonic() < deadline:
                if visible in self.screen():
                    self("send-keys", "-t", "e2e", "Enter")
                    return
                time.sleep(0.2)
        raise AssertionError(f"the prompt never showed {text!r}; the screen was:\n{self.screen()}")


def test_a_person_chats_stops_an_answer_and_quits(tmp_path):
    from serving.history import History

    home = tmp_path / "home"
    write_config(home, chat={"temperature": 0.0, "max_tokens": 400, "threads": 2})
    hearth = Path(sys.executable).with_name("hearth")
    command = [str(hearth)] if hearth.exists() else [sys.executable, "-m", "app"]
    tmux = Tmux(f"hearth-e2e-{os.getpid()}")
    # COLUMNS and LINES (set by pytest) would override the window size Textual reads.
    shell = f"env -u COLUMNS -u LINES HEARTH_HOME={home} TERM=xterm-256color {' '.join(command)}; echo HEARTH-EXITED-$?; sleep 60"
    tmux("new-session", "-d", "-s", "e2e", "-x", "120", "-y", "36", shell)
    try:
        tmux.wait_for(lambda s: "Conversations" in s and "ready." in s, 60, "the app and its model")
        tmux("send-keys", "-t", "e2e", "F4")
        tmux.wait_for(lambda s: "Parameters" in s, 20, "the Models screen")
        tmux("send-keys", "-t", "e2e", "F1")
        tmux.wait_for(lambda s: "Conversations" in s, 20, "the Chat screen")

        tmux.type_prompt("What is the capital of France?")
        tmux.wait_for(lambda s: "Paris" in s and "ready." in s, 120, "the streamed answer")

        tmux.type_prompt("Write a long story about a dragon.")
        def streaming(screen: str) -> bool:
            # The live answer's label, then words (not the "…" placeholder) on the line under it,
            # read inside the transcript's column only: the welcome panel to its right has words
            # of its own on the same screen lines.
            lines = screen.splitlines()
            label = [i for i, line in enumerate(lines) if "Hearth  answering…" in line]
            if "Esc stops" not in screen or len(label) != 1 or label[0] + 1 >= len(lines):
                return False
            first = lines[label[0] + 1].split("▎", 1)[-1].split("▏", 1)[0].strip()
            return first not in ("", "…")

        tmux.wait_for(streaming, 120, "the second answer to start streaming")
        tmux("send-keys", "-t", "e2e", "Escape")
        stopped = tmux.wait_for(lambda s: "answer stopped" in s, 60, "the answer to stop")
        assert "Hearth  stopped" in stopped, stopped

        tmux("send-keys", "-t", "e2e", "C-q")
        tmux.wait_for(lambda s: "HEARTH-EXITED-0" in s, 30, "a clean exit")
    finally:
        tmux("kill-server")

    os.environ["HEARTH_HOME"], saved = str(home), os.environ.get("HEARTH_HOME")
    try:
        history = History()
        [conv] = history.conversations()
        messages = history.messages(conv.id)
    finally:
        if saved is not None:
            os.environ["HEARTH_HOME"] = saved
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert "Paris" in messages[1].content and not messages[1].stopped
    assert messages[3].stopped and messages[3].content
