"""Hearth reaches the internet only when asked to download a model.

bitsandbytes (imported by NF4/int8 backbones, and by peft for every LoRA job and LoRA chat) asks
the `kernels` package for a compiled kernel from the model hub when it is imported on an
AVX512-BF16 CPU: an HTTP request at import time and, from a trusted publisher, native code
downloaded and loaded. training/offline_bitsandbytes.py imports it without that. Here a real
HTTP server stands in for the hub (HF_ENDPOINT), and every request it gets is logged.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hub_helpers import hearth_env, serve_mirror
from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

KERNEL_PUBLISHER = "/api/organizations/kernels-community/overview"


@pytest.mark.slow
def test_lora_training_on_a_quantised_backbone_sends_nothing_to_the_hub(tmp_path):
    with serve_mirror({}) as hub:
        env = hearth_env(tmp_path / "home", hub.url)
        # What a plain import does, on this machine, for comparison.
        plain = subprocess.run(
            [sys.executable, "-c", "import bitsandbytes.functional as f; print(f.has_avx512bf16())"],
            env=env, capture_output=True, text=True, timeout=120)
        assert plain.returncode == 0, plain.stderr
        if plain.stdout.strip() == "True":
            assert KERNEL_PUBLISHER in [r.path for r in hub.log]
        hub.log.clear()

        done = subprocess.run(
            [sys.executable, "-m", "app", "train", "--data", str(HOUSEHOLD / "train.jsonl"),
             "--model", str(tiny_llama_dir()), "--method", "lora", "--quant", "nf4", "--epochs", "1",
             "--out", "offline"],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert [r.path for r in hub.log] == []
        assert "kernels-community" not in done.stderr and "FutureWarning" not in done.stderr
