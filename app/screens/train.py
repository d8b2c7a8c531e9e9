"""The Train screen: choose data, base model, method, devices, epochs and pruning; see where the
data will go before starting; then live per-device progress, the loss curve, samples/s and ETA.

The job runs in a worker (app/services/train.py); its progress arrives as TrainProgress messages
that replace one another, so a fast job never floods the screen. Cancel stops it at the next
step and keeps its checkpoint; Resume carries an interrupted job on.
"""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import (
    Button, Checkbox, Footer, Header, Input, Label, ProgressBar, Select, SelectionList, Sparkline, Static,
)

from app.messages import TrainFinished, TrainProgress
from app.services.devices import DevicesService
from app.services.models import ModelsService
from app.services.train import (
    DEFAULT_EPOCHS, METHODS, SOURCES_SEPARATOR, TrainPlan, TrainService, TrainStatus, typed_sources, where_data_goes,
)

PRUNING = [("none", 0.0), ("10%", 0.1), ("20%", 0.2), ("30%", 0.3)]
REPAINT_S = 0.1


class TrainScreen(Screen):
    CSS_PATH = "../styles/train.tcss"
    BINDINGS = [
        # priority: the form's inputs would otherwise take Ctrl-X (cut). Ctrl-U stays the
        # inputs' "delete to the start": taken for Resume, that reflex started a job.
        Binding("ctrl+g", "start", "Start", id="start", priority=True),
        Binding("ctrl+x", "cancel", "Cancel job", id="cancel", priority=True),
        Binding("ctrl+r", "resume", "Resume", id="resume", priority=True),
    ]

    def __init__(self, train: TrainService, models: ModelsService, devices: DevicesService) -> None:
        super().__init__(id="train-screen")
        self.train = train
        self.models = models
        self.devices = devices
        self._cancel = threading.Event()
        self.running = False
        self.last_status: TrainStatus | None = None
        self._taught_file = ""       # the taught chats, once there are any (TrainService.taught_chats)

    def compose(self) -> ComposeResult:
        this = self.train.this_device
        base_models = [(m.name, m.name) for m in self.models.models() if m.kind == "base" and m.available]
        with_default = self.models.active_model if any(v == self.models.active_model for _, v in base_models) else (
            base_models[0][1] if base_models else Select.NULL)
        yield Header()
        with Horizontal(id="train-body"):
            with VerticalScroll(id="train-form"):
                yield Label("Name of the new model")
                yield Input("family", id="name")
                yield Label("Data: a folder of notes or a JSONL of chats")
                # Retraining a model on its own notes keeps them: offered as they were.
                yield Input(SOURCES_SEPARATOR.join(self.train.default_sources("family")),
                            placeholder="folder or file (several: separate with ;)",
                            id="data")
                yield Checkbox("", value=False, disabled=True, id="taught")
                yield Label("Base model")
                yield Select(base_models, value=with_default, allow_blank=not base_models, id="model")
                yield Label("Method")
                yield Select([(f"{k}: {v}", k) for k, v in METHODS.items()], value="pac", allow_blank=False,
                             id="method")
                yield Label("Devices")
                yield SelectionList((this, this, True), id="devices")
                yield Label("Epochs")
                yield Input(str(DEFAULT_EPOCHS["pac"]), id="epochs", type="integer")
                yield Label("Target pruning (smaller, faster; knows less beyond your data)")
                yield Select(PRUNING, value=0.0, allow_blank=False, id="pruning")
                yield Static("", id="data-statement")
                with Horizontal(id="train-buttons"):
                    yield Button("Start (Ctrl-G)", id="start", variant="primary")
                    yield Button("Cancel (Ctrl-X)", id="cancel", variant="error", disabled=True)
                yield Label("Interrupted jobs")
                yield Select([], prompt="none", id="interrupted")
                yield Button("Resume (Ctrl-R)", id="resume", disabled=True)
            with Vertical(id="train-progress"):
                yield Label("Progress", classes="title")
                yield Vertical(id="device-bars")
                yield Label("Loss", classes="title")
                yield Sparkline([], id="loss")
                yield Static("No job running.", id="train-metrics")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Train"
        self._show_taught()
        self._statement()
        self._load_interrupted()
        self._load_devices()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Train: start", "train a personalised model with these settings", self.action_start),
            ("Train: cancel the job", "stop at the next step; it can be resumed", self.action_cancel),
            ("Train: resume an interrupted job", "carry on from its last checkpoint", self.action_resume),
        ]

    # --- the form --------------------------------------------------------------------------

    def on_screen_resume(self) -> None:
        self._show_taught()     # answers taught in Chat since the form was last seen

    def _show_taught(self) -> None:
        """The taught answers as a second source, on by default once there are any: a model
        trained on the notes alone would not know them, one on them alone forgets the notes."""
        taught = self.query_one("#taught", Checkbox)
        self._taught_file, count = self.train.taught_chats()
        if count:
            taught.label = f"Also the {count} answer{'s' if count != 1 else ''} taught in Chat"
            if taught.disabled:
                taught.value = True
        else:
            taught.label = "Also answers taught in Chat (none yet)"
            taught.value = False
        taught.disabled = not count

    def plan(self) -> TrainPlan:
        epochs = self.query_one("#epochs", Input).value.strip()
        model = self.query_one("#model", Select).value
        typed = typed_sources(self.query_one("#data", Input).value)
        taught = self.query_one("#taught", Checkbox)
        return TrainPlan(
            name=self.query_one("#name", Input).value.strip(),
            data=typed + ([self._taught_file] if taught.value and not taught.disabled else []),
            model=str(model) if model is not Select.NULL else "",
            method=str(self.query_one("#method", Select).value),
            epochs=int(epochs) if epochs.isdigit() else 0,
            devices=list(self.query_one("#devices", SelectionList).selected),
            pruning=float(self.query_one("#pruning", Select).value or 0.0),
        )

    @on(Input.Changed)
    @on(Checkbox.Changed)
    @on(Select.Changed)
    @on(SelectionList.SelectedChanged)
    def _statement(self) -> None:
        plan = self.plan()
        said = [where_data_goes(plan, self.train.this_device), self.train.replaces(plan.name, plan.pruning, plan.data)]
        self.query_one("#data-statement", Static).update(" ".join(s for s in said if s))

    @work(thread=True, exit_on_error=False, group="paired")
    def _load_devices(self) -> None:
        names = self.devices.paired_names()
        self.app.call_from_thread(self._show_devices, names)

    def _show_devices(self, names: list[str]) -> None:
        selection = self.query_one("#devices", SelectionList)
        known = {selection.get_option_at_index(i).value for i in range(selection.option_count)}
        selection.add_options([(name, name, False) for name in names if name not in known])

    @work(thread=True, exit_on_error=False, group="interrupted")
    def _load_interrupted(self) -> None:
        jobs = self.train.interrupted_jobs()
        self.app.call_from_thread(self._show_interrupted, jobs)

    def _show_interrupted(self, jobs) -> None:
        select = self.query_one("#interrupted", Select)
        select.set_options([(f"{j.name}: {j.method} on {j.model}, step {j.step}", j.name) for j in jobs])
        if jobs:
            select.value = jobs[0].name
        self.query_one("#resume", Button).disabled = not jobs or self.running

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        {"start": self.action_start, "cancel": self.action_cancel, "resume": self.action_resume}[event.button.id]()

    # --- running ---------------------------------------------------------------------------

    def action_start(self, resume: str | None = None) -> None:
        if self.running:
            self.notify("A job is running already.")
            return
        plan = self.plan()
        if resume:
            plan.name = resume
        try:
            if not resume:
                self.train.check(plan)
        except Exception as exc:  # noqa: BLE001 - a HearthError says what to fix
            self.notify(str(exc), title="Cannot start", severity="error")
            return
        self.running = True
        self._cancel = threading.Event()
        self._set_running(True)
        for bar in self.query("#device-bars ProgressBar").results(ProgressBar):
            bar.update(progress=0)  # kept (not removed and remounted), so updates never miss them
        self.query_one("#loss", Sparkline).data = []
        self.query_one("#train-metrics", Static).update("Loading the base model…")
        self._run(plan, self._cancel, bool(resume))

    def action_resume(self) -> None:
        value = self.query_one("#interrupted", Select).value
        if value is Select.NULL or value is None:
            self.notify("No interrupted job to resume.")
            return
        self.action_start(resume=str(value))

    def action_cancel(self) -> None:
        if self.running:
            self._cancel.set()
            self.query_one("#train-metrics", Static).update("Cancelling at the next step…")

    def _set_running(self, running: bool) -> None:
        self.query_one("#start", Button).disabled = running
        self.query_one("#cancel", Button).disabled = not running
        self.query_one("#resume", Button).disabled = running

    @work(thread=True, exclusive=True, exit_on_error=False, group="train")
    def _run(self, plan: TrainPlan, cancel: threading.Event, resume: bool) -> None:
        last = 0.0

        def on_status(status: TrainStatus) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= REPAINT_S or status.phase != "train":
                last = now
                self.post_message(TrainProgress(status))

        try:
            name = self.train.run(plan, on_status, cancel, resume=resume)
            if name == self.models.active_model:
                said = f"Model {name} is ready: Chat answers with it from the next answer."
            else:
                said = f"Model {name} is ready: set it active in Models (F4)."
            self.post_message(TrainFinished(True, said))
        except Exception as exc:  # noqa: BLE001 - cancelled or failed: the message says which
            self.post_message(TrainFinished(False, str(exc) or type(exc).__name__))

    @on(TrainProgress)
    def _progress(self, message: TrainProgress) -> None:
        status: TrainStatus = message.status
        self.last_status = status
        bars = self.query_one("#device-bars", Vertical)
        for bar in bars.query(ProgressBar).results(ProgressBar):
            index = int(str(bar.id).removeprefix("bar-"))
            shown = index < len(status.devices)
            bar.display = shown
            bars.query_one(f"#bar-{index}-label", Label).display = shown
        for index, device in enumerate(status.devices):
            bar_id = f"bar-{index}"
            found = bars.query(f"#{bar_id}")
            label = device.name if device.state == "training" else f"{device.name} ({device.state})"
            if device.samples_per_s:
                label += f", {device.samples_per_s:.1f} samples/s"
            if found:
                bar = found.first(ProgressBar)
                bars.query_one(f"#{bar_id}-label", Label).update(label)
            else:
                bar = ProgressBar(total=max(device.total, 1), id=bar_id, show_eta=False)
                bars.mount(Label(label, id=f"{bar_id}-label", classes="device-name"), bar)
            bar.update(total=max(device.total, 1), progress=device.step)
        if status.losses:
            self.query_one("#loss", Sparkline).data = list(status.losses)
        parts = [status.phase]
        if status.epoch:
            parts.append(f"epoch {status.epoch}")
        if status.losses:
            parts.append(f"loss {status.losses[-1]:.3f}")
        if status.samples_per_s:
            parts.append(f"{status.samples_per_s:.1f} samples/s")
        if status.eta_s is not None:
            parts.append(f"ETA {_duration(status.eta_s)}")
        if status.message:
            parts.append(status.message)
        self.query_one("#train-metrics", Static).update(" · ".join(parts))

    @on(TrainFinished)
    def _finished(self, message: TrainFinished) -> None:
        self.running = False
        self._set_running(False)
        self.query_one("#train-metrics", Static).update(message.text)
        self.notify(message.text, title="Training" if message.ok else "Training stopped",
                    severity="information" if message.ok else "warning")
        self._load_interrupted()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"
