"""`hearth train` jobs end to end on a tiny random Llama: JSON progress, the saved personalised
model in `hearth models list`, chat through the torch engine, and --resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]


def _hearth(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HEARTH_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _train_args(out: str, method: str, epochs: int) -> list[str]:
    return ["train", "--data", str(HOUSEHOLD / "train.jsonl"), "--model", str(tiny_llama_dir()),
            "--method", method, "--epochs", str(epochs), "--out", out, "--json", "--lr", "5e-3",
            "--checkpoint-every", "0"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (name,) = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return load_file(str(folder / name))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pac", "lora"])
def test_train_resumes_after_sigkill_with_no_step_lost_or_repeated(method, tmp_path):
    home = tmp_path / "home"
    epochs = 6
    whole = _hearth(home, *_train_args("whole", method, epochs))
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    train_events = [e for e in events if e["phase"] == "train"]
    total = train_events[-1]["total_steps"]
    assert [e["step"] for e in train_events] == list(range(1, total + 1))
    assert {"loss", "samples_per_s", "eta_s", "epoch"} <= set(train_events[-1])
    assert events[-1]["phase"] == "done"
    # A finished job leaves no activation cache (hidden states of the family's text) behind.
    activations = home / "cache" / "activations"
    assert not activations.exists() or not any(activations.iterdir())

    killed = _hearth(home, *_train_args("again", method, epochs))
    seen = []
    for line in killed.stdout:
        event = json.loads(line)
        if event["phase"] == "train":
            seen.append(event["step"])
            if event["step"] >= 3:   # early, so the job cannot finish before the kill lands
                killed.send_signal(signal.SIGKILL)
                break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (home / "data" / "models" / "again").exists()   # nothing half-written
    checkpointed = json.loads((home / "data" / "jobs" / "again" / "checkpoint.json").read_text())["step"]
    assert seen[-1] <= checkpointed < total
    if method == "pac":   # an interrupted job keeps its cache, to resume without epoch 1
        assert any(activations.iterdir())

    resumed = _hearth(home, *_train_args("again", method, epochs), "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    steps = [json.loads(line)["step"] for line in out.splitlines() if json.loads(line)["phase"] == "train"]
    # the resumed run starts right after the last checkpoint and ends at the total: no step twice
    assert steps == list(range(checkpointed + 1, total + 1))
    a, b = _weights(home / "data" / "models" / "whole"), _weights(home / "data" / "models" / "again")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_trained_models_are_listed_and_chat_streams(hearth_home):
    from app.commands.models import model_rows
    from app.cli import main
    from training.engines import ChatMessage, SamplingSettings, open_engine
    from training.offline_bitsandbytes import import_bitsandbytes

    import_bitsandbytes()   # before peft: tests/test_offline.py
    from peft import PeftModel

    for method in ("pac", "lora"):
        assert main(["train", "--data", str(HOUSEHOLD / "train.jsonl"), "--model", str(tiny_llama_dir()),
                     "--method", method, "--epochs", "2", "--out", f"fam-{method}", "--json"]) == 0
    rows = {row["name"]: row for row in model_rows() if row["type"] == "personal"}
    assert rows["fam-pac"]["format"] == "pac" and rows["fam-lora"]["format"] == "peft"
    assert rows["fam-pac"]["base"] == str(tiny_llama_dir())
    from core.paths import hearth_paths
    from training.trainer import load_backbone

    PeftModel.from_pretrained(load_backbone(str(tiny_llama_dir())).model, str(hearth_paths().models_dir / "fam-lora"))
    settings = SamplingSettings(temperature=0.7, max_tokens=12, seed=3)
    for name in ("fam-pac", "fam-lora"):
        engine = open_engine(name)
        assert type(engine).__name__ == "TorchEngine"
        pieces = list(engine.stream([ChatMessage("user", "What do we call our dog?")], settings))
        assert pieces and all(isinstance(p, str) for p in pieces)
        import threading

        cancel = threading.Event()
        stream = engine.stream([ChatMessage("user", "Hello")], settings, cancel)
        first = next(stream, None)
        cancel.set()
        assert len([first, *stream]) <= 2   # stops within a token once cancelled
        engine.close()


@pytest.mark.slow
def test_a_second_run_of_a_training_job_is_refused_and_the_first_carries_on(tmp_path):
    # A fresh start deletes the job's folder: a second run of the same name (from the app and
    # the command line, or two windows) would destroy the first one's checkpoint as it trains.
    home = tmp_path / "home"
    first = _hearth(home, *_train_args("kitchen", "pac", 12))
    steps = []
    for line in first.stdout:
        event = json.loads(line)
        if event["phase"] == "train":
            steps.append(event["step"])
            if event["step"] >= 2:
                first.send_signal(signal.SIGSTOP)   # mid-job, however fast this machine trains
                break
    checkpoint = home / "data" / "jobs" / "kitchen" / "checkpoint.json"
    assert checkpoint.is_file()
    for extra in ([], ["--resume"]):
        second = _hearth(home, *_train_args("kitchen", "pac", 12), *extra)
        out, err = second.communicate(timeout=120)
        assert (second.returncode, out) == (2, "")
        assert err == (f"hearth: training job kitchen is already in use by another training run (pid {first.pid}): "
                       "wait for it to finish or stop it, or choose another name\n")
        assert checkpoint.is_file()
    first.send_signal(signal.SIGCONT)
    rest, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps += [json.loads(line)["step"] for line in rest.splitlines() if json.loads(line)["phase"] == "train"]
    assert steps == list(range(1, steps[-1] + 1)) and json.loads(rest.splitlines()[-1])["phase"] == "done"
    assert (home / "data" / "models" / "kitchen").is_dir()
