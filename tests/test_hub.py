"""Hub downloads (training/hub.py, `hearth models pull`) against the hub on loopback of
tests/hub_helpers.py: progress, resume of a broken transfer, and one-line errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_helpers import HUB_ID, REPO_ROOT, HubMirror, hearth, hearth_env


def test_hub_download_shows_progress_and_resumes_a_broken_transfer(
    hub_mirror: HubMirror, hub_model_dir: Path, tmp_path, monkeypatch
):
    weights = hub_mirror.files["model.safetensors"]
    cut = 15 * 1024 * 1024
    hub_mirror.drop_after["model.safetensors"] = cut
    home = tmp_path / "home"

    done = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert (folder / "model.safetensors").read_bytes() == weights
    assert str(folder).startswith(str(home / "cache" / "hub"))
    # the byte counter of the progress bar (tqdm, on stderr) reached the whole size
    assert "Downloading bytes" in done.stderr and "100%" in done.stderr, done.stderr

    # The first transfer broke after `cut` bytes; the retry asked for the rest only.
    first, second = hub_mirror.gets("model.safetensors")
    assert first.range is None and first.bytes_sent == cut
    start = int(re.fullmatch(r"bytes=(\d+)-", second.range).group(1))
    assert 0 < start <= cut  # huggingface_hub resumes from the last 10 MiB chunk it wrote
    assert second.bytes_sent == len(weights) - start

    # The downloaded model resolves without the server and loads into transformers.
    monkeypatch.setenv("HEARTH_HOME", str(home))
    import torch
    from transformers import AutoModelForCausalLM

    from training.model_store import load_torch, resolve

    ref = resolve(HUB_ID)
    assert ref.kind == "hf_dir" and ref.path == folder
    model, tokenizer = load_torch(ref)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    source = AutoModelForCausalLM.from_pretrained(hub_model_dir)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)

    # Offline mode uses the cache and sends nothing.
    requests_before = len(hub_mirror.log)
    offline = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url, offline=True)
    assert offline.returncode == 0 and Path(offline.stdout.strip()) == folder, offline.stderr
    assert len(hub_mirror.log) == requests_before

    # A second pull finds everything in the cache: no file is fetched again.
    requests_before = len(hub_mirror.log)
    again = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder
    assert not [r for r in hub_mirror.log[requests_before:] if r.method == "GET" and "/resolve/" in r.path]


@pytest.mark.parametrize("command", [["models", "pull", HUB_ID], ["chat", "--model", HUB_ID, "--no-history"]],
                         ids=["pull", "chat"])
def test_ctrl_c_stops_a_download_at_once_and_leaves_no_partial_file(command, hub_mirror: HubMirror, tmp_path):
    """huggingface_hub downloads in threads Python waits for: a plain KeyboardInterrupt let the
    download run on to the end, and a killed process left its partial file in the cache. Every
    command that loads a model downloads it through the same path (`app.commands.models.fetch`)."""
    hub_mirror.slow = 0.3                                 # 23 MB at ~3 MB/s
    home = tmp_path / "home"
    pull = subprocess.Popen([sys.executable, "-m", "app", *command],
                            env=hearth_env(home, hub_mirror.url), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(r.bytes_sent for r in hub_mirror.gets("model.safetensors")):
            assert time.monotonic() < deadline and pull.poll() is None, "the download never started"
            time.sleep(0.1)
        pull.send_signal(signal.SIGINT)
        _, stderr = pull.communicate(timeout=10)
    finally:
        pull.kill()
    assert pull.returncode == 128 + signal.SIGINT
    errors = [line for line in stderr.splitlines() if line.startswith("hearth:")]
    assert errors == [f"hearth: download of {HUB_ID} stopped (files already complete are kept)"], stderr[-2000:]
    [sent] = hub_mirror.gets("model.safetensors")
    assert sent.bytes_sent < len(hub_mirror.files["model.safetensors"])
    blobs = home / "cache" / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "blobs"
    assert blobs.is_dir() and not list(blobs.glob("*.incomplete"))


def test_interrupted_download_keeps_finished_files(hub_mirror: HubMirror, tmp_path):
    """A run that fails part-way keeps the files it finished; the next run fetches only the rest."""
    hub_mirror.failing.add("model.safetensors")
    home = tmp_path / "home"
    broken = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert broken.returncode == 2
    # Besides the progress bars, stderr holds one line naming the model and the failure.
    errors = [line for line in broken.stderr.splitlines() if line.startswith("hearth:")]
    assert len(errors) == 1 and HUB_ID in errors[0] and "500" in errors[0], broken.stderr
    finished = {r.path.rsplit("/", 1)[1] for r in hub_mirror.log if r.method == "GET" and r.bytes_sent}
    assert "config.json" in finished and "model.safetensors" not in finished

    hub_mirror.failing.clear()
    log_start = len(hub_mirror.log)
    done = hearth(home, "models", "pull", HUB_ID, endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "model.safetensors").read_bytes() == hub_mirror.files["model.safetensors"]
    fetched_again = {r.path.rsplit("/", 1)[1] for r in hub_mirror.log[log_start:]
                     if r.method == "GET" and "/resolve/" in r.path}
    assert fetched_again == {"model.safetensors"}


def test_unknown_hub_id_is_one_line_error(hub_mirror: HubMirror, tmp_path):
    done = hearth(tmp_path / "home", "models", "pull", "hearth-test/no-such-model", endpoint=hub_mirror.url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "hearth-test/no-such-model" in lines[0] and "no such model" in lines[0]
    assert hub_mirror.url in lines[0]


def test_offline_mode_is_one_line_error(hub_mirror: HubMirror, tmp_path):
    done = hearth(tmp_path / "home", "models", "pull", HUB_ID, endpoint=hub_mirror.url, offline=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert HUB_ID in lines[0] and "offline mode" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not hub_mirror.log  # offline means no request at all


def test_unreachable_hub_is_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = hearth(tmp_path / "home", "models", "pull", HUB_ID, endpoint=f"http://127.0.0.1:{port}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert HUB_ID in lines[0] and "cannot be reached" in lines[0]


def test_catalog_name_downloads_its_hub_id_and_becomes_available(hub_mirror: HubMirror, tmp_path):
    # The mirror serves the small model under the catalog entry's hub id.
    hub_mirror.repo_id = "HuggingFaceTB/SmolLM2-360M-Instruct"
    home = tmp_path / "home"
    done = hearth(home, "models", "pull", "smollm2-360m", endpoint=hub_mirror.url)
    assert done.returncode == 0, done.stderr
    assert "models--HuggingFaceTB--SmolLM2-360M-Instruct" in done.stdout

    listed = hearth(home, "models", "list", "--json", endpoint=hub_mirror.url, offline=True)
    row = next(r for r in json.loads(listed.stdout)["models"] if r["name"] == "smollm2-360m")
    assert row["available"] and row["path"] == done.stdout.strip()
