"""The Models screen on the real model store: the bundled base model and a personalised model
trained for the test (LoRA on the tiny Llama: LoRA merges into the weights, so it exports); set active, export to GGUF, delete with confirmation."""

from __future__ import annotations

import time

import pytest

from app_helpers import SIZE, make_app, run_async, settle, stories_chat, wait_until, write_config
from app.widgets.dialogs import ConfirmDialog
from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

pytestmark = pytest.mark.slow


def _train_tiny(name: str, method: str = "lora") -> None:
    from app.services.train import TrainPlan, TrainService

    TrainService("here").run(TrainPlan(name, [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()),
                                       method=method, epochs=1),
                             lambda status: None)


async def _open_models(pilot, app) -> None:
    await settle(pilot, app)
    await pilot.press("f4")
    await wait_until(pilot, lambda: getattr(app.screen, "rows", None), 30, "the model list")


def _select(app, name: str) -> None:
    table = app.screen.query_one("#model-table")
    table.move_cursor(row=[m.name for m in app.screen.rows].index(name))
    table.focus()


@run_async
async def test_models_screen_sets_active_exports_and_deletes(hearth_home, stories_gguf):
    from core.config import load_config
    from core.paths import hearth_paths

    write_config(hearth_home, chat=stories_chat(stories_gguf, model="smollm2-135m"))
    _train_tiny("tiny-notes")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _open_models(pilot, app)
        rows = {m.name: m for m in app.screen.rows}
        assert rows["smollm2-135m"].active and rows["smollm2-135m"].available and rows["smollm2-135m"].has_gguf
        tiny = rows["tiny-notes"]
        assert tiny.kind == "personal" and tiny.trained.startswith("lora on") and not tiny.has_gguf

        _select(app, "tiny-notes")
        await pilot.press("e")
        status = app.screen.query_one("#models-status")
        await wait_until(pilot, lambda: "Exporting" not in str(status.render()), 180, "the export")
        assert "Exported tiny-notes" in str(status.render()), status.render()
        assert any(hearth_paths().models_dir.glob("tiny-notes/*.gguf"))
        await wait_until(pilot, lambda: {m.name: m for m in app.screen.rows}["tiny-notes"].has_gguf, 30, "the refresh")

        _select(app, "tiny-notes")
        await pilot.press("a")
        await settle(pilot, app)
        assert load_config().get("chat.model") == "tiny-notes"
        # The active model cannot be deleted: make the base active again first.
        _select(app, "smollm2-135m")
        await pilot.press("a")
        await settle(pilot, app)

        _select(app, "tiny-notes")
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the confirmation")
        await pilot.pause(0.3)
        await pilot.click("#yes")
        await wait_until(pilot, lambda: not (hearth_paths().models_dir / "tiny-notes").exists(), 30, "the delete")
        await settle(pilot, app)
        assert "tiny-notes" not in [m.name for m in app.screen.rows]


@run_async
async def test_base_models_cannot_be_deleted(hearth_home, stories_gguf):
    from training.catalog import find_entry

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _open_models(pilot, app)
        _select(app, "smollm2-135m")
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)
    assert find_entry("smollm2-135m").bundled_path().is_file()


@run_async
async def test_a_catalog_model_is_downloaded_stopped_fetched_and_chat_uses_it(
        hearth_home, stories_gguf, hub_mirror, monkeypatch):
    """The Models screen downloads a catalog model from a hub on loopback (tests/hub_helpers.py,
    serving a small model under SmolLM2-360M's hub id): refused as chat model before, progress
    while it comes, stopped half-way with x, downloaded again, then set active for new conversations."""
    from core.config import load_config

    from app.screens.models import DownloadProgress

    _slow_catalog_hub(hearth_home, stories_gguf, hub_mirror, monkeypatch)
    app = make_app()
    progress: list[str] = []

    def hook(message):
        if isinstance(message, DownloadProgress):
            progress.append(message.text)

    def row(name: str):
        return {m.name: m for m in app.screen.rows}[name]

    def status() -> str:
        return str(app.screen.query_one("#models-status").render())

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await _open_models(pilot, app)
        assert not row("smollm2-360m").available
        _select(app, "smollm2-360m")
        await pilot.press("a")                 # not here yet: chat keeps its model
        await pilot.pause()
        assert load_config().get("chat.model") == "smollm2-135m"

        await pilot.press("g")
        await wait_until(pilot, lambda: any(" 0 of" not in p for p in progress), 60, "some MB to arrive")
        assert app.screen.check_action("stop_download", ()) is True
        await pilot.press("x")
        await wait_until(pilot, lambda: "stopped" in status(), 30, "the stop")
        assert not row("smollm2-360m").available
        assert app.screen.check_action("stop_download", ()) is False   # gone from the footer
        first = hub_mirror.gets("model.safetensors")
        assert first and first[-1].bytes_sent < len(hub_mirror.files["model.safetensors"])
        # Stopped, the child deleted its partial file (it would stay in the cache for ever).
        assert not list(_blobs(hearth_home).glob("*.incomplete"))

        hub_mirror.slow = 0.0
        _select(app, "smollm2-360m")
        await pilot.press("g")
        await wait_until(pilot, lambda: "Downloaded smollm2-360m" in status(), 120, "the download")
        await wait_until(pilot, lambda: row("smollm2-360m").available, 30, "the refresh")

        _select(app, "smollm2-360m")
        await pilot.press("a")
        await settle(pilot, app)
        assert load_config().get("chat.model") == "smollm2-360m"
        # The chat service follows at once: a new conversation uses it without a restart.
        assert app.services.chat.new_conversation().model == "smollm2-360m"


