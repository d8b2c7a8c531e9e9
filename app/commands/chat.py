"""`hearth chat`: streamed chat in the terminal.

On a terminal: type a message, the answer streams; Ctrl-C stops the answer (not the program);
Ctrl-D or /quit ends. When stdin is not a terminal, each input line is one user turn and each
answer is printed in full on its own line, so scripts can use it; end of input ends the chat.
A closed terminal (SIGHUP) or SIGTERM stops an answer at its next token, keeps what it had said
in the history, and ends the program (status 129 / 143). A model retrained or exported while
the chat is open is loaded again before the next answer (said on stderr).
"""

from __future__ import annotations

import argparse
import os
import signal
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
    from serving.reload import Reload
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
    # A model retrained or exported while the chat is open is loaded again before the next answer.
    reload = Reload(model, lambda: open_engine(model, int(chat["context_length"]), int(chat["threads"])),
                    lambda message, loaded: print(message, file=sys.stderr, flush=True))
    engine = reload.open()
    messages = [ChatMessage("system", system)] if system else []
    # The conversation goes into the chat history (serving/history.py) as the app's do; it is
    # created at the first question, so a session with none leaves nothing behind.
    history = None if getattr(args, "no_history", False) else _History(model, system, settings)
    if interactive:
        print(f"Chatting with {engine.name}. Ctrl-C stops an answer, Ctrl-D quits.", file=sys.stderr)
    signals = _Signals()
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, OSError):   # OSError: the terminal has gone (its SIGHUP follows)
                break
            except KeyboardInterrupt:
                print("", file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if interactive and text in ("/quit", "/exit"):
                break
            cancel = signals.answering = threading.Event()
            messages.append(ChatMessage("user", text))
            if history:
                history.add("user", text)
            engine = reload.fresh(engine)
            reply = _answer(engine, messages, settings, interactive, cancel, signals)
            messages.append(ChatMessage("assistant", reply))
            if history and reply:
                history.add("assistant", reply, engine.name)
            signals.answering = None
            if signals.received:
                break
    except _Left:
        pass
    finally:
        engine.close()
    return 128 + signals.received if signals.received else 0


class _Left(Exception):
    """A signal came at the prompt: nothing in flight, the program leaves at once."""


class _Signals:
    """SIGHUP (the terminal closed) and SIGTERM: an answer in flight stops at its next token and
    is recorded before the program leaves; at the prompt it leaves at once."""

    def __init__(self) -> None:
        self.received = 0                            # the first signal, once one came
        self.answering: threading.Event | None = None  # the cancel of the answer in flight
        for number in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(number, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        if self.answering is not None:
            self.answering.set()
        else:
            raise _Left()


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


def _answer(engine, messages, settings, interactive: bool, cancel: threading.Event, signals: _Signals) -> str:
    """The reply, or what it had said when stopped (Ctrl-C, a signal, the terminal gone)."""
    pieces: list[str] = []

    def show(text: str) -> None:
        try:
            print(text, end="", flush=True)
        except OSError:   # the terminal has gone before its SIGHUP came: leave as if it had
            _silence()
            signals.received = signals.received or signal.SIGHUP
            cancel.set()

    if interactive:
        show("hearth> ")
    try:
        for piece in engine.stream(messages, settings, cancel):
            pieces.append(piece)
            if interactive:
                show(piece)
    except KeyboardInterrupt:
        cancel.set()
    reply = "".join(pieces).strip()
    if interactive:
        show(" [stopped]\n" if cancel.is_set() else "\n")
    else:
        show(reply.replace("\n", " ") + "\n")
    return reply


def _silence() -> None:
    """Send what is left to print to /dev/null (a write to a closed terminal fails, at exit too)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
