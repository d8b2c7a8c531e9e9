"""SVG snapshots of each screen at a fixed terminal size (tests/__snapshots__/).

Content is made deterministic: a private HEARTH_HOME, a history written with a fixed clock, this
device's row and name pinned, the dark theme. Update with `pytest tests/test_app_snapshots.py
--snapshot-update` after a deliberate change, and look at the pictures before committing them.
"""

from __future__ import annotations

import pytest

from app_helpers import SIZE, make_app, wait_until, write_config

pytestmark = pytest.mark.slow


def _history() -> None:
    from serving.history import History

    history = History(clock=lambda: 1_800_000_000.0)
    conv = history.new_conversation("smollm2-135m", "You are a helpful AI assistant.")
    history.add_message(conv.id, "user", "How do I print in Python?")
    history.add_message(conv.id, "assistant",
                        "Use the `print` function:\n\n```python\nprint('hello')\n```\n\nIt writes a line to the terminal.")
    other = history.new_conversation("smollm2-135m")
    history.add_message(other.id, "user", "What is the capital of France?")
    history.add_message(other.id, "assistant", "The capital of France is Paris.")


def _pinned_devices():
    from app.services.devices import DeviceRow, DevicesService

    return DevicesService(this_device=DeviceRow("", "living-room", "laptop", 16.0, 8, "this device", True, True))


def _app(hearth_home):
    write_config(hearth_home, chat={"threads": 1})
    return make_app(devices=_pinned_devices(), train_device="living-room")


async def _settled(pilot) -> None:
    from textual.widgets import Input

    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    # A blinking cursor is drawn or not depending on when the picture is taken: keep it still.
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


def test_chat_screen_snapshot(snap_compare, hearth_home):
    _history()
    app = _app(hearth_home)

    async def before(pilot):
        await _settled(pilot)
        # The model loads after the first frame: wait until the status says so.
        await wait_until(pilot, lambda: pilot.app.screen._status.endswith("ready."), 60, "the model")
        await _settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_devices_screen_snapshot(snap_compare, hearth_home):
    app = _app(hearth_home)

    async def before(pilot):
        await _settled(pilot)
        await pilot.press("f2")
        await _settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_train_screen_snapshot(snap_compare, hearth_home):
    app = _app(hearth_home)

    async def before(pilot):
        await _settled(pilot)
        await pilot.press("f3")
        await _settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_models_screen_snapshot(snap_compare, hearth_home):
    app = _app(hearth_home)

    async def before(pilot):
        await _settled(pilot)
        await pilot.press("f4")
        await _settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_pairing_dialog_snapshot(snap_compare, hearth_home):
    from mesh.pairing import grant_text

    from app.widgets.dialogs import PairingDialog

    app = _app(hearth_home)

    async def before(pilot):
        await _settled(pilot)
        await pilot.press("f2")
        await _settled(pilot)
        await pilot.app.push_screen(PairingDialog(
            "A device asks to pair with this one", "kitchen (desktop, 192.168.1.20)", "123456", grant_text("kitchen")))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
