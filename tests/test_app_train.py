"""The Train screen runs a short real training job (PAC on a tiny random Llama with SmolLM2's
tokenizer, tests/training_helpers.py, on the household fixture): the data statement is shown
before the start, progress reaches the screen, the model lands in the store; a job cancelled
mid-way is resumed from the screen and finishes."""

from __future__ import annotations

import pytest

from app_helpers import SIZE, make_app, run_async, settle, stories_chat, wait_until, write_config
from app.messages import TrainFinished, TrainProgress
from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

pytestmark = pytest.mark.slow


async def _fill_form(pilot, app, name: str, epochs: int) -> None:
    from textual.widgets import Input, Select

    await pilot.press("f3")
    await pilot.pause()
    screen = app.screen
    screen.query_one("#name", Input).value = name
    screen.query_one("#data", Input).value = str(HOUSEHOLD / "train.jsonl")
    model = screen.query_one("#model", Select)
    # The tiny test model is a local folder, not a catalog entry: offer it as a person could
    # by naming a folder.
    model.set_options([("tiny", str(tiny_llama_dir()))])
    model.value = str(tiny_llama_dir())
    screen.query_one("#epochs", Input).value = str(epochs)
    await pilot.pause()


@run_async
async def test_a_short_training_job_reports_progress_on_the_train_screen(hearth_home, stories_gguf):
    from core.paths import hearth_paths
    from textual.widgets import ProgressBar, Sparkline, Static

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    tiny_llama_dir()
    app = make_app(train_device="this-laptop")
    seen: list[TrainProgress] = []
    done: list[TrainFinished] = []

    def hook(message):
        if isinstance(message, TrainProgress):
            seen.append(message)
        elif isinstance(message, TrainFinished):
            done.append(message)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot, app)
        await _fill_form(pilot, app, "tiny-family", epochs=2)
        statement = str(app.screen.query_one("#data-statement", Static).render())
        assert "train.jsonl" in statement and "stays on this device (this-laptop)" in statement
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: done, 240, "the job to finish")
        await pilot.pause()
        assert done[0].ok, done[0].text
        bar = app.screen.query_one("#bar-0", ProgressBar)
        assert bar.progress == bar.total == 10            # 20 chats, batch 4, 2 epochs
        assert len(app.screen.query_one("#loss", Sparkline).data) == 10
        metrics = str(app.screen.query_one("#train-metrics", Static).render())
        assert "tiny-family is ready" in metrics
    phases = {m.status.phase for m in seen}
    assert "train" in phases and "load" in phases
    train_steps = [m.status for m in seen if m.status.phase == "train"]
    assert train_steps[-1].samples_per_s and train_steps[-1].eta_s is not None
    assert (hearth_paths().models_dir / "tiny-family" / "hearth-model.json").is_file()


@pytest.fixture
def long_job(hearth_home, stories_gguf, monkeypatch):
    """An app (and what its Train screen hears) for a job long enough to interrupt.

    Epochs 2.. of PAC on the tiny model train from the cache in milliseconds, so the whole job
    can end before a key press lands. Each step is held back 50 ms (the training itself is
    untouched) so that a key surely arrives mid-job on any machine."""
    import time

    import training.trainer

    real_train = training.trainer.train

    def train_slowly(spec, resume=False, on_event=None, **kwargs):
        def slow(event):
            time.sleep(0.05)
            if on_event is not None:
                on_event(event)
        return real_train(spec, resume=resume, on_event=slow, **kwargs)

    monkeypatch.setattr(training.trainer, "train", train_slowly)
    write_config(hearth_home, chat=stories_chat(stories_gguf))
    tiny_llama_dir()
    return make_app(), JobMessages()


class JobMessages:
    """What the Train screen hears of a job: each finish, and the step of each progress report."""

    def __init__(self) -> None:
        self.done: list[TrainFinished] = []
        self.steps: list[int] = []

    def hook(self, message) -> None:
        if isinstance(message, TrainFinished):
            self.done.append(message)
        elif isinstance(message, TrainProgress) and message.status.phase == "train":
            self.steps.append(message.status.devices[0].step)


