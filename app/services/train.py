"""Training as the app runs it: a plan from the form, a job on training/trainer.py, progress out.

`TrainService.run(plan, on_status, cancel)` turns the Train screen's choices into a
`training.job.JobSpec`, runs `training.trainer.train` and reports a `TrainStatus` (per-device
progress, the loss curve, samples/s, ETA) on every progress event. Cancelling stops the job at
its next step; its last checkpoint stays, so `resume` carries on from there. It blocks (minutes):
the app calls it from a worker thread. torch loads inside `run`, never at import. No UI code here.

`stop_all` cancels every running job and waits for each to stop: the app calls it before it
exits, because a job's thread would otherwise keep the process alive, with no screen, until the
last epoch (Python waits for worker threads at exit).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.services.models import require_here
from core.errors import HearthError
from core.paths import hearth_paths
from training.data import source_path
from training.job_defaults import DEFAULT_EPOCHS, spec_sources

METHODS = {"pac": "fast parallel adapters", "lora": "LoRA adapters"}


@dataclass
class TrainPlan:
    name: str
    data: list[str]              # the sources, learnt together: JSONLs of chats, notes folders, the taught chats
    model: str
    method: str = "pac"
    epochs: int = DEFAULT_EPOCHS["pac"]    # the same for lora; what makes the household facts stick
    devices: list[str] = field(default_factory=list)   # names of the devices that train; [] = this one
    pruning: float = 0.0         # fraction of the base to remove (0: none)
    max_steps: int | None = None


@dataclass
class DeviceProgress:
    name: str
    step: int
    total: int
    state: str = "training"              # training, idle (no share this step), gone
    samples_per_s: float | None = None


@dataclass
class TrainStatus:
    phase: str                   # load, cache, train, save, done
    devices: list[DeviceProgress]
    losses: list[float]
    epoch: int = 0
    samples_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


@dataclass
class InterruptedJob:
    name: str
    model: str
    method: str
    data: list[str]
    step: int
    epochs: int


class TrainCancelled(HearthError):
    pass


SOURCES_SEPARATOR = "; "


def typed_sources(text: str) -> list[str]:
    """The paths typed in the form's data box: one, or several separated by ';' (a model trained
    from the command line on two folders is offered both). A path that exists as typed is one
    path, even with a ';' in its name."""
    text = text.strip()
    if not text:
        return []
    if Path(text).expanduser().exists():
        return [text]
    return [part.strip() for part in text.split(SOURCES_SEPARATOR.strip()) if part.strip()]


def source_names(paths: list[str]) -> str:
    """The sources as a person names them: "notes, taught.jsonl"."""
    return ", ".join(Path(p).name for p in paths)


def where_data_goes(plan: TrainPlan, this_device: str) -> str:
    """One plain sentence on where the training data will be, before anything starts."""
    others = [d for d in plan.devices if d != this_device]
    if not others:
        return (f"Your data ({source_names(plan.data) or 'none chosen'}) stays on this device ({this_device}): "
                "it is read here and nothing is sent anywhere.")
    return (f"Your data ({source_names(plan.data)}) is read on this device; the samples each paired device "
            f"trains on ({', '.join(others)}) are sent to it encrypted, as token ids, for this job only; "
            "nothing goes to any other machine.")


def pruned_base_name(name: str) -> str:
    """The pruned model a job with pruning trains on (kept: the trained model runs on it).

    `NAME-base`, unless a model still runs on it (the previous `NAME`, which stays usable until
    the job replaces it, and after a cancelled job): then the next free `NAME-base-2`, `-3`.
    Retraining alternates between two names; the one left over is replaced next time."""
    from training.model_store import dependents

    candidate, number = f"{name}-base", 1
    while dependents(candidate):
        number += 1
        candidate = f"{name}-base-{number}"
    return candidate


class TrainService:
    def __init__(self, this_device: str = "", devices=None):
        """`devices`: the DevicesService whose paired devices can join a pooled job."""
        self.this_device = this_device or os.uname().nodename
        self.devices = devices
        self._jobs = threading.Condition()
        self._cancels: list[threading.Event] = []    # one per running job

    def running(self) -> bool:
        with self._jobs:
            return bool(self._cancels)

    def stop_all(self, timeout: float | None = None) -> bool:
        """Cancel every running job and wait until each has stopped at its next step (its
        checkpoint kept). False if one is still running after `timeout` seconds."""
        with self._jobs:
            for cancel in self._cancels:
                cancel.set()
            return self._jobs.wait_for(lambda: not self._cancels, timeout)

    def replaces(self, name: str, pruning: float = 0.0, data: list[str] | None = None) -> str:
        """A sentence when the job would replace personalised models: `name` (at the job's end, in
        one rename; until then it stays as it is) and, when pruning, its pruned base (at the
        start), else "". When `name` learnt from a source that `data` leaves out, it says so: the
        new model will not know what was in it."""
        from training.model_store import MANIFEST

        if not name:
            return ""
        names = [name] + ([pruned_base_name(name)] if pruning > 0 else [])
        here = [n for n in names if (hearth_paths().models_dir / n / MANIFEST).is_file()]
        if len(here) == 2:
            said = f"Models named {here[0]} and {here[1]} exist: this job replaces both."
        elif here == [name]:
            said = f"A model named {name} exists: this job replaces it when it finishes."
        elif here:
            return f"A model named {here[0]} exists: pruning replaces it first."
        else:
            return ""
        given = {source_path(p) for p in data or []}
        left_out = [p for p in self.learnt_from(name) if source_path(p) not in given]
        if data and left_out:
            it = "it" if len(left_out) == 1 else "them"
            said += (f" It learnt from {source_names(left_out)} too; this job leaves {it} out, "
                     f"and the new model will not know what was in {it}.")
        return said

    @staticmethod
    def learnt_from(name: str) -> list[str]:
        """The data model `name` was trained on, from its manifest ([] if unknown)."""
        from training.model_store import read_manifest

        try:
            details = read_manifest(hearth_paths().models_dir / name).details or {}
            return spec_sources(details["spec"])
        except (HearthError, KeyError, TypeError, AttributeError, ValueError):
            return []

    def taught_chats(self) -> tuple[str, int]:
        """The chats taught in the app (the file, how many), or ("", 0) before the first."""
        taught = hearth_paths().teach_file
        try:
            with open(taught, encoding="utf-8") as f:
                return str(taught), sum(1 for line in f if line.strip())
        except (OSError, UnicodeDecodeError):
            return "", 0

    def default_sources(self, name: str) -> list[str]:
        """What the form offers besides the taught chats: what model `name` learnt from before,
        so that retraining it keeps its notes."""
        taught = source_path(hearth_paths().teach_file)
        return [p for p in self.learnt_from(name) if source_path(p) != taught]

    def check(self, plan: TrainPlan) -> None:
        """A one-line HearthError for a plan that cannot start (before anything loads)."""
        from training.model_store import check_model_name

        if not plan.name:
            raise HearthError("name: give the new model a name")
        check_model_name(plan.name, "name")
        if not plan.data:
            raise HearthError("data: choose a folder of notes or a JSONL of chats (or teach answers in Chat)")
        for path in plan.data:
            if not Path(path).expanduser().exists():
                raise HearthError(f"{path}: no such file or folder")
        if plan.method not in METHODS:
            raise HearthError(f"method must be one of {', '.join(METHODS)}")
        if not 1 <= plan.epochs <= 100:
            raise HearthError("epochs must be between 1 and 100")
        if not 0.0 <= plan.pruning < 0.9:
            raise HearthError("pruning must be between 0% and 90%")
        others = [d for d in plan.devices if d != self.this_device]
        if others and plan.method != "pac":
            raise HearthError("training with other devices runs the pac method only: choose pac")
        if others and plan.pruning > 0:
            # Pooled jobs send the base as one GGUF file; a pruned base is a folder of weights.
            raise HearthError("pruning: a job with other devices trains the full model; choose no pruning")
        if plan.pruning > 0:
            check_model_name(pruned_base_name(plan.name), "name")
        if others and self.devices is None:
            raise HearthError("no mesh: train on this device only")
        require_here(plan.model)

    def interrupted_jobs(self) -> list[InterruptedJob]:
        """Jobs with a checkpoint left behind (cancelled or killed), newest first."""
        root = hearth_paths().jobs_dir
        found = []
        for meta in sorted(root.glob("*/checkpoint.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                data = json.loads(meta.read_text("utf-8"))
                spec = data["spec"]
                found.append(InterruptedJob(spec["name"], spec["model"], spec["method"], spec_sources(spec),
                                            int(data["step"]), int(spec["epochs"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def run(self, plan: TrainPlan, on_status: Callable[[TrainStatus], None],
            cancel: threading.Event | None = None, resume: bool = False) -> str:
        """Train (or resume) `plan`; returns the personalised model's name. Raises TrainCancelled."""
        self.check(plan)
        cancel = cancel or threading.Event()
        with self._jobs:
            self._cancels.append(cancel)
        try:
            return self._run(plan, on_status, cancel, resume)
        finally:
            with self._jobs:
                self._cancels.remove(cancel)
                self._jobs.notify_all()

    def _run(self, plan: TrainPlan, on_status: Callable[[TrainStatus], None],
             cancel: threading.Event, resume: bool) -> str:
        from training.job import JobSpec
        from training.trainer import train

        if resume:
            spec = self._interrupted_spec(plan.name)   # its model: the pruned base, if it had one
        else:
            model = plan.model
            if plan.pruning > 0:
                model = self._prune(plan, on_status)
                if cancel.is_set():
                    raise TrainCancelled(f"cancelled after pruning: {model} is the pruned model, not trained yet")
            spec = JobSpec(name=plan.name, data=[str(source_path(p)) for p in plan.data], model=model,
                           method=plan.method, epochs=plan.epochs, max_steps=plan.max_steps)
        losses: list[float] = []

        def on_event(event) -> None:
            if cancel.is_set():
                raise TrainCancelled(f"job {spec.name} cancelled at step {event.step}: resume it to carry on")
            if event.loss is not None and event.phase == "train":
                losses.append(float(event.loss))
            figures = getattr(event, "devices", None)  # a pooled job reports each device
            if figures:
                devices = [DeviceProgress(f.name, event.step, event.total_steps, f.state, f.samples_per_s)
                           for f in figures]
            else:
                devices = [DeviceProgress(self.this_device, event.step, event.total_steps)]
            on_status(TrainStatus(event.phase, devices, list(losses), event.epoch, event.samples_per_s,
                                  event.eta_s, event.message))

        others = [d for d in plan.devices if d != self.this_device]
        if others:
            self._run_pooled(spec, others, on_status, on_event, resume)
        else:
            train(spec, resume=resume, on_event=on_event)
        return spec.name

    def _run_pooled(self, spec, others: list[str], on_status, on_event, resume: bool) -> None:
        """PAC across this device and paired ones (training/pooled.py); each device's figures
        become its own progress bar. The plan, with who receives data, is reported first."""
        from training.pooled import JobDevice, train_pooled

        peers = self.devices.job_peers(others)
        try:
            devices = [JobDevice(self.this_device)] + [JobDevice(name, peer) for name, peer in peers]

            def on_plan(plan) -> None:
                on_status(TrainStatus("plan", [DeviceProgress(d.name, 0, 0, "waiting") for d in devices], [],
                                      message=plan.describe().replace("\n", "; ")))

            train_pooled(spec, devices, resume=resume, on_event=on_event, on_plan=on_plan,
                         rejoin=self.devices.reconnect)
        finally:
            for _, peer in peers:
                peer.close()

    def _prune(self, plan: TrainPlan, on_status: Callable[[TrainStatus], None]) -> str:
        """Prune the base first, its units chosen by how the family's data uses them; the job then
        trains on the smaller model, which is its recovery. The other way round (train, then
        prune) left a model that answered nothing: 0 of 20 household facts against 11 of 20
        this way (LoRA, 30%, docs/app.md)."""
        from training.pruning import prune_to_store

        pruned = pruned_base_name(plan.name)
        on_status(TrainStatus("prune", [DeviceProgress(self.this_device, 0, 1)], [],
                              message=f"pruning {plan.pruning:.0%} of {plan.model} into {pruned}"))
        prune_to_store(plan.model, plan.pruning, pruned, [source_path(p) for p in plan.data])
        return pruned

    def _interrupted_spec(self, name: str):
        from training.job import JobSpec

        meta = hearth_paths().jobs_dir / name / "checkpoint.json"
        try:
            return JobSpec.from_dict(json.loads(meta.read_text("utf-8"))["spec"])
        except (OSError, ValueError, KeyError, TypeError):
            raise HearthError(f"{meta}: no interrupted job called {name} to resume") from None
