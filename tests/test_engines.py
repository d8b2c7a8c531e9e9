"""Chat engines: llama.cpp with the bundled SmolLM2-135M — long chats fit the context, replies can
be cancelled mid-way, stop strings end them; `fit_messages` forgets the oldest turns first."""

from __future__ import annotations

import threading

import pytest

from training.catalog import find_entry
from training.engines import ChatMessage, LlamaCppEngine, SamplingSettings, fit_messages

GREEDY = dict(temperature=0.0)   # with the default repeat penalty, as chat uses


@pytest.fixture(scope="module")
def engine():
    gguf = find_entry("smollm2-135m").bundled_path()
    assert gguf is not None, "the bundled SmolLM2 GGUF is not installed"
    eng = LlamaCppEngine(str(gguf), context_length=512, threads=2)
    yield eng
    eng.close()


def long_chat(turns: int) -> list[ChatMessage]:
    messages = [ChatMessage("system", "You are Hearth, a helpful assistant.")]
    for i in range(turns):
        messages.append(ChatMessage("user", f"Tell me fact number {i} about rivers, please, in some detail."))
        messages.append(ChatMessage("assistant", "Rivers carry water from the hills down to the sea. " * 3))
    messages.append(ChatMessage("user", "What is the capital of France?"))
    return messages


def test_long_chat_stays_within_context_and_still_answers(engine):
    messages = long_chat(80)                       # about 5,000 tokens against a 512-token window
    assert len(engine.prompt_tokens(messages)) > 4 * engine.context_length
    prompt = engine.fit_context(messages, 128)
    assert len(prompt) <= engine.context_length - 128
    text = engine._llama.detokenize(prompt, special=True).decode()
    assert text.startswith("<|im_start|>system\nYou are Hearth")        # the system prompt stays
    assert "capital of France" in text and "fact number 79" in text       # the newest turns stay
    assert "fact number 0 " not in text                                   # the oldest went
    reply = "".join(engine.stream(messages, SamplingSettings(max_tokens=24, **GREEDY)))
    assert "Paris" in reply


def test_a_message_longer_than_the_window_does_not_crash(engine):
    huge = [ChatMessage("system", "Be brief."), ChatMessage("user", "tell me about the sea " * 2000)]
    prompt = engine.fit_context(huge, 64)
    assert 0 < len(prompt) <= engine.context_length - 64
    list(engine.stream(huge, SamplingSettings(max_tokens=8, **GREEDY)))   # answers or not, never raises


def test_cancel_stops_a_reply_mid_way(engine):
    question = [ChatMessage("user", "What is the capital of France?")]
    before = "".join(engine.stream(question, SamplingSettings(max_tokens=16, **GREEDY)))
    cancel = threading.Event()
    pieces = []
    for piece in engine.stream([ChatMessage("user", "Write a long story about a dragon.")],
                               SamplingSettings(max_tokens=300, **GREEDY), cancel):
        pieces.append(piece)
        if len(pieces) == 5:
            cancel.set()
    assert len(pieces) == 5
    # The engine is intact straight after a cancelled reply: the same question, the same answer.
    after = "".join(engine.stream(question, SamplingSettings(max_tokens=16, **GREEDY)))
    assert after == before and "Paris" in after


def test_stop_strings_end_the_reply_before_them(engine):
    messages = [ChatMessage("user", "What is the capital of France?")]
    full = "".join(engine.stream(messages, SamplingSettings(max_tokens=24, **GREEDY)))
    assert "Paris" in full
    cut = "".join(engine.stream(messages, SamplingSettings(max_tokens=24, stop=["Paris"], **GREEDY)))
    assert "Paris" not in cut and full.startswith(cut)


def test_max_tokens_bounds_the_reply(engine):
    reply = "".join(engine.stream([ChatMessage("user", "Write a long story about a dragon.")],
                                  SamplingSettings(max_tokens=10, **GREEDY)))
    assert 0 < engine.count_tokens(reply) <= 11


def _words(messages: list[ChatMessage]) -> list[str]:
    """A stand-in renderer: one token per word, two for each role marker."""
    out: list[str] = []
    for m in messages:
        out += [f"<{m.role}>", "|"] + m.content.split()
    return out


def test_fit_messages_drops_oldest_turns_and_their_orphaned_replies():
    messages = [ChatMessage("system", "be nice"),
                ChatMessage("user", "one two three"), ChatMessage("assistant", "four five six"),
                ChatMessage("user", "seven eight"), ChatMessage("assistant", "nine ten"),
                ChatMessage("user", "last question")]
    kept = fit_messages(_words, lambda t: len(t.split()), messages, budget=16)
    assert kept[:4] == ["<system>", "|", "be", "nice"]
    assert kept[-4:] == ["<user>", "|", "last", "question"]
    assert "one" not in kept and "four" not in kept
    assert kept[4] == "<user>"        # never opens with a reply whose question is gone
    assert len(kept) <= 16


def test_fit_messages_cuts_the_start_of_an_overlong_last_message():
    messages = [ChatMessage("system", "s " * 50), ChatMessage("user", " ".join(f"w{i}" for i in range(100)))]
    kept = fit_messages(_words, lambda t: len(t.split()), messages, budget=20)
    assert 0 < len(kept) <= 20
    assert kept[-1] == "w99"          # the end of what the user said is kept


def test_the_torch_engine_forgets_a_long_chat_the_same_way():
    """The torch engine (PAC and PEFT models) fits a long chat with the shared `fit_messages`:
    system prompt kept, newest turns kept, oldest gone, within the window."""
    from tests.training_helpers import tiny_llama_dir
    from training.engines import open_engine

    torch_engine = open_engine(str(tiny_llama_dir()), context_length=512, threads=2)
    messages = long_chat(80)
    prompt = torch_engine.fit_context(messages, 128)
    assert 0 < len(prompt) <= torch_engine.context_length - 128
    text = torch_engine.lm.tokenizer.decode(prompt)
    assert "You are Hearth" in text.split("<|im_start|>user")[0]          # the system prompt stays
    assert "capital of France" in text and "fact number 79" in text
    assert "fact number 0 " not in text
    huge = [ChatMessage("system", "Be brief."), ChatMessage("user", "tell me about the sea " * 2000)]
    assert 0 < len(torch_engine.fit_context(huge, 64)) <= torch_engine.context_length - 64
    torch_engine.close()
