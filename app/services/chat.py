"""Chat as the app uses it: conversations from the history, answers streamed by an engine.

`ChatService` keeps one engine loaded (the model a conversation names, loaded on first use),
stores each finished message in the history and turns corrections into training data. It
blocks: the app calls it from worker threads. It imports no UI code, and it knows nothing about
how a model answers (training/engines.py) or how messages are stored (serving/history.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.services.models import require_here
from core.config import Config
from serving.history import Conversation, History, Message
from serving.reload import Reload
from training.engines import ChatEngine, ChatMessage, SamplingSettings


@dataclass
class Note:
    """Something the person should know about the loaded model (serving/reload.py)."""

    text: str
    loaded: bool   # False: the changed model did not load; the one before still answers


@dataclass
class Reply:
    """A finished (or stopped) answer, as stored."""

    message: Message
    stopped: bool
    pieces: int


EngineOpener = Callable[[str, int, int], ChatEngine]


class ChatService:
    def __init__(self, history: History, config: Config, open_engine: EngineOpener | None = None):
        self.history = history
        self._chat = config.section("chat")
        self.default_model = str(self._chat["model"])
        self.default_system_prompt = str(self._chat["system_prompt"])
        self._open = open_engine
        self._engine: ChatEngine | None = None
        self._reload: Reload | None = None   # follows the loaded engine's model on disk
        self._engine_lock = threading.Lock()
        self._notes: deque[Note] = deque()   # appended by worker threads, taken by the screen
        # Streams in progress: close() stops them and waits before freeing the engine (freeing
        # llama.cpp's context under a running decode would crash the process).
        self._streams: set[threading.Event] = set()
        self._streams_lock = threading.Lock()
        self._idle = threading.Condition(self._streams_lock)
        self._closed = False

    def use_model(self, name: str) -> None:
        """New conversations use `name` (the Models screen's "set active"); open ones keep theirs."""
        self.default_model = name

    # --- conversations ---------------------------------------------------------------------

    def conversations(self) -> list[Conversation]:
        return self.history.conversations()

    def messages(self, conversation_id: int) -> list[Message]:
        return self.history.messages(conversation_id)

    def new_conversation(self, model: str | None = None, system_prompt: str | None = None) -> Conversation:
        settings = self.sampling_settings()
        return self.history.new_conversation(
            model or self.default_model,
            self.default_system_prompt if system_prompt is None else system_prompt,
            settings={"temperature": settings.temperature, "top_p": settings.top_p,
                      "repeat_penalty": settings.repeat_penalty, "max_tokens": settings.max_tokens},
        )

    def set_system_prompt(self, conversation_id: int, prompt: str) -> Conversation:
        return self.history.update_conversation(conversation_id, system_prompt=prompt)

    def set_model(self, conversation_id: int, model: str) -> Conversation:
        return self.history.update_conversation(conversation_id, model=model)

    def delete_conversation(self, conversation_id: int) -> None:
        self.history.delete_conversation(conversation_id)

    def export_markdown(self, conversation_id: int, path: Path) -> Path:
        return self.history.export_markdown(conversation_id, path)

    def teach(self, message_id: int, corrected: str) -> Path:
        """Store `corrected` as what answer `message_id` should have said (training data)."""
        return self.history.teach(message_id, corrected)

    def prompt_history(self, limit: int = 200) -> list[str]:
        """The user's past prompts, oldest first, newest last (for up/down in the input)."""
        return self.history.user_prompts(limit)

    # --- answering -------------------------------------------------------------------------

    def sampling_settings(self) -> SamplingSettings:
        return SamplingSettings.from_config(self._chat)

    def engine(self, model: str) -> ChatEngine:
        """The engine for `model`, loading it (seconds) unless it is the one already loaded, as
        it is on disk now (retrained or exported since: loaded again, see `take_notes`)."""
        with self._engine_lock:
            if self._closed:
                from core.errors import HearthError

                raise HearthError("the chat service is closed")
            if self._engine is not None and self._reload is not None and self._reload.model == model:
                self._engine = self._reload.fresh(self._engine)
                return self._engine
            if self._engine is not None:
                # Another model: the old one goes first (a weak computer may not hold two).
                self._engine.close()
                self._engine, self._reload = None, None
            opener = self._open
            if opener is None:
                from training.engines import open_engine as opener

                require_here(model)
            context, threads = int(self._chat["context_length"]), int(self._chat["threads"])
            reload = Reload(model, lambda: opener(model, context, threads), self._note)
            self._engine, self._reload = reload.open(), reload
            return self._engine

    def _note(self, message: str, loaded: bool) -> None:
        self._notes.append(Note(message, loaded))

    def take_notes(self) -> list[Note]:
        """What happened to the loaded model since last asked (retrained or exported: loaded
        again, or failed to load and the one before still answers), for the screen to show."""
        notes = []
        while self._notes:
            notes.append(self._notes.popleft())
        return notes

    @property
    def loaded_model(self) -> str:
        return self._reload.model if self._engine is not None and self._reload is not None else ""

    def add_user_message(self, conversation_id: int, text: str) -> Message:
        return self.history.add_message(conversation_id, "user", text)

    def reply(
        self,
        conversation_id: int,
        on_piece: Callable[[str], None],
        cancel: threading.Event | None = None,
        settings: SamplingSettings | None = None,
    ) -> Reply:
        """Answer the conversation's last message; each piece goes to `on_piece` as it comes.

        The answer is stored once it ends; a cancelled one is stored as far as it got, marked
        stopped (nothing is stored when it was cancelled before its first piece).
        """
        conversation = self.history.conversation(conversation_id)
        engine = self.engine(conversation.model or self.default_model)
        turns = [ChatMessage("system", conversation.system_prompt)] if conversation.system_prompt else []
        turns += [ChatMessage(m.role, m.content) for m in self.history.messages(conversation_id)]
        cancel = cancel if cancel is not None else threading.Event()
        pieces: list[str] = []
        with self._streams_lock:
            if self._closed:
                cancel.set()
            self._streams.add(cancel)
        try:
            for piece in engine.stream(turns, settings or self.sampling_settings(), cancel):
                pieces.append(piece)
                on_piece(piece)
                if cancel.is_set():
                    break
        finally:
            with self._streams_lock:
                self._streams.discard(cancel)
                self._idle.notify_all()
        stopped = cancel.is_set()
        text = "".join(pieces).strip()
        if not text and stopped:
            return Reply(Message(0, conversation_id, "assistant", ""), True, 0)
        message = self.history.add_message(conversation_id, "assistant", text, engine.name, stopped=stopped)
        return Reply(message, stopped, len(pieces))

    def drop_last_answer(self, conversation_id: int) -> Message | None:
        """Remove the conversation's last answer (before regenerating it); None if it ends on a question."""
        messages = self.history.messages(conversation_id)
        if messages and messages[-1].role == "assistant":
            self.history.delete_message(messages[-1].id)
            return messages[-1]
        return None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the answers in progress (they are stored as stopped), then free the engine."""
        with self._streams_lock:
            self._closed = True
            for cancel in self._streams:
                cancel.set()
            self._idle.wait_for(lambda: not self._streams, timeout)
            still_running = bool(self._streams)
        with self._engine_lock:
            if self._engine is not None and not still_running:
                self._engine.close()
            self._engine = None
