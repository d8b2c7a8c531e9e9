"""The Devices screen against a real `hearth worker` process on loopback: the worker is found
(by address), paired through the app's pairing dialog (the same code on both sides, the worker's
person answering on its stdin), shows its memory and cores, and is unpaired. Then a pairing
request from another process pops up over the app and is accepted there."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app_helpers import SIZE, make_app, run_async, settle, stories_chat, wait_until, write_config
from app.widgets.dialogs import ConfirmDialog, PairingDialog

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Worker:
    """`hearth worker` in its own HEARTH_HOME; its stdout lines arrive in a queue."""

    def __init__(self, home: Path, name: str):
        env = {**os.environ, "HEARTH_HOME": str(home), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "worker", "--name", name, "--kind", "desktop",
             "--interface", "127.0.0.1", "--port", "0"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.expect(r"on port (\d+)").group(1))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"the worker never printed {pattern!r}")

    def answer(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


KITCHEN = f"kitchen-{os.getpid()}"   # unique: other tests on this host may advertise a "kitchen"


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path / "worker-home", KITCHEN)
    yield w
    w.stop()


def _row(app, name):
    return next((r for r in app.screen.rows if r.name == name), None)


@run_async
async def test_pair_and_unpair_a_real_worker_from_the_devices_screen(hearth_home, worker, stories_gguf, tmp_path):
    write_config(hearth_home, chat=stories_chat(stories_gguf),
                 mesh={"name": "living-room", "interfaces": ["127.0.0.1"]})
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        assert app.services.devices.started and not app.services.devices.error
        await pilot.press("f2")
        await pilot.pause()
        assert app.current_mode == "devices"
        app.screen.query_one("#add-address").value = f"127.0.0.1:{worker.port}"
        app.screen.query_one("#add-address").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: _row(app, KITCHEN) is not None, 30, "the worker in the list")
        kitchen = _row(app, KITCHEN)
        assert kitchen.kind == "desktop" and not kitchen.paired

        table = app.screen.query_one("#device-table")
        table.move_cursor(row=app.screen.rows.index(kitchen))
        table.focus()
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, PairingDialog) and app.screen.query("#code"),
                         30, "the pairing dialog")
        shown = app.screen.query_one("#code").render()
        code = worker.expect(r"Code: (\d{6})").group(1)
        assert str(shown).replace(" ", "") == code          # the same six digits on both devices
        assert "What pairing grants" in str(app.screen.query_one(".grant").render())
        worker.answer("y")
        await pilot.pause(0.3)
        await pilot.click("#accept")
        await wait_until(pilot, lambda: (_row(app, KITCHEN) or kitchen).paired, 60, "the pairing")
        await wait_until(pilot, lambda: _row(app, KITCHEN).cores, 60, "the worker's profile")
        kitchen = _row(app, KITCHEN)
        assert kitchen.cores == os.cpu_count() and kitchen.memory_gb > 0 and kitchen.state == "idle"

        table.move_cursor(row=app.screen.rows.index(kitchen))
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the unpair question")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: _row(app, KITCHEN) is not None and not _row(app, KITCHEN).paired,
                         30, "the unpairing")
        assert app.services.devices.paired_count() == 0

        # An unpaired device that leaves leaves the list (a guest's laptop heard once used to stay
        # for ever, "gone"); a paired one stays, so that it can be unpaired while it is away.
        worker.stop()
        await wait_until(pilot, lambda: _row(app, KITCHEN) is None, 30, "the unpaired worker to leave the list")


def _ask_to_pair(port: int, home: Path) -> subprocess.Popen:
    """Another device (its own HEARTH_HOME) asks the app on `port` to pair: `hearth pair --json`,
    which confirms on its side at once and prints its result when the app's side decides."""
    env = {**os.environ, "HEARTH_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "app", "pair", f"127.0.0.1:{port}", "--yes", "--json", "--interface", "127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@run_async
async def test_incoming_pairing_request_pops_up_wherever_the_person_is(hearth_home, stories_gguf, tmp_path):
    write_config(hearth_home, chat=stories_chat(stories_gguf),
                 mesh={"name": "living-room", "interfaces": ["127.0.0.1"]})
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("f4")                 # the person is on the Models screen
        await pilot.pause()
        port = app.services.devices.port
        assert port
        asker = _ask_to_pair(port, tmp_path / "phone-home")
        try:
            # Pushed is not yet composed: wait for the code itself before reading or clicking.
            await wait_until(pilot, lambda: isinstance(app.screen, PairingDialog) and app.screen.query("#code"),
                             60, "the pairing request")
            assert app.current_mode == "models"
            await pilot.pause(0.3)              # laid out before it is clicked
            code = str(app.screen.query_one("#code").render()).replace(" ", "")
            await pilot.click("#accept")
            await wait_until(pilot, lambda: asker.poll() is not None, 60, "the other side to finish")
            result = json.loads(asker.stdout.read())
        finally:
            if asker.poll() is None:
                asker.kill()
        assert result["paired"] is True and result["code"] == code, result
        assert app.services.devices.paired_count() == 1


@run_async
async def test_an_unanswered_pairing_request_closes_its_dialog_when_it_expires(hearth_home, stories_gguf, tmp_path):
    # A short expiry (the default is 60 s) so that the test sees the real expiry happen.
    write_config(hearth_home, chat=stories_chat(stories_gguf),
                 mesh={"name": "living-room", "interfaces": ["127.0.0.1"], "pairing_expiry_s": 5.0})
    app = make_app(start_mesh=True)
    said: list[str] = []      # notifications time out of the screen: keep what was said
    notify = app.notify
    app.notify = lambda message, **kwargs: (said.append(str(message)), notify(message, **kwargs))[1]
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        port = app.services.devices.port
        asker = _ask_to_pair(port, tmp_path / "phone-home")
        try:
            # Pushed is not yet composed: wait for the countdown itself.
            await wait_until(pilot, lambda: isinstance(app.screen, PairingDialog) and "expires in" in " ".join(
                str(w.render()) for w in app.screen.query("#expiry")), 60, "the pairing dialog's countdown")
            await wait_until(pilot, lambda: not isinstance(app.screen, PairingDialog), 15, "the dialog to close")
            # The notice comes from the dialog's dismiss callback, after the screen has gone: one
            # CI run looked for it a moment too early.
            await wait_until(pilot, lambda: any("expired" in text for text in said), 15, "the expiry notice")
            await wait_until(pilot, lambda: asker.poll() is not None, 60, "the other side to give up")
            result = json.loads(asker.stdout.read())
        finally:
            if asker.poll() is None:
                asker.kill()
        assert result["paired"] is False
        assert app.services.devices.paired_count() == 0


@run_async
async def test_a_pairing_request_withdrawn_by_the_other_device_closes_its_dialog(hearth_home, stories_gguf, tmp_path):
    write_config(hearth_home, chat=stories_chat(stories_gguf), mesh={"name": "living-room", "interfaces": ["127.0.0.1"]})
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        port = app.services.devices.port
        asker = _ask_to_pair(port, tmp_path / "phone-home")
        try:
            await wait_until(pilot, lambda: isinstance(app.screen, PairingDialog), 60, "the pairing request")
        finally:
            asker.kill()                         # the other person gives up (60 s before the expiry)
            asker.wait()
        await wait_until(pilot, lambda: not isinstance(app.screen, PairingDialog), 15, "the dialog to close")
        assert app.services.devices.paired_count() == 0


@run_async
async def test_the_app_serves_job_parts_and_states_its_private_data(hearth_home, stories_gguf, tmp_path):
    """The app is a device like `hearth worker`: paired devices can run pooled and federated parts
    on it, and federated ones train on the private data named in its config, which it counts."""
    from tests.training_helpers import HOUSEHOLD

    write_config(hearth_home, chat=stories_chat(stories_gguf),
                 mesh={"name": "living-room", "interfaces": ["127.0.0.1"],
                       "private_data": [str(HOUSEHOLD / "train.jsonl")]})
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await wait_until(pilot, lambda: app.services.devices.port, 30, "the mesh")
        served = app.services.devices._mesh.agent.handlers.types()
        assert {"pac.open", "pac.step", "fed.info", "fed.round"} <= set(served)
        await pilot.press("f2")
        await wait_until(pilot, lambda: "20 conversations" in str(app.screen.query_one("#private-data").render()),
                         30, "the private data statement")
        assert "train.jsonl" in str(app.screen.query_one("#private-data").render())


@run_async
async def test_bad_private_data_is_named_and_the_app_still_works(hearth_home, stories_gguf, tmp_path):
    bad = tmp_path / "diary.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n', "utf-8")
    write_config(hearth_home, chat=stories_chat(stories_gguf),
                 mesh={"name": "living-room", "interfaces": ["127.0.0.1"], "private_data": [str(bad)]})
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await wait_until(pilot, lambda: app.services.devices.port, 30, "the mesh")
        await pilot.press("f2")
        await wait_until(pilot, lambda: "diary.jsonl:2" in str(app.screen.query_one("#devices-status").render()),
                         30, "the error naming file and line")
        assert "No private data" in str(app.screen.query_one("#private-data").render())


@run_async
async def test_private_data_is_offered_and_withdrawn_from_the_devices_screen(hearth_home, stories_gguf, tmp_path):
    """The app's `hearth worker --data`: a family member offers her notes to federated jobs from
    the Devices screen (it was a config key to edit by hand). Checked first: a bad line is named
    and nothing changes. The running device's federated parts see the change at once (a job
    asks `fed.info` first: how many conversations, never the text)."""
    from core.config import load_config
    from mesh.handlers import Request
    from mesh.transport import PeerInfo
    from tests.training_helpers import HOUSEHOLD
    from textual.widgets import Input

    write_config(hearth_home, chat=stories_chat(stories_gguf), mesh={"name": "living-room", "interfaces": ["127.0.0.1"]})
    bad = tmp_path / "diary.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n', "utf-8")
    app = make_app(start_mesh=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await wait_until(pilot, lambda: app.services.devices.port, 30, "the mesh")
        await pilot.press("f2")
        await pilot.pause()

        def statement() -> str:
            return str(app.screen.query_one("#private-data").render())

        def fed_info() -> dict:
            handler = app.services.devices._mesh.agent.handlers._handlers["fed.info"].fn
            return handler(Request("fed.info", {}, PeerInfo("peer-id", "kitchen", b"", "127.0.0.1"))).fields

        assert "No private data" in statement()

        async def offer(path) -> None:
            box = app.screen.query_one("#private-path", Input)
            box.focus()
            box.value = str(path)
            await pilot.press("enter")

        await offer(bad)
        await wait_until(pilot, lambda: any("diary.jsonl:2" in str(n.message) for n in app._notifications),
                         30, "the error naming file and line")
        assert load_config().get("mesh.private_data") == [] and fed_info()["examples"] == 0
        await offer(HOUSEHOLD / "train.jsonl")
        await wait_until(pilot, lambda: "20 conversations" in statement(), 30, "the private data statement")
        assert load_config().get("mesh.private_data") == [str((HOUSEHOLD / "train.jsonl").resolve())]
        assert fed_info() == {"examples": 20, "sources": 1}
        app.clear_notifications()
        await offer(HOUSEHOLD / ".." / HOUSEHOLD.name / "train.jsonl")   # the same file again: kept once
        await wait_until(pilot, lambda: any("Offered" in str(n.message) for n in app._notifications), 30,
                         "the offer done")
        await pilot.pause()
        assert "20 conversations" in statement() and fed_info() == {"examples": 20, "sources": 1}
        assert load_config().get("mesh.private_data") == [str((HOUSEHOLD / "train.jsonl").resolve())]
        app.screen.action_withdraw_private()
        await wait_until(pilot, lambda: "No private data" in statement(), 30, "the data withdrawn")
        assert load_config().get("mesh.private_data") == [] and fed_info()["examples"] == 0