async def _start_long_job(pilot, app, job: JobMessages, name: str) -> None:
    """A 10-epoch job, started and past the end of epoch 1 (5 steps), where a checkpoint is written."""
    await settle(pilot, app)
    await _fill_form(pilot, app, name, epochs=10)
    await pilot.press("ctrl+g")
    await wait_until(pilot, lambda: job.steps and job.steps[-1] >= 6, 240, "epoch 2")


@run_async
async def test_cancelled_job_is_resumed_from_the_train_screen(long_job):
    from core.paths import hearth_paths
    from textual.widgets import Select

    app, job = long_job
    done, steps = job.done, job.steps

    async with app.run_test(size=SIZE, message_hook=job.hook) as pilot:
        await _start_long_job(pilot, app, job, "tiny-resume")
        await pilot.press("ctrl+x")
        await wait_until(pilot, lambda: done, 120, "the cancel")
        assert not done[0].ok and "cancelled" in done[0].text
        assert not (hearth_paths().models_dir / "tiny-resume").exists()
        await wait_until(pilot, lambda: app.screen.query_one("#interrupted", Select).value == "tiny-resume",
                         30, "the interrupted job in the list")
        done.clear()
        steps.clear()
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: done, 240, "the resumed job")
        assert done[0].ok, done[0].text
        assert min(steps) > 5                     # it carried on after the checkpoint
    assert (hearth_paths().models_dir / "tiny-resume" / "hearth-model.json").is_file()


@run_async
async def test_quitting_during_a_job_asks_then_stops_it_at_a_checkpoint(long_job):
    from app.widgets.dialogs import ConfirmDialog
    from core.paths import hearth_paths

    app, job = long_job
    done, steps = job.done, job.steps

    async with app.run_test(size=SIZE, message_hook=job.hook) as pilot:
        await _start_long_job(pilot, app, job, "tiny-quit")
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.press("escape")                       # changed their mind: the job goes on
        await pilot.pause()
        assert app.return_code is None and app.services.train.running()
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: app.return_code is not None, 120, "the app to close")
    # Before this, the app's screen closed while the job's thread kept the process (with no
    # screen) until the last epoch.
    assert not app.services.train.running()
    assert done and not done[0].ok and "cancelled" in done[0].text
    assert not (hearth_paths().models_dir / "tiny-quit").exists()
    [interrupted] = [j for j in app.services.train.interrupted_jobs() if j.name == "tiny-quit"]
    assert 5 <= interrupted.step < 50                            # a checkpoint to resume from


@run_async
async def test_resume_with_nothing_interrupted_starts_nothing_and_ctrl_u_edits(hearth_home, stories_gguf):
    """Resume used to read an empty list's value as a job name and start a job called
    "Select.NULL"; and it sat on Ctrl-U, so clearing an input that way started it."""
    from textual.widgets import Input

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    job = JobMessages()
    async with app.run_test(size=SIZE, message_hook=job.hook) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await settle(pilot, app)
        name = app.screen.query_one("#name", Input)
        name.focus()
        name.cursor_position = len(name.value)
        await pilot.press("ctrl+u")                       # the input's "delete to the start"
        await pilot.pause()
        assert name.value == ""
        await pilot.press("ctrl+r")
        await pilot.pause(0.5)
        assert not app.services.train.running() and not job.done
        assert any("No interrupted job" in str(n.message) for n in app._notifications)


