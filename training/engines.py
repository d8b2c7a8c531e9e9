"""Chat engines behind one interface: llama.cpp for GGUF files, torch for the rest.

An engine turns a conversation into a stream of text pieces. It knows nothing about where the
conversation is kept or who reads the stream.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass
class SamplingSettings:
    # Defaults that do not loop on small models: greedy decoding repeats itself.
    temperature: float = 0.3
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    max_tokens: int = 512
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, chat: dict) -> "SamplingSettings":
        return cls(
            temperature=float(chat["temperature"]),
            top_p=float(chat["top_p"]),
            repeat_penalty=float(chat["repeat_penalty"]),
            max_tokens=int(chat["max_tokens"]),
        )


class ChatEngine(Protocol):
    name: str
    context_length: int

    def stream(
        self,
        messages: list[ChatMessage],
        settings: SamplingSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the reply piece by piece; stop early when `cancel` is set."""
        ...

    def close(self) -> None: ...


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, with the chat template stored in the GGUF."""

    def __init__(self, gguf_path: str, context_length: int = 2048, threads: int = 0, name: str = ""):
        from llama_cpp import Llama

        self.name = name or os.path.basename(gguf_path)
        self.context_length = context_length
        self._llama = Llama(
            model_path=str(gguf_path),
            n_ctx=context_length,
            n_threads=threads or default_threads(),
            verbose=False,
        )

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def fit_context(self, messages: list[ChatMessage], max_tokens: int) -> list[ChatMessage]:
        """Drop the oldest turns (never the system prompt or the last message) until the prompt
        and the reply fit the context window."""
        budget = self.context_length - max_tokens
        kept = list(messages)
        per_message_overhead = 8  # role markers of the template

        def size(msgs: list[ChatMessage]) -> int:
            return sum(self.count_tokens(m.content) + per_message_overhead for m in msgs)

        while size(kept) > budget:
            droppable = [i for i, m in enumerate(kept[:-1]) if m.role != "system"]
            if not droppable:
                break
            del kept[droppable[0]]
        return kept

    def stream(self, messages, settings, cancel=None):
        max_tokens = min(settings.max_tokens, self.context_length // 2)
        fitted = self.fit_context(messages, max_tokens)
        chunks = self._llama.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in fitted],
            stream=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            repeat_penalty=settings.repeat_penalty,
            max_tokens=max_tokens,
            stop=settings.stop or None,
            seed=settings.seed,
        )
        try:
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    break
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None:
            llama.close()
            self._llama = None


def open_engine(model: str, context_length: int = 2048, threads: int = 0) -> ChatEngine:
    """The engine that serves `model` (any reference the model store resolves)."""
    from training.model_store import gguf_path, resolve

    ref = resolve(model)
    if ref.kind == "gguf" or (ref.kind == "personal" and ref.path and any(ref.path.glob("*.gguf"))):
        return LlamaCppEngine(str(gguf_path(ref)), context_length, threads, ref.display_name)
    from core.errors import HearthError

    raise HearthError(f"model {ref.display_name}: no GGUF to chat with yet (export it with `hearth export`)")
