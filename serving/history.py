"""Chat history: conversations and their messages in one SQLite file, and "teach" corrections.

The database runs in WAL mode and commits each finished message in its own transaction, so a
process killed in the middle of a streamed reply leaves a database that opens cleanly and holds
every message completed before the kill (the reply being streamed is not stored until it ends).
The schema is versioned with `PRAGMA user_version`; `_MIGRATIONS[i]` takes version i to i + 1.

A taught correction ("what the answer should have been") is appended to
`hearth_paths().teach_file` as one OpenAI `messages` JSONL line, written atomically, which is a
data file the training job reads like any other. This module knows nothing about models or
screens: it stores text.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import atomic_path
from core.errors import HearthError
from core.paths import hearth_paths

ROLES = ("system", "user", "assistant")

_MIGRATIONS: list[str] = [
    # 0 -> 1: conversations and messages, with the model and settings each conversation used.
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        system_prompt TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # 1 -> 2: an answer cut short (Esc) is kept but marked, and a taught correction is remembered.
    """
    ALTER TABLE messages ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN taught TEXT NOT NULL DEFAULT '';
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    model: str = ""
    created: float = 0.0
    stopped: bool = False          # the answer was cancelled before it ended
    taught: str = ""               # the correction the user taught for this answer, if any


class History:
    """The chat history in one SQLite file. Safe to share between threads (one lock)."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path) if path is not None else hearth_paths().history_db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives the process being killed
            # (only a power cut can lose the last ones), without an fsync per message.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Deleted text is overwritten, not left in free space for a file reader to recover.
            self._db.execute("PRAGMA secure_delete=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise HearthError(f"{self.path}: not a usable chat history ({exc})") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HearthError(
                f"{self.path}: written by a newer Hearth (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        for target in range(version, SCHEMA_VERSION):
            # One transaction per step: DDL and user_version commit together or not at all
            # (statement by statement: executescript would commit the open transaction first).
            with self._transaction():
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target + 1}")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:  # never read in the middle of another thread's transaction
            return self._db.execute(sql, params).fetchall()

    def _transaction(self):
        return _Transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    # --- conversations ---------------------------------------------------------------------

    def new_conversation(
        self, model: str, system_prompt: str = "", title: str = "", settings: dict[str, Any] | None = None
    ) -> Conversation:
        now = self._clock()
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO conversations (title, model, system_prompt, settings, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (title, model, system_prompt, json.dumps(settings or {}, sort_keys=True), now, now),
            )
        return self.conversation(int(cur.lastrowid))

    def conversation(self, conversation_id: int) -> Conversation:
        rows = self._query("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise HearthError(f"{self.path}: no conversation {conversation_id}")
        return _conversation(rows[0])

    def conversations(self) -> list[Conversation]:
        """Every conversation, the most recently active first."""
        rows = self._query("SELECT * FROM conversations ORDER BY updated DESC, id DESC")
        return [_conversation(row) for row in rows]

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Conversation:
        changes = {"title": title, "model": model, "system_prompt": system_prompt}
        if settings is not None:
            changes["settings"] = json.dumps(settings, sort_keys=True)
        changes = {key: value for key, value in changes.items() if value is not None}
        if changes:
            assignments = ", ".join(f"{key} = ?" for key in changes)
            with self._transaction():
                self._db.execute(
                    f"UPDATE conversations SET {assignments}, updated = ? WHERE id = ?",
                    (*changes.values(), self._clock(), conversation_id),
                )
        return self.conversation(conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        """Erase a conversation: gone from the file at once, not only from the list. Without the
        checkpoint its text stayed in the database file (in pages the write-ahead log had
        replaced) for as long as the app stayed open."""
        with self._transaction():
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self._erase_old_pages()

    # --- messages --------------------------------------------------------------------------

    def add_message(
        self, conversation_id: int, role: str, content: str, model: str = "", stopped: bool = False
    ) -> Message:
        """Store one finished message (committed before this returns)."""
        if role not in ROLES:
            raise HearthError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        now = self._clock()
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, model, created, stopped) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, model, now, int(stopped)),
            )
            # The first user message names a conversation that has no title yet.
            title = _title_from(content) if role == "user" else ""
            self._db.execute(
                "UPDATE conversations SET updated = ?, "
                "title = CASE WHEN title = '' AND ? != '' THEN ? ELSE title END WHERE id = ?",
                (now, title, title, conversation_id),
            )
        return self.message(int(cur.lastrowid))

    def message(self, message_id: int) -> Message:
        rows = self._query("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise HearthError(f"{self.path}: no message {message_id}")
        return _message(rows[0])

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(row) for row in rows]

    def user_prompts(self, limit: int = 200) -> list[str]:
        """The last `limit` questions asked in any conversation, oldest first."""
        rows = self._query(
            "SELECT content FROM (SELECT id, content FROM messages WHERE role = 'user' "
            "ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,),
        )
        return [row[0] for row in rows]

    def delete_message(self, message_id: int) -> None:
        """Remove one message (regenerate drops the answer it replaces)."""
        with self._transaction():
            self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        self._erase_old_pages()

    def _erase_old_pages(self) -> None:
        # Copy the log's pages (the deletion, with secure_delete's zeros) over the database and
        # empty the log, which still holds the pages as they were. Best effort: a reader in
        # another process may hold the log for a moment; the next deletion or close finishes it.
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- teach -----------------------------------------------------------------------------

    def teach(self, message_id: int, corrected: str, teach_file: Path | None = None) -> Path:
        """Record that assistant message `message_id` should have said `corrected`.

        Appends the conversation up to that answer, with the answer replaced, to the teach file
        as one `{"messages": [...]}` line (the file is rewritten atomically: a reader sees it
        with or without the new line, never half of it). Returns the teach file's path.
        """
        corrected = corrected.strip()
        if not corrected:
            raise HearthError("a taught answer cannot be empty")
        target = self.message(message_id)
        if target.role != "assistant":
            raise HearthError(f"message {message_id} is not an answer (it is a {target.role} message)")
        conversation = self.conversation(target.conversation_id)
        turns: list[dict[str, str]] = []
        if conversation.system_prompt:
            turns.append({"role": "system", "content": conversation.system_prompt})
        for message in self.messages(conversation.id):
            if message.id == message_id:
                turns.append({"role": "assistant", "content": corrected})
                break
            turns.append({"role": message.role, "content": message.taught or message.content})
        if not any(turn["role"] == "user" for turn in turns):
            raise HearthError(f"message {message_id} answers no question: nothing to teach")
        path = Path(teach_file) if teach_file is not None else hearth_paths().teach_file
        line = json.dumps({"messages": turns}, ensure_ascii=False) + "\n"
        with self._lock:  # one writer at a time, so two corrections never race on the file
            old = path.read_bytes() if path.exists() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            with atomic_path(path) as tmp:
                tmp.write_bytes(old + line.encode("utf-8"))
        with self._transaction():
            self._db.execute("UPDATE messages SET taught = ? WHERE id = ?", (corrected, message_id))
        return path

    # --- export ----------------------------------------------------------------------------

    def to_markdown(self, conversation_id: int) -> str:
        """The conversation as a Markdown document (title, model, system prompt, each turn)."""
        conversation = self.conversation(conversation_id)
        lines = [f"# {conversation.title or 'Conversation'}", ""]
        lines.append(f"- Model: {conversation.model or 'unknown'}")
        if conversation.settings:
            settings = ", ".join(f"{k}={v}" for k, v in sorted(conversation.settings.items()))
            lines.append(f"- Settings: {settings}")
        lines.append("")
        if conversation.system_prompt:
            lines += ["## System", "", conversation.system_prompt, ""]
        for message in self.messages(conversation_id):
            heading = {"user": "You", "assistant": "Hearth", "system": "System"}[message.role]
            if message.stopped:
                heading += " (stopped)"
            lines += [f"## {heading}", "", message.content, ""]
            if message.taught:
                lines += ["### Taught answer", "", message.taught, ""]
        return "\n".join(lines).rstrip() + "\n"

    def export_markdown(self, conversation_id: int, path: Path) -> Path:
        from core.atomic import atomic_write_text

        atomic_write_text(Path(path), self.to_markdown(conversation_id))
        return Path(path)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the history's lock (ROLLBACK on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self._db = db
        self._lock = lock

    def __enter__(self):
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb):
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
        return False


def _title_from(text: str, limit: int = 48) -> str:
    first = " ".join(text.split())
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _conversation(row: sqlite3.Row) -> Conversation:
    try:
        settings = json.loads(row["settings"] or "{}")
    except ValueError:
        settings = {}
    return Conversation(
        row["id"], row["title"], row["model"], row["system_prompt"], settings, row["created"], row["updated"]
    )


def _message(row: sqlite3.Row) -> Message:
    return Message(
        row["id"], row["conversation_id"], row["role"], row["content"], row["model"], row["created"],
        bool(row["stopped"]), row["taught"],
    )