@run_async
async def test_the_form_trains_the_notes_and_the_taught_answers_together(hearth_home, stories_gguf):
    """A family retrains its model after teaching answers in Chat. The form offers what the model
    learnt from before and the taught answers beside it, so the new model keeps both; before,
    it offered the taught answers alone, and the retrained model forgot the notes."""
    import json

    from app.services.train import TrainPlan, TrainService
    from core.paths import hearth_paths
    from textual.widgets import Checkbox, Input, Static
    from tests.training_helpers import write_jsonl

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    household = str((HOUSEHOLD / "train.jsonl").resolve())   # sources are kept resolved
    taught = hearth_paths().teach_file
    taught.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(taught, [{"messages": [{"role": "user", "content": "Bin day?"},
                                       {"role": "assistant", "content": "Tuesday."}]}] * 2)
    TrainService("here").run(TrainPlan("family", [household], str(tiny_llama_dir()), method="lora", epochs=1),
                             lambda status: None)
    app = make_app()
    done: list[TrainFinished] = []
    hook = lambda message: done.append(message) if isinstance(message, TrainFinished) else None  # noqa: E731
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await pilot.pause()
        assert app.screen.query_one("#data", Input).value == household    # what family learnt from
        await _fill_form(pilot, app, "family", epochs=1)
        screen = app.screen

        def statement() -> str:
            return str(screen.query_one("#data-statement", Static).render())

        box = screen.query_one("#taught", Checkbox)
        assert box.value and str(box.label) == "Also the 2 answers taught in Chat"
        assert "Your data (train.jsonl, taught.jsonl) stays on this device" in statement()
        assert "A model named family exists" in statement() and "learnt from" not in statement()
        screen.query_one("#data", Input).value = ""
        await pilot.pause()
        assert "It learnt from train.jsonl too; this job leaves it out" in statement()

        # More answers taught in Chat show when the form is seen again; a box unticked stays so.
        box.value = False
        with open(taught, "a", encoding="utf-8") as f:
            f.write(json.dumps({"messages": [{"role": "user", "content": "Cat?"},
                                             {"role": "assistant", "content": "Mia feeds her."}]}) + "\n")
        await pilot.press("f1")
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        assert str(box.label) == "Also the 3 answers taught in Chat" and not box.value
        box.value = True
        screen.query_one("#data", Input).value = household
        await pilot.pause()
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: done, 240, "the job to finish")
        assert done[0].ok, done[0].text
    manifest = json.loads((hearth_paths().models_dir / "family" / "hearth-model.json").read_text("utf-8"))
    assert manifest["details"]["samples"] == 20 + 3
    assert manifest["details"]["spec"]["data"] == [household, str(taught.resolve())]


@run_async
async def test_the_form_on_a_first_run_offers_no_data_and_says_what_to_choose(hearth_home, stories_gguf):
    from textual.widgets import Checkbox, Input

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await pilot.pause()
        box = app.screen.query_one("#taught", Checkbox)
        assert box.disabled and not box.value
        assert str(box.label) == "Also answers taught in Chat (none yet)"
        assert app.screen.query_one("#data", Input).value == ""
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert any("data: choose a folder of notes or a JSONL of chats (or teach answers in Chat)" in str(n.message)
                   for n in app._notifications)
        assert not app.services.train.running()


@run_async
async def test_the_form_offers_every_source_a_model_learnt_from(hearth_home, stories_gguf, tmp_path):
    """A model trained from the command line on two sources: the form offered the first alone,
    and said the other would be left out, with no way to add it."""
    from app.services.train import TrainPlan, TrainService
    from textual.widgets import Input, Static

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    household = str((HOUSEHOLD / "train.jsonl").resolve())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "garden.md").write_text("The tomatoes are watered on Sundays.", "utf-8")
    TrainService("here").run(TrainPlan("family", [household, str(notes)], str(tiny_llama_dir()), method="lora",
                                       epochs=1), lambda status: None)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await pilot.pause()
        screen = app.screen
        box = screen.query_one("#data", Input)
        assert box.value == f"{household}; {notes.resolve()}"
        assert screen.plan().data == [household, str(notes.resolve())]
        statement = lambda: str(screen.query_one("#data-statement", Static).render())  # noqa: E731
        assert "Your data (train.jsonl, notes) stays on this device" in statement()
        assert "learnt from" not in statement()
        box.value = household
        await pilot.pause()
        assert "It learnt from notes too; this job leaves it out" in statement()
