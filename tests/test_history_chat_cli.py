"""`hearth chat` records its conversation in the chat history (the one the app shows)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_piped_hearth_chat_is_recorded_in_the_history(tmp_path, stories_gguf, monkeypatch):
    home = tmp_path / "home"
    env = {**os.environ, "HEARTH_HOME": str(home)}
    args = [sys.executable, "-m", "app", "chat", "--model", str(stories_gguf), "--max-tokens", "16",
            "--temperature", "0", "--system", "Tell stories."]
    done = subprocess.run(args, input="Once upon a time\nThe dog\n", env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()

    monkeypatch.setenv("HEARTH_HOME", str(home))
    from serving.history import History

    history = History()
    [conv] = history.conversations()
    assert conv.system_prompt == "Tell stories." and conv.model == str(stories_gguf)
    assert conv.settings["temperature"] == 0.0
    messages = history.messages(conv.id)
    assert [(m.role, m.content) for m in messages if m.role == "user"] == [
        ("user", "Once upon a time"), ("user", "The dog")]
    assert [m.content.replace("\n", " ") for m in messages if m.role == "assistant"] == answers

    # --no-history leaves the history as it was.
    subprocess.run(args + ["--no-history"], input="Again\n", env=env, cwd=REPO, capture_output=True,
                   text=True, timeout=120, check=True)
    assert len(History().conversations()) == 1
