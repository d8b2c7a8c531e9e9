"""The Chat screen, driven with Textual's pilot against real services: a real SQLite history in a
private HEARTH_HOME and a real model through llama.cpp (stories260K where any text will do, the
bundled SmolLM2 where an answer must be long enough to stop mid-stream)."""

from __future__ import annotations

import contextlib
import json

import pytest

from app_helpers import SIZE, make_app, run_async, settle, stories_chat, wait_until, write_config
from app.messages import ReplyFinished, ReplyProgress
from app.widgets.message_view import MessageView
from app.widgets.prompt_input import PromptInput
from serving.history import History

pytestmark = pytest.mark.slow


def _views(app) -> list[MessageView]:
    return list(app.screen.query(MessageView))


async def _ask(pilot, app, text: str) -> None:
    await pilot.click("#prompt")
    app.screen.query_one("#prompt", PromptInput).value = text
    await pilot.press("enter")


async def _answered(pilot, app, timeout: float = 90.0) -> None:
    await wait_until(pilot, lambda: app.screen._stream_conversation is None, timeout, "the answer to end")
    await pilot.pause()


@run_async
async def test_first_run_opens_chat_with_focus_and_three_steps_and_answers_on_bundled_model(hearth_home):
    write_config(hearth_home, chat={"max_tokens": 24, "threads": 2})
    app = make_app()
    posted = []
    async with app.run_test(size=SIZE, message_hook=posted.append) as pilot:
        await settle(pilot, app)
        assert app.current_mode == "chat"
        assert isinstance(app.focused, PromptInput)
        guide = app.screen.query_one("#guide")
        assert guide.display and "1. Pair" in str(guide.render()) and "2. Teach" in str(guide.render())
        await _ask(pilot, app, "What is the capital of France?")
        await _answered(pilot, app)
    # The hook sees a message once per pump that dispatches it: count each object once.
    answers = list({id(m): m for m in posted if isinstance(m, ReplyFinished)}.values())
    assert len(answers) == 1 and answers[0].text and not answers[0].stopped
    history = History()
    [conv] = history.conversations()
    assert conv.model == "smollm2-135m"
    assert [(m.role, m.content) for m in history.messages(conv.id)] == [
        ("user", "What is the capital of France?"), ("assistant", answers[0].text)]


@run_async
async def test_an_80_column_terminal_gives_the_conversation_and_training_progress_room(hearth_home):
    write_config(hearth_home, chat={"max_tokens": 24, "threads": 2})
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        screen = app.screen
        # On a first run the guide would take 36 of the 80 columns and leave the answer 16: its
        # three-line form stands above the conversation instead.
        assert not screen.query_one("#guide").display
        short = screen.query_one("#guide-short")
        assert short.display and short.outer_size.height <= 4
        assert all(step in str(short.render()) for step in ("1. Pair", "2. Teach", "3. Chat"))
        screen.set_guide(False)                     # not a first run: neither form
        await pilot.pause()
        assert not short.display and not screen.query_one("#guide").display
        screen.set_guide(True)
        await pilot.pause()
        assert screen.query_one("#sidebar").outer_size.width == 22
        assert screen.query_one("#main").size.width >= 50
        await pilot.press("f3")                     # the Train form leaves its progress panel room
        await pilot.pause()
        assert app.screen.query_one("#train-form").outer_size.width == 50
        await pilot.press("f1")
        await pilot.pause()
        await pilot.resize_terminal(130, 30)
        await pilot.pause()
        assert screen.query_one("#guide").display   # room again: the guide is back
        assert not screen.query_one("#guide-short").display


@run_async
async def test_streamed_answer_appears_and_is_stored(hearth_home, stories_gguf):
    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await _ask(pilot, app, "Once upon a time")
        await _answered(pilot, app)
        views = _views(app)
        assert [v.role for v in views] == ["user", "assistant"]
        stored = History().messages(app.screen.conversation_id)
        assert views[1].text == stored[1].content and stored[1].content
        assert views[1].message_id == stored[1].id


@run_async
async def test_escape_stops_an_answer_mid_stream_and_keeps_what_came(hearth_home):
    write_config(hearth_home, chat={"max_tokens": 400, "threads": 2, "temperature": 0.7})
    app = make_app()
    progress = []

    def hook(message):
        if isinstance(message, ReplyProgress):
            progress.append(message)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot, app)
        await _ask(pilot, app, "Write a very long story about a dragon who learns to bake bread.")
        await wait_until(pilot, lambda: progress, 90, "the first streamed words")
        await pilot.press("escape")
        await _answered(pilot, app)
        stored = History().messages(app.screen.conversation_id)
        assert stored[-1].role == "assistant" and stored[-1].stopped
        assert stored[-1].content.startswith(progress[0].text.strip()[:10])
        assert "stopped" in str(_views(app)[-1].query_one(".who").render())


