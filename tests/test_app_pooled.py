"""The Train screen runs a pooled job: this device and a real `hearth worker` process on
loopback (paired), PAC on stories260K over the household facts as notes. The statement names
the device that receives data before the start, and each device gets its own progress bar."""

from __future__ import annotations

import os

import pytest

from app_helpers import SIZE, make_app, run_async, settle, stories_chat, wait_until, write_config
from app.messages import TrainFinished, TrainProgress
from test_app_devices import Worker
from test_pooled import household_notes

pytestmark = pytest.mark.slow


@run_async
async def test_pooled_job_from_the_train_screen_shows_each_device(hearth_home, stories_gguf, shared_dir, tmp_path):
    from textual.widgets import Input, Select, SelectionList, Static

    from core.paths import hearth_paths

    notes = household_notes(shared_dir, tmp_path / "notes")
    kitchen = f"kitchen-{os.getpid()}"   # other tests on this host may advertise a "kitchen"
    worker = Worker(tmp_path / "worker-home", kitchen)
    try:
        write_config(hearth_home, chat=stories_chat(stories_gguf),
                     mesh={"name": "living-room", "interfaces": ["127.0.0.1"]})
        app = make_app(start_mesh=True, train_device="living-room")
        seen: list[TrainProgress] = []
        done: list[TrainFinished] = []

        def hook(message):
            if isinstance(message, TrainProgress):
                seen.append(message)
            elif isinstance(message, TrainFinished):
                done.append(message)

        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await settle(pilot, app)
            devices = app.services.devices
            # Pair through the service (the Devices screen's pairing is tested in test_app_devices.py).
            outgoing = devices.pair(f"127.0.0.1:{worker.port}")
            worker.expect(r"Code: " + outgoing.code)
            worker.answer("y")
            assert outgoing.confirm(60)[0]

            await pilot.press("f3")
            await wait_until(pilot, lambda: app.screen.query_one("#devices", SelectionList).option_count == 2,
                             30, "the paired device in the form")
            screen = app.screen
            screen.query_one("#name", Input).value = "pooled-family"
            screen.query_one("#data", Input).value = str(notes)
            model = screen.query_one("#model", Select)
            model.set_options([("stories260K", str(stories_gguf))])
            model.value = str(stories_gguf)
            screen.query_one("#epochs", Input).value = "2"
            screen.query_one("#devices", SelectionList).select(kitchen)
            await pilot.pause()
            statement = str(screen.query_one("#data-statement", Static).render())
            assert kitchen in statement and "sent to it encrypted" in statement
            await pilot.press("ctrl+g")
            await wait_until(pilot, lambda: done, 300, "the pooled job")
            assert done[0].ok, done[0].text
            assert len(screen.query("#device-bars ProgressBar")) == 2
        names = {d.name for m in seen for d in m.status.devices}
        assert names == {"living-room", kitchen}
        assert any(m.status.phase == "plan" for m in seen)
        assert (hearth_paths().models_dir / "pooled-family" / "hearth-model.json").is_file()
    finally:
        worker.stop()
