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


@dataclass
class ReplyEnd:
    """How a streamed reply ended, filled in by the engine when the stream ends: "stop" (a stop
    token or string, or cancelled) or "length" (cut at max_tokens or by the context window).
    Counting the reply's text again cannot tell: its tokens may merge differently."""
    finish: str = "stop"


class ChatEngine(Protocol):
    name: str
    context_length: int

    def stream(
        self,
        messages: list[ChatMessage],
        settings: SamplingSettings,
        cancel: threading.Event | None = None,
        end: ReplyEnd | None = None,
    ) -> Iterator[str]:
        """Yield the reply piece by piece; stop early when `cancel` is set; say in `end` why it ended."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (a reply's length, for usage figures and max_tokens)."""
        ...

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation as the model reads it: chat template up to the assistant's turn."""
        ...

    def close(self) -> None: ...


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, with the chat template stored in the GGUF.

    The prompt is rendered here (the GGUF's template) and sent as tokens, so that what is counted
    to fit the context window is exactly what the model reads.
    """

    def __init__(self, gguf_path: str, context_length: int = 2048, threads: int = 0, name: str = ""):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.name = name or os.path.basename(gguf_path)
        self._llama = Llama(
            model_path=str(gguf_path),
            n_ctx=context_length,
            n_threads=threads or default_threads(),
            verbose=False,
        )
        self.context_length = self._llama.n_ctx()
        template = self._llama.metadata.get("tokenizer.chat_template") or CHATML
        eos, bos = self._llama.token_eos(), self._llama.token_bos()
        self._format = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos),
            bos_token=self._token_text(bos),
            stop_token_ids=[eos],
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation rendered by the chat template, up to the assistant's turn, as tokens."""
        rendered = self._format(messages=[{"role": m.role, "content": m.content} for m in messages])
        return self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=True, special=True)

    def fit_context(self, messages: list[ChatMessage], max_tokens: int) -> list[int]:
        """The prompt tokens of the newest turns that fit with room for `max_tokens` of reply.

        The oldest turns go first (never the system prompt, never the last message); a reply
        that would start a conversation is dropped with its question. If the system prompt and
        the last message alone are still too long, the system prompt goes, then the start of the
        last message: a long chat never fails, it forgets.
        """
        return fit_messages(self.prompt_tokens, self.count_tokens, messages, self.context_length - max_tokens)

    def stream(self, messages, settings, cancel=None, end=None):
        max_tokens = reply_budget(settings.max_tokens, self.context_length)
        prompt = self.fit_context(messages, max_tokens)
        max_tokens = min(settings.max_tokens, self.context_length - len(prompt))
        if max_tokens <= 0 or (cancel is not None and cancel.is_set()):
            return
        chunks = self._llama.create_completion(
            prompt=prompt,
            stream=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            repeat_penalty=settings.repeat_penalty,
            max_tokens=max_tokens,
            stop=list(settings.stop) or None,
            seed=settings.seed,
        )
        try:
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    break
                choice = chunk["choices"][0]
                if end is not None and choice.get("finish_reason"):
                    end.finish = "length" if choice["finish_reason"] == "length" else "stop"
                piece = choice.get("text")
                if piece:
                    yield piece
        finally:
            chunks.close()

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None:
            llama.close()
            self._llama = None


# Used when a GGUF carries no template of its own (SmolLM2's format).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MIN_REPLY_TOKENS = 64


def reply_budget(max_tokens: int, context_length: int) -> int:
    """Room kept for the reply when fitting the prompt: what was asked, at most half the window."""
    return max(1, min(max_tokens, context_length // 2))


def fit_messages(render, count, messages: list[ChatMessage], budget: int) -> list[int]:
    """Tokens of the newest part of `messages` that `render` (messages -> tokens) fits in `budget`.

    Keeps the system prompt and the longest run of newest turns that fits (found by bisection:
    a few renders, however long the chat); a kept run never opens with a reply whose question
    is gone. `count` (text -> token count) sizes the cut when the last message alone is too long.
    Shared by the engines so that every one of them forgets the same way.
    """
    system = [m for m in messages[:1] if m.role == "system"]
    turns = messages[len(system):]
    if not turns:
        return render(system)[-budget:] if budget > 0 else []

    def start_at(k: int) -> int:
        while k < len(turns) - 1 and turns[k].role == "assistant":
            k += 1
        return k

    def fits(k: int) -> list[int] | None:
        tokens = render(system + turns[start_at(k):])
        return tokens if len(tokens) <= budget else None

    tokens = fits(0)
    if tokens is not None:
        return tokens
    lo, hi = 0, len(turns) - 1          # fits(lo) fails; does fits(hi) (the last message only)?
    best = fits(hi)
    if best is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            found = fits(mid)
            if found is not None:
                hi, best = mid, found
            else:
                lo = mid
        return best
    # The system prompt and the last message alone are too long: the system prompt goes, then
    # the start of the last message (its end is what the user just said).
    last = turns[-1]
    text = last.content
    while True:
        tokens = render([ChatMessage(last.role, text)])
        if len(tokens) <= budget:
            return tokens
        over = len(tokens) - budget
        cut = int(len(text) * over / max(1, count(text))) + 1
        if cut >= len(text):
            return tokens[-budget:] if budget > 0 else []
        text = text[cut:]


def open_engine(model: str, context_length: int = 2048, threads: int = 0) -> ChatEngine:
    """The engine that serves `model` (any reference the model store resolves).

    A GGUF file, or a personalised model with one beside it, goes to llama.cpp; models with
    adapters that cannot be merged (PAC), PEFT adapters and plain Hugging Face folders go to the
    torch engine.
    """
    from training.model_store import gguf_path, load_torch, resolve

    ref = resolve(model)
    if ref.kind == "gguf" or (ref.kind == "personal" and ref.path and any(ref.path.glob("*.gguf"))):
        return LlamaCppEngine(str(gguf_path(ref)), context_length, threads, ref.display_name)
    from training.torch_engine import PersonalLM, TorchEngine, open_personal_lm

    if ref.kind == "personal" and ref.personal is not None and ref.personal.format in ("pac", "peft"):
        assert ref.path is not None
        return TorchEngine(open_personal_lm(ref.path, ref.personal), ref.display_name, context_length, threads)
    model_, tokenizer = load_torch(ref)
    return TorchEngine(PersonalLM(model_, tokenizer), ref.display_name, context_length, threads)