@run_async
async def test_stream_stays_in_the_conversation_it_started_in(hearth_home, monkeypatch):
    import time

    from training.engines import LlamaCppEngine

    # The new chat must open while the answer is still streaming. The model may end its answer
    # early (end of sequence) and a fast machine streams it in a blink, so each piece is held
    # back 50 ms here (the model and the app are untouched) and the key is pressed once the
    # first words have arrived.
    real_stream = LlamaCppEngine.stream

    def slow_stream(self, messages, settings, cancel=None):
        for piece in real_stream(self, messages, settings, cancel):
            time.sleep(0.05)
            yield piece

    monkeypatch.setattr(LlamaCppEngine, "stream", slow_stream)
    write_config(hearth_home, chat={"max_tokens": 60, "threads": 2})
    app = make_app()
    progress = []

    def hook(message):
        if isinstance(message, ReplyProgress):
            progress.append(message)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot, app)
        await _ask(pilot, app, "Write a very long story about the moon and the sea.")
        await wait_until(pilot, lambda: progress, 90, "the first streamed words")
        first = app.screen.conversation_id
        await pilot.press("ctrl+n")          # a new chat while the answer streams
        assert app.screen._stream_conversation == first
        await pilot.pause()
        assert app.screen.conversation_id is None and not _views(app)
        await _answered(pilot, app)
        assert not _views(app)                # nothing leaked into the new chat
        stored = History().messages(first)
        assert [m.role for m in stored] == ["user", "assistant"] and stored[1].content


@run_async
async def test_regenerate_replaces_the_last_answer(hearth_home, stories_gguf):
    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await _ask(pilot, app, "Once upon a time")
        await _answered(pilot, app)
        old = History().messages(app.screen.conversation_id)[-1]
        await pilot.press("ctrl+r")
        await pilot.pause()
        await _answered(pilot, app)
        stored = History().messages(app.screen.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[-1].created > old.created   # a new answer (SQLite may reuse the freed id)
        assert [v.role for v in _views(app)] == ["user", "assistant"]


async def _palette(pilot, command: str) -> None:
    """Run a command of the palette (Ctrl-P) by typing its words."""
    await pilot.press("ctrl+p")
    await pilot.press(*command)
    await pilot.pause(0.5)
    await pilot.press("enter")


def _seed_history(system: str = "") -> int:
    history = History()
    conv = history.new_conversation("smollm2-135m", system)
    history.add_message(conv.id, "user", "How do I print in Python?")
    history.add_message(conv.id, "assistant", "Like this:\n\n```python\nprint('hello')\n```\n\nThat is all.")
    return conv.id


@contextlib.asynccontextmanager
async def _on_seeded_history(hearth_home, stories_gguf, system: str = "", **config):
    """The app settled on its Chat screen over a history of one answered question (its id)."""
    write_config(hearth_home, chat=stories_chat(stories_gguf), **config)
    conv_id = _seed_history(system)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        yield app, pilot, conv_id


@run_async
async def test_teach_saves_the_corrected_answer_as_training_data(hearth_home, stories_gguf):
    from core.paths import hearth_paths
    from textual.widgets import TextArea

    async with _on_seeded_history(hearth_home, stories_gguf, "Be brief.") as (app, pilot, conv_id):
        assert app.screen.conversation_id == conv_id
        await pilot.press("ctrl+t")
        await pilot.pause()
        area = app.screen.query_one(TextArea)
        area.text = "Use print: `print('hello')`."
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen.id == "chat-screen"
    [line] = hearth_paths().teach_file.read_text().splitlines()
    assert json.loads(line)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I print in Python?"},
        {"role": "assistant", "content": "Use print: `print('hello')`."},
    ]


@run_async
async def test_copy_a_message_and_its_code_block(hearth_home, stories_gguf):
    async with _on_seeded_history(hearth_home, stories_gguf) as (app, pilot, _):
        await pilot.press("ctrl+b")
        assert app.clipboard == "print('hello')"
        await pilot.press("ctrl+y")
        assert app.clipboard.startswith("Like this:") and app.clipboard.endswith("That is all.")
        # A selected message (focused) is the one copied.
        _views(app)[0].focus()
        await pilot.press("ctrl+y")
        assert app.clipboard == "How do I print in Python?"


@run_async
async def test_export_and_system_prompt_from_the_command_palette(hearth_home, stories_gguf):
    from core.paths import hearth_paths
    from textual.widgets import TextArea

    async with _on_seeded_history(hearth_home, stories_gguf) as (app, pilot, conv_id):
        await _palette(pilot, "export to markdown")
        await settle(pilot, app)
        exported = hearth_paths().exports_dir / f"conversation-{conv_id}.md"
        assert exported.read_text().startswith("# How do I print in Python?")
        await pilot.press("ctrl+o")
        await pilot.pause()
        app.screen.query_one(TextArea).text = "Answer like a pirate."
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert History().conversation(conv_id).system_prompt == "Answer like a pirate."


