"""The `hearth` command line: help, version, lazy imports, `models list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import __version__
from app.cli import COMMAND_MODULES
from training.catalog import DEFAULT_MODEL, load_catalog

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "llama_cpp", "textual", "zeroconf", "huggingface_hub", "numpy")


def hearth(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], env=dict(os.environ, HEARTH_HOME=str(home)),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_help_lists_every_command(tmp_path: Path):
    done = hearth("--help", home=tmp_path)
    assert done.returncode == 0
    for module in COMMAND_MODULES:
        assert module.rsplit(".", 1)[1] in done.stdout
    assert "chat" in done.stdout and "models" in done.stdout


def test_version(tmp_path: Path):
    done = hearth("--version", home=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"hearth {__version__}"


def test_help_imports_nothing_heavy():
    """`hearth --help` stays fast because building the parser loads no ML or network library."""
    probe = (
        "import sys\n"
        "from app.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_models_list_json_shape(hearth_home: Path):
    from core.paths import hearth_paths
    from training.model_store import MANIFEST, PersonalModel

    folder = hearth_paths().models_dir / "family"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(
        PersonalModel(name="family", base=DEFAULT_MODEL, method="pac", format="pac", parameters=135_000_000,
                      pruning_ratio=0.25, created="2026-11-22T08:00:00Z").to_json(), "utf-8")

    done = hearth("models", "list", "--json", home=hearth_home)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["models"]
    base = [r for r in rows if r["type"] == "base"]
    assert [r["name"] for r in base] == [e.name for e in load_catalog()]
    base_keys = {"name", "type", "title", "parameters", "size_mb", "license", "min_memory_gb", "hub_id",
                 "available", "path", "default"}
    assert all(set(r) == base_keys for r in base)
    default = next(r for r in base if r["default"])
    assert default["name"] == DEFAULT_MODEL and default["available"] and default["path"].endswith(".gguf")
    assert all(not r["available"] and r["path"] is None for r in base if r["name"] != DEFAULT_MODEL)
    personal = [r for r in rows if r["type"] == "personal"]
    assert personal == [{
        "name": "family", "type": "personal", "title": f"pac on {DEFAULT_MODEL}", "base": DEFAULT_MODEL,
        "method": "pac", "format": "pac", "parameters": 135_000_000, "pruning_ratio": 0.25,
        "created": "2026-11-22T08:00:00Z", "available": True, "base_of": [],
    }]

    text = hearth("models", home=hearth_home)  # `list` is the default action
    assert text.returncode == 0
    assert DEFAULT_MODEL in text.stdout and "(default)" in text.stdout and "family" in text.stdout
    assert "pruned 25%" in text.stdout


def test_every_command_and_benchmark_has_working_help():
    """argparse renders each sub-command's help (a stray % in a description breaks it)."""
    from app.cli import build_parser
    from app.commands.bench import BENCHMARKS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert command.format_help(), name
    bench = sub.choices["bench"]
    names = next(a for a in bench._actions if a.dest == "bench_name")
    assert set(names.choices) == set(BENCHMARKS)
    for name, parser_ in names.choices.items():
        assert parser_.format_help(), name
    assert "30%" in bench.format_help()


def test_resume_of_a_job_that_never_ran_is_refused_by_name(tmp_path: Path):
    done = hearth("train", "--data", "notes.jsonl", "--out", "typo-name", "--resume", home=tmp_path)
    assert done.returncode != 0
    assert "no interrupted job named typo-name" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, said", [
    # resolve() finds the catalog entry first: the trained model could never be chatted with
    ("smollm2-135m", "--out 'smollm2-135m' is a catalog model's name: choose another"),
    ("../kitchen", "--out '../kitchen': a model name may hold letters, digits, '.', '_' and '-' only"),
])
@pytest.mark.parametrize("command", [["train", "--data", "notes.jsonl"], ["prune", "smollm2-135m", "--ratio", "0.3"]])
def test_a_new_model_name_is_checked_before_any_work(tmp_path: Path, command, name, said):
    done = hearth(*command, "--out", name, home=tmp_path)
    assert (done.returncode, done.stderr) == (2, f"hearth: {said}\n")


def test_json_progress_keeps_one_event_per_line_when_threads_report_together(capsys):
    # Pooled and federated jobs report from several threads at once (the base model goes to each
    # device in parallel): two events once shared a line, and the federated lab test failed on it.
    import threading

    from app.commands.train import _JsonReport
    from training.job import ProgressEvent

    report = _JsonReport()

    def send(device: int) -> None:
        for i in range(300):
            report(ProgressEvent("load", message=f"sending the base model to device {device} ({i})"))

    threads = [threading.Thread(target=send, args=(d,)) for d in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as Python can, so a race shows every run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 * 300
    assert all(json.loads(line)["phase"] == "load" for line in lines)


def test_a_pruned_model_is_trained_on_and_nothing_else_is_printed(tmp_path: Path):
    """`hearth prune` says the pruned model needs training and how; `hearth train --model` on it
    is that training (it was refused as "already personalised"). Neither command prints
    transformers' progress bars, which used to land between their lines."""
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

    data = str(HOUSEHOLD / "train.jsonl")
    done = hearth("prune", str(tiny_llama_dir()), "--ratio", "0.5", "--data", data, "--out", "small", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("note: a pruned model answers poorly until trained again; train it on your data: "
                           "hearth train --model small --method lora --data PATH --out NAME\n")
    done = hearth("train", "--model", "small", "--method", "lora", "--data", data, "--epochs", "1",
                  "--out", "family", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Trained family" in done.stderr and "it/s" not in done.stderr and "Loading weights" not in done.stderr
    manifest = json.loads((tmp_path / "data" / "models" / "family" / "hearth-model.json").read_text())
    assert manifest["base"] == "small" and manifest["format"] == "peft"
    # an adapter model is still no base to train on: its weights are not whole
    done = hearth("train", "--model", "family", "--data", data, "--out", "again", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "hearth: model family is already personalised: train from its base (small)"


def test_train_learns_every_data_source_given(tmp_path: Path):
    """`--data` repeats: a family's notes and the answers taught in Chat, in one job (retrained
    on the taught answers alone, a model forgot the notes). The model's manifest keeps every
    source, as absolute paths, so the app can say later what a retrain would leave out."""
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir, write_jsonl

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "garden.md").write_text("Water the tomatoes every evening.", "utf-8")
    taught = write_jsonl(tmp_path / "taught.jsonl", [{"prompt": "Bin day?", "response": "Tuesday."}] * 3)
    both = ["--data", str(HOUSEHOLD / "train.jsonl"), "--data", str(notes), "--data", str(taught)]
    done = hearth("train", *both, "--model", str(tiny_llama_dir()), "--method", "lora", "--epochs", "1",
                  "--out", "family", home=tmp_path)
    assert done.returncode == 0, done.stderr
    details = json.loads((tmp_path / "data" / "models" / "family" / "hearth-model.json").read_text())["details"]
    assert details["samples"] == 20 + 1 + 3
    assert details["data"] == ["train.jsonl", "notes", "taught.jsonl"]
    assert details["spec"]["data"] == [str(p.resolve()) for p in (HOUSEHOLD / "train.jsonl", notes, taught)]
    # the same source twice would be learnt twice as hard: refused before anything loads
    done = hearth("train", "--data", str(taught), "--data", str(taught), "--out", "twice", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"hearth: {taught}: given twice as training data"
    assert not (tmp_path / "data" / "models" / "twice").exists()