@run_async
async def test_quitting_during_a_download_asks_then_stops_it(hearth_home, stories_gguf, hub_mirror, monkeypatch):
    # Ctrl-Q used to close at once and throw the download away unasked.
    _slow_catalog_hub(hearth_home, stories_gguf, hub_mirror, monkeypatch)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _open_models(pilot, app)
        _select(app, "smollm2-360m")
        await pilot.press("g")
        await wait_until(pilot, lambda: hub_mirror.gets("model.safetensors"), 60, "the download to start")
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        question = str(app.screen.query_one("#question").render())
        assert question.startswith("smollm2-360m is downloading: stopped, the files already complete are kept")
        await pilot.press("escape")                           # changed their mind: it goes on
        await pilot.pause()
        assert app.return_code is None and app.services.models.downloading() == ["smollm2-360m"]
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: app.return_code is not None, 30, "the app to close")
    deadline = time.monotonic() + 30
    while app.services.models.downloading():      # the child is stopped as the app closes
        assert time.monotonic() < deadline, "the download is still running"
        time.sleep(0.1)
    sent = hub_mirror.gets("model.safetensors")[-1].bytes_sent
    assert sent < len(hub_mirror.files["model.safetensors"])
    assert not list(_blobs(hearth_home).glob("*.incomplete"))


def _slow_catalog_hub(hearth_home, stories_gguf, hub_mirror, monkeypatch) -> None:
    """A hub on loopback (tests/hub_helpers.py) serving a small model under SmolLM2-360M's id,
    slowly enough that a stop lands half-way (23 MB at ~3 MB/s); chat keeps the bundled model."""
    from hub_helpers import hub_env

    hub_mirror.repo_id = "HuggingFaceTB/SmolLM2-360M-Instruct"
    hub_mirror.slow = 0.3
    for name, value in hub_env(hub_mirror.url).items():     # the download runs in a child process
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    write_config(hearth_home, chat=stories_chat(stories_gguf, model="smollm2-135m"))


def _blobs(hearth_home):
    return hearth_home / "cache" / "hub" / "models--HuggingFaceTB--SmolLM2-360M-Instruct" / "blobs"


@run_async
async def test_a_pac_model_says_it_cannot_be_exported_instead_of_trying(hearth_home, stories_gguf):
    from core.paths import hearth_paths

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    _train_tiny("tiny-pac", method="pac")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _open_models(pilot, app)
        _select(app, "tiny-pac")
        await pilot.pause()
        details = str(app.screen.query_one("#model-details").render())
        assert "cannot be merged into a GGUF" in details and "export it (e)" not in details
        await pilot.press("e")
        await pilot.pause()
        assert any("cannot be merged" in str(n.message) for n in app._notifications)
        assert "Exporting" not in str(app.screen.query_one("#models-status").render())
    assert not any((hearth_paths().models_dir / "tiny-pac").glob("*.gguf"))


@run_async
async def test_the_train_form_says_when_its_name_would_replace_a_model(hearth_home, stories_gguf):
    # Retraining under a model's name replaces it at the end: said before Start, not discovered after.
    from textual.widgets import Input, Static

    _train_tiny("kitchen")
    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await pilot.pause()

        def statement() -> str:
            return str(app.screen.query_one("#data-statement", Static).render())

        app.screen.query_one("#name", Input).value = "kitchen"
        app.screen.query_one("#data", Input).value = str(HOUSEHOLD / "train.jsonl")
        await pilot.pause()
        assert "A model named kitchen exists: this job replaces it when it finishes." in statement()
        assert "learnt from" not in statement()
        # Retraining on other data alone forgets what kitchen learnt.
        app.screen.query_one("#data", Input).value = "/home/other.jsonl"
        await pilot.pause()
        assert ("It learnt from train.jsonl too; this job leaves it out, and the new model "
                "will not know what was in it.") in statement()
        app.screen.query_one("#name", Input).value = "kitchen-2"
        await pilot.pause()
        assert "exists" not in statement() and "stays on this device" in statement()


@run_async
async def test_a_model_whose_base_has_gone_says_so_everywhere(hearth_home, stories_gguf, tmp_path):
    # Adapters run on their base's weights: trained on a folder that was then moved, the model
    # used to be listed "ready" and fail with "unknown model '/that/folder'", naming no model.
    import json
    import shutil
    import subprocess
    import sys

    from app.services.train import TrainPlan, TrainService

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir(), base)
    TrainService("here").run(TrainPlan("moved", [str(HOUSEHOLD / "train.jsonl")], str(base), method="lora", epochs=1),
                             lambda status: None)
    shutil.rmtree(base)
    said = (f"model moved runs on its base model {base}, which is not here any more: put it back, "
            "or train moved again from a base that is")

    def hearth(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app", *args], input="hi\n", capture_output=True, text=True,
                              timeout=120)

    chat = hearth("chat", "--model", "moved")
    assert (chat.returncode, chat.stderr) == (2, f"hearth: {said}\n")
    export = hearth("export", "moved", "--gguf")
    assert (export.returncode, export.stderr) == (2, f"hearth: {said}\n")
    [row] = [r for r in json.loads(hearth("models", "list", "--json").stdout)["models"] if r["name"] == "moved"]
    assert row["available"] is False

    write_config(hearth_home, chat=stories_chat(stories_gguf))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _open_models(pilot, app)
        _select(app, "moved")
        await pilot.pause()
        table = app.screen.query_one("#model-table")
        assert "base missing" in [str(cell) for cell in table.get_row("moved")]
        assert said in str(app.screen.query_one("#model-details").render())