@run_async
async def test_prompt_history_walks_with_up_and_down(hearth_home, stories_gguf):
    async with _on_seeded_history(hearth_home, stories_gguf) as (app, pilot, _):
        prompt = app.screen.query_one("#prompt", PromptInput)
        prompt.focus()
        await pilot.press(*"draft")
        await pilot.press("up")
        assert prompt.value == "How do I print in Python?"
        await pilot.press("down")
        assert prompt.value == "draft"


@run_async
async def test_keys_come_from_the_config_and_ctrl_q_quits_from_a_dialog(hearth_home, stories_gguf):
    keys = {"new_chat": "ctrl+l", "models": "f9"}
    async with _on_seeded_history(hearth_home, stories_gguf, keys=keys) as (app, pilot, _):
        assert app.screen.conversation_id is not None
        await pilot.press("ctrl+l")
        assert app.screen.conversation_id is None
        await pilot.press("f9")
        await pilot.pause()
        assert app.current_mode == "models"
        await pilot.press("f1")
        await pilot.press("ctrl+o")           # a modal dialog is open...
        await pilot.pause()
        await pilot.press("ctrl+q")           # ...and Ctrl-Q still quits
        await pilot.pause()
    assert app.return_code == 0 and not app.is_running


def test_unknown_key_action_in_config_is_a_one_line_error(hearth_home):
    from core.errors import HearthError

    write_config(hearth_home, keys={"launch_rockets": "f5"})
    with pytest.raises(HearthError, match="keys.launch_rockets"):
        make_app()


def test_theme_follows_the_terminal_background_or_the_config(hearth_home, monkeypatch):
    from app.hearth_app import choose_theme
    from core.errors import HearthError

    monkeypatch.setenv("COLORFGBG", "0;15")
    assert choose_theme("auto") == "textual-light"
    monkeypatch.setenv("COLORFGBG", "15;0")
    assert choose_theme("auto") == "textual-dark"
    assert choose_theme("light") == "textual-light"
    write_config(hearth_home, app={"theme": "no-such-theme"})
    with pytest.raises(HearthError, match="app.theme"):
        from app.hearth_app import HearthApp
        from app.services import build_services

        HearthApp(build_services())


@run_async
async def test_deleting_a_conversation_asks_then_erases_it(hearth_home, stories_gguf):
    # Deleting erases the text from the file (serving/history.py): it asks first, as it cannot be undone.
    from app.widgets.dialogs import ConfirmDialog

    async with _on_seeded_history(hearth_home, stories_gguf) as (app, pilot, conv_id):
        for answer in ("escape", "yes"):
            await _palette(pilot, "delete conversation")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
            if answer == "escape":
                await pilot.press("escape")
                await pilot.pause()
                assert [c.id for c in History().conversations()] == [conv_id]
            else:
                await pilot.click("#yes")
                await settle(pilot, app)
        assert History().conversations() == []
        assert len(app.screen.query_one("#conversations").children) == 0


@run_async
async def test_the_chat_says_when_its_model_was_retrained_and_loads_it(hearth_home):
    """The app's chat loads a model retrained while it is open before the next answer, and says
    so; a change that does not load leaves the one before answering, with a warning (it left
    the chat with no model)."""
    from core.paths import hearth_paths
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir
    from training.job import JobSpec
    from training.model_store import MANIFEST
    from training.trainer import train

    def retrain() -> None:
        train(JobSpec("family", [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()), method="lora", epochs=1))

    def said(text: str) -> list[str]:
        return [severity for message, severity in notes if text in message]

    retrain()
    write_config(hearth_home, chat={"model": "family", "threads": 1, "max_tokens": 3, "temperature": 0.0,
                                    "context_length": 512})
    app = make_app()
    notes: list[tuple[str, str]] = []   # notifications time out of the screen: keep what was said
    notify = app.notify

    def keep(message, *args, severity="information", **kwargs):
        notes.append((str(message), severity))
        return notify(message, *args, severity=severity, **kwargs)

    app.notify = keep
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await _ask(pilot, app, "hello")
        await _answered(pilot, app)
        assert not said("changed on disk")
        retrain()
        await _ask(pilot, app, "hello again")
        await _answered(pilot, app)
        assert said("loaded again") == ["information"]
        (hearth_paths().models_dir / "family" / MANIFEST).write_text("{not json")
        await _ask(pilot, app, "and again")
        await _answered(pilot, app)
        assert said("did not load") == ["warning"]
        stored = History().messages(app.screen.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant"] * 3   # every question answered
