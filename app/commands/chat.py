"""`hearth chat`: streamed chat in the terminal.

On a terminal: type a message, the answer streams; Ctrl-C stops the answer (not the program);
Ctrl-D or /quit ends. When stdin is not a terminal, each input line is one user turn and each
answer is printed in full on its own line, so scripts can use it; end of input ends the chat.
"""

from __future__ import annotations

import argparse
import sys
import threading


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="streamed chat in the terminal", description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", help="model to chat with (default: chat.model of the config)")
    p.add_argument("--system", help="system prompt (default: chat.system_prompt of the config)")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--max-tokens", type=int, help="longest answer, in tokens")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible answers")
    p.add_argument("--no-history", action="store_true", help="do not record this conversation in the chat history")
    return p


def run(args: argparse.Namespace) -> int:
    from core.config import load_config
    from app.commands.models import fetch
    from training.engines import ChatMessage, SamplingSettings, open_engine

    config = load_config()
    chat = config.section("chat")
    settings = SamplingSettings.from_config(chat)
    if getattr(args, "temperature", None) is not None:
        settings.temperature = args.temperature
    if getattr(args, "max_tokens", None):
        settings.max_tokens = args.max_tokens
    settings.seed = getattr(args, "seed", None)
    model = getattr(args, "model", None) or chat["model"]
    system = getattr(args, "system", None) or chat["system_prompt"]

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Loading {model}...", file=sys.stderr, flush=True)
    fetch(model)
    engine = open_engine(model, int(chat["context_length"]), int(chat["threads"]))
    messages = [ChatMessage("system", system)] if system else []
    # The conversation goes into the chat history (serving/history.py) as the app's do; it is
    # created at the first question, so a session with none leaves nothing behind.
    history = None if getattr(args, "no_history", False) else _History(model, system, settings)
    if interactive:
        print(f"Chatting with {engine.name}. Ctrl-C stops an answer, Ctrl-D quits.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("", file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if interactive and text in ("/quit", "/exit"):
                break
            messages.append(ChatMessage("user", text))
            if history:
                history.add("user", text)
            reply = _answer(engine, messages, settings, interactive)
            messages.append(ChatMessage("assistant", reply))
            if history and reply:
                history.add("assistant", reply, engine.name)
    finally:
        engine.close()
    return 0


class _History:
    def __init__(self, model: str, system: str, settings) -> None:
        from serving.history import History

        self._store = History()
        self._model, self._system, self._settings = model, system, settings
        self._conversation_id: int | None = None

    def add(self, role: str, text: str, model: str = "") -> None:
        if self._conversation_id is None:
            s = self._settings
            self._conversation_id = self._store.new_conversation(
                self._model, self._system, settings={"temperature": s.temperature, "top_p": s.top_p,
                                                      "repeat_penalty": s.repeat_penalty, "max_tokens": s.max_tokens},
            ).id
        self._store.add_message(self._conversation_id, role, text, model)


def _answer(engine, messages, settings, interactive: bool) -> str:
    cancel = threading.Event()
    pieces: list[str] = []
    if interactive:
        print("hearth> ", end="", flush=True)
    try:
        for piece in engine.stream(messages, settings, cancel):
            pieces.append(piece)
            if interactive:
                print(piece, end="", flush=True)
    except KeyboardInterrupt:
        cancel.set()
        if interactive:
            print(" [stopped]", end="")
    reply = "".join(pieces).strip()
    if interactive:
        print(flush=True)
    else:
        print(reply.replace("\n", " "), flush=True)
    return reply
