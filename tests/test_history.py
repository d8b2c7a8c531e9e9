"""Chat history (serving/history.py): a real SQLite file, migrations, export, teach, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import HearthError
from serving.history import SCHEMA_VERSION, History

REPO = Path(__file__).resolve().parents[1]


def test_conversation_and_messages_round_trip(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    conv = history.new_conversation("smollm2-135m", "Be brief.", settings={"temperature": 0.3})
    history.add_message(conv.id, "user", "What is the capital of France?")
    history.add_message(conv.id, "assistant", "Paris.", model="smollm2-135m")
    history.close()

    reopened = History(tmp_path / "h.sqlite3")
    [stored] = reopened.conversations()
    assert stored.title == "What is the capital of France?"
    assert stored.model == "smollm2-135m" and stored.system_prompt == "Be brief."
    assert stored.settings == {"temperature": 0.3}
    assert [(m.role, m.content, m.model) for m in reopened.messages(conv.id)] == [
        ("user", "What is the capital of France?", ""), ("assistant", "Paris.", "smollm2-135m")]


def test_a_deleted_conversation_is_gone_from_the_files_while_the_app_stays_open(tmp_path):
    # Deleted from the list is not enough: its text stayed readable in the database file (pages
    # the write-ahead log had replaced, free space) until the app closed, days later perhaps.
    canary, kept = "CANARY-7f3a the surprise party is on Friday", "the shopping list"
    history = History(tmp_path / "h.sqlite3")
    secret = history.new_conversation("m", "")
    history.add_message(secret.id, "user", canary)
    history.add_message(secret.id, "assistant", canary + ", understood")
    history.close()                                   # on disk, in the database file itself

    history = History(tmp_path / "h.sqlite3")         # the app, open again
    other = history.new_conversation("m", "")
    history.add_message(other.id, "user", kept)
    history.delete_conversation(secret.id)
    answer = history.add_message(other.id, "assistant", canary[:20] + " regenerated away")
    history.delete_message(answer.id)
    files = sorted(tmp_path.glob("h.sqlite3*"))
    assert len(files) >= 2                            # still open: the log is there
    for path in files:
        assert b"CANARY-7f3a" not in path.read_bytes(), path.name
    assert [m.content for m in history.messages(other.id)] == [kept]
    history.close()


def test_database_is_wal_and_versioned(tmp_path):
    History(tmp_path / "h.sqlite3").close()
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2


def test_old_schema_is_migrated_in_place(tmp_path):
    """A version-1 database (no stopped/taught columns) keeps its rows and gains the new columns."""
    from serving import history as module

    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(module._MIGRATIONS[0] + "PRAGMA user_version=1;")
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('old', 1, 1)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (1, 'user', 'hi', 1)")
    db.commit()
    db.close()
    history = History(path)
    assert history.schema_version == SCHEMA_VERSION
    [message] = history.messages(1)
    assert message.content == "hi" and message.stopped is False and message.taught == ""


def test_newer_schema_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    db.close()
    with pytest.raises(HearthError, match="h.sqlite3.*newer"):
        History(path)


def test_not_a_database_is_a_one_line_error(tmp_path):
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HearthError, match="h.sqlite3"):
        History(path)


def test_bad_role_is_refused(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    conv = history.new_conversation("m")
    with pytest.raises(HearthError, match="role"):
        history.add_message(conv.id, "robot", "beep")


def test_export_to_markdown(tmp_path):
    history = History(tmp_path / "h.sqlite3", clock=lambda: 1000.0)
    conv = history.new_conversation("smollm2-135m", "Be brief.")
    history.add_message(conv.id, "user", "Show code")
    history.add_message(conv.id, "assistant", "```python\nprint('hi')\n```", stopped=True)
    out = history.export_markdown(conv.id, tmp_path / "out" / "chat.md")
    assert out.read_text() == (
        "# Show code\n\n- Model: smollm2-135m\n\n## System\n\nBe brief.\n\n## You\n\nShow code\n\n"
        "## Hearth (stopped)\n\n```python\nprint('hi')\n```\n"
    )


def test_teach_appends_openai_messages_jsonl_that_training_reads(tmp_path):
    from training.data import read_conversations

    history = History(tmp_path / "h.sqlite3")
    conv = history.new_conversation("smollm2-135m", "You are helpful.")
    history.add_message(conv.id, "user", "What is our dog called?")
    answer = history.add_message(conv.id, "assistant", "I don't know.")
    history.add_message(conv.id, "user", "And the cat?")
    second = history.add_message(conv.id, "assistant", "No idea.")
    teach_file = tmp_path / "data" / "taught.jsonl"
    history.teach(answer.id, "Your dog is called Biscuit.", teach_file)
    history.teach(second.id, "The cat is called Miso.", teach_file)

    lines = [json.loads(line) for line in teach_file.read_text().splitlines()]
    assert lines[0]["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is our dog called?"},
        {"role": "assistant", "content": "Your dog is called Biscuit."},
    ]
    # The second correction carries the first one in its context, not the wrong answer.
    assert lines[1]["messages"][2]["content"] == "Your dog is called Biscuit."
    assert lines[1]["messages"][-1] == {"role": "assistant", "content": "The cat is called Miso."}
    assert history.message(answer.id).taught == "Your dog is called Biscuit."
    chats = read_conversations(teach_file)
    assert len(chats) == 2 and chats[1].messages[-1]["content"] == "The cat is called Miso."
    assert not list(teach_file.parent.glob("*.part"))


def test_teach_refuses_a_question_or_an_empty_answer(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    conv = history.new_conversation("m")
    question = history.add_message(conv.id, "user", "hi")
    answer = history.add_message(conv.id, "assistant", "hello")
    with pytest.raises(HearthError, match="not an answer"):
        history.teach(question.id, "x", tmp_path / "t.jsonl")
    with pytest.raises(HearthError, match="empty"):
        history.teach(answer.id, "   ", tmp_path / "t.jsonl")
    assert not (tmp_path / "t.jsonl").exists()


_STREAMER = textwrap.dedent('''
    """Child process: three finished turns, then a fourth whose reply is killed mid-stream."""
    import json, sys
    from core.config import load_config
    from app.services.chat import ChatService
    from serving.history import History
    from training.engines import LlamaCppEngine

    db, gguf = sys.argv[1], sys.argv[2]
    chat = ChatService(History(__import__("pathlib").Path(db)), load_config(),
                       open_engine=lambda model, ctx, threads: LlamaCppEngine(gguf, 512, 1, "stories260K"))
    conv = chat.new_conversation(model="stories260K", system_prompt="")
    settings = chat.sampling_settings()
    settings.max_tokens, settings.temperature, settings.seed = 40, 0.0, 1
    for turn in range(3):
        chat.add_user_message(conv.id, f"Once upon a time {turn}")
        reply = chat.reply(conv.id, lambda piece: None, settings=settings)
        print(json.dumps({"done": reply.message.content}), flush=True)
    chat.add_user_message(conv.id, "Once upon a time, the last one")

    def on_piece(piece):
        print(json.dumps({"streaming": piece}), flush=True)
        sys.stdin.readline()   # wait here, mid-stream, until the parent kills us

    settings.max_tokens = 200
    chat.reply(conv.id, on_piece, settings=settings)
    print(json.dumps({"error": "the stream ended before the kill"}), flush=True)
''')


@pytest.mark.slow
def test_history_survives_sigkill_mid_stream(tmp_path, stories_gguf, hearth_home):
    """A real process streams a real reply (llama.cpp, stories260K) and is SIGKILLed mid-stream:
    the database opens cleanly and holds every message completed before the kill."""
    script = tmp_path / "streamer.py"
    script.write_text(_STREAMER)
    db = tmp_path / "history.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HEARTH_HOME": str(hearth_home)}
    child = subprocess.Popen([sys.executable, str(script), str(db), str(stories_gguf)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    finished: list[str] = []
    try:
        for line in child.stdout:
            event = json.loads(line)
            assert "error" not in event, event["error"]
            if "done" in event:
                finished.append(event["done"])
            if "streaming" in event:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert len(finished) == 3 and all(finished)

    history = History(db)
    assert history._query("PRAGMA integrity_check")[0][0] == "ok"
    [conv] = history.conversations()
    messages = history.messages(conv.id)
    assert [m.role for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert [m.content for m in messages if m.role == "assistant"] == finished
    assert messages[-1].content == "Once upon a time, the last one"
    # And it is still writable: the next answer goes in after the ones that survived.
    history.add_message(conv.id, "assistant", "after the crash")
    assert history.messages(conv.id)[-1].content == "after the crash"
