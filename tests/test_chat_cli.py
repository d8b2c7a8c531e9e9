"""`hearth chat` on the bundled default model, through llama.cpp: piped and on a terminal.

The piped test drives the real command as a script would; the terminal test runs it on a
pseudo-terminal and presses Ctrl-C in the middle of an answer, as a person would.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def env_for(home: Path) -> dict[str, str]:
    return dict(os.environ, HEARTH_HOME=str(home))


@pytest.mark.slow
def test_piped_chat_answers_each_line_in_full(tmp_path: Path):
    # Sampling as configured (temperature 0.7, repeat penalty 1.2), with a fixed seed.
    done = subprocess.run(
        [sys.executable, "-m", "app", "chat", "--seed", "2"],
        input="What is the capital of France?\n\nWhat is the capital of Italy?\n",
        env=env_for(tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == 2  # one line per question; the empty input line is skipped
    assert "Paris" in answers[0]
    assert "Rome" in answers[1]
    assert done.stderr == ""  # nothing else is printed when piped


class Terminal:
    """A program on a pseudo-terminal: type into it, read what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the program
            os.chdir(REPO_ROOT)
            os.execve(argv[0], argv, env)
        self.screen = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the screen shows:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.screen += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the program ended
                    break
        return self.screen

    def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the program did not end")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_program(tmp_path: Path):
    term = Terminal([sys.executable, "-m", "app", "chat", "--seed", "2", "--max-tokens", "400"],
                    env_for(tmp_path))
    try:
        term.wait_for(lambda s: "you> " in s)
        term.type("Tell me a very long story about a dragon who learns to bake bread.\r")
        # Wait until the answer is streaming, then press Ctrl-C (the terminal sends SIGINT).
        term.wait_for(lambda s: len(s.split("hearth> ", 1)[-1]) > 40 if "hearth> " in s else False)
        term.type("\x03")
        screen = term.wait_for(lambda s: "[stopped]" in s and s.rstrip().endswith("you>"))
        story = screen.split("hearth> ", 1)[1].split("[stopped]")[0]
        assert len(story.split()) < 300  # stopped early, far from the 400-token limit

        # The program is still there and answers the next question.
        term.type("What is the capital of France?\r")
        term.wait_for(lambda s: s.count("you> ") >= 3)
        last_answer = term.screen.rsplit("hearth> ", 1)[1]
        assert "Paris" in last_answer

        term.type("\x04")  # Ctrl-D ends the chat
        assert term.exit_code() == 0
    finally:
        term.close()


@pytest.mark.slow
def test_a_closed_terminal_keeps_the_answer_said_so_far(tmp_path: Path, monkeypatch):
    # The terminal window closes mid-answer: the kernel sends SIGHUP (this program leads the
    # terminal's session) and every later write fails. What was said stays in the history.
    term = Terminal([sys.executable, "-m", "app", "chat", "--seed", "2", "--max-tokens", "400"], env_for(tmp_path))
    try:
        term.wait_for(lambda s: "you> " in s)
        term.type("Tell me a very long story about a dragon who learns to bake bread.\r")
        screen = term.wait_for(lambda s: len(s.split("hearth> ", 1)[-1]) > 60 if "hearth> " in s else False)
        os.close(term.fd)
        term.fd = os.open(os.devnull, os.O_RDONLY)   # for close()
        assert term.exit_code() == 128 + signal.SIGHUP
    finally:
        term.close()
    shown = " ".join(screen.split("hearth> ", 1)[1].split())

    from serving.history import History

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))
    [conversation] = History().conversations()
    messages = [(m.role, m.content) for m in History().messages(conversation.id)]
    assert messages[0] == ("user", "Tell me a very long story about a dragon who learns to bake bread.")
    [(role, kept)] = messages[1:]
    assert role == "assistant" and " ".join(kept.split()).startswith(shown[:40])
    assert len(kept.split()) < 300   # cut short, not the whole 400-token story


@pytest.mark.slow
def test_an_open_chat_answers_with_the_model_retrained_while_it_was_open(hearth_home: Path):
    """`hearth chat --model family` kept the engine it started with: a retrain while it was
    open went unused until it was restarted. Now the model is loaded again before the next
    answer; a change that does not load leaves the old model answering. Each time it says so
    on stderr."""
    from core.paths import hearth_paths
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir
    from training.job import JobSpec
    from training.model_store import MANIFEST
    from training.trainer import train

    def retrain() -> None:
        train(JobSpec("family", [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()), method="lora", epochs=1))

    retrain()
    chat = subprocess.Popen([sys.executable, "-m", "app", "chat", "--model", "family", "--max-tokens", "3",
                             "--no-history"], env=env_for(hearth_home), cwd=REPO_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ask() -> str:
        chat.stdin.write("hello\n")
        chat.stdin.flush()
        return chat.stdout.readline()   # an answer is one line, however short

    try:
        assert ask().endswith("\n")
        retrain()
        assert ask().endswith("\n")
        (hearth_paths().models_dir / "family" / MANIFEST).write_text("{not json")
        assert ask().endswith("\n")   # still answering, with the retrained model
        chat.stdin.close()
        assert chat.wait(timeout=120) == 0
    finally:
        chat.kill()
    notes = chat.stderr.read().splitlines()
    assert len(notes) == 2, notes
    assert notes[0] == "family changed on disk (retrained or exported): loaded again"
    assert notes[1].startswith("family changed on disk but did not load (")
