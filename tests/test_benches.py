"""Every `hearth bench NAME --json` really runs, end to end through the command line, on settings
small enough for the suite, and prints the documented JSON with its ratios.

These check that the benchmarks work and report what they claim to report; they assert no speed
(speed on a shared 2-core machine is what the benchmarks themselves measure and record, with the
load average, in docs/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training_helpers import tiny_llama_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(*args: str, home: Path, timeout: float = 600) -> dict:
    done = subprocess.run([sys.executable, "-m", "app", "bench", *args, "--json"], cwd=REPO_ROOT,
                          env=dict(os.environ, HEARTH_HOME=str(home)), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)   # stdout is the JSON alone: llama.cpp's logs go to stderr


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_bench_serving_reports_every_variant_and_its_ratios(tmp_path):
    report = bench("serving", "--runs", "1", "--tokens", "8", "--quant", "q8_0", home=tmp_path)
    assert [r["variant"] for r in report["llama_cpp"]] == ["unpruned", "pruned30", "pruned50"]
    unpruned, pruned30, pruned50 = report["llama_cpp"]
    assert unpruned["weight_bytes"] > pruned30["weight_bytes"] > pruned50["weight_bytes"]
    assert pruned30["intermediate_size"] < unpruned["intermediate_size"]
    for row in [*report["llama_cpp"], report["transformers"]]:
        assert _positive(row["decode_tokens_per_s"]) and _positive(row["ttft_s"])
        assert _positive(row["bandwidth_bound_tokens_per_s"])
    for key in ("pruned30_decode_speedup", "llamacpp_vs_transformers", "fraction_of_bandwidth_bound",
                "pruned30_efficiency", "memory_bandwidth_gb_s", "copy_bandwidth_gb_s"):
        assert _positive(report[key]), key
    # The memory-bound ideal follows from the sizes alone.
    assert report["pruned30_ideal_speedup"] == round(unpruned["weight_bytes"] / pruned30["weight_bytes"], 3)
    assert report["targets"]["llamacpp_vs_transformers"] == 5.0


def test_bench_pruning_reports_perplexity_before_after_and_recovered(tmp_path):
    report = bench("pruning", "--model", str(tiny_llama_dir()), "--steps", "3", "--heldout", "4",
                   "--batch-size", "2", home=tmp_path)
    for key in ("perplexity_before", "perplexity_after_pruning", "perplexity_after_recovery"):
        assert _positive(report[key]) and report[key] < 1e9, key
    assert report["parameters_after"] < report["parameters_before"]
    assert 0 < report["channels_removed"] < 1   # the tiny MLP rounds to multiples of 32
    assert report["recovery"]["steps"] == 3


def test_bench_training_runs_each_method_side_by_side(tmp_path):
    report = bench("training", "--model", str(tiny_llama_dir()), "--methods", "pac_cache,lora_r8_qv",
                   "--epochs", "3", "--clinc-intents", "2", "--clinc-train", "2", "--clinc-eval", "1",
                   home=tmp_path, timeout=900)
    assert list(report["methods"]) == ["pac_cache", "lora_r8_qv"]
    for method in report["methods"].values():
        assert "error" not in method, method
        assert _positive(method["wall_s"]) and _positive(method["peak_rss_train_mb"])
        assert _positive(method["peak_rss_load_mb"])
        assert method["peak_rss_process_mb"] == max(method["peak_rss_load_mb"], method["peak_rss_train_mb"])
        assert len(method["epoch_s"]) == 3
        # general knowledge before and after, on the shipped general questions
        assert method["general_questions"] >= 40
        assert 0 <= method["general_recall_after"] <= method["general_questions"]
        assert 0 <= method["general_recall_before"] <= method["general_questions"]
    assert _positive(report["speedup_vs_lora"])
    pac = report["methods"]["pac_cache"]
    assert _positive(pac["chat_decode_tokens_per_s_float32"])
    if pac["chat_bf16_native"]:                      # this machine: /proc/cpuinfo has avx512_bf16
        assert _positive(pac["chat_bf16_speedup"]) and "household_recall_after_bfloat16" in pac


def test_bench_transport_compares_tls_with_tcp_and_averaging_with_gloo(tmp_path):
    report = bench("transport", "--tensor-mb", "4", "--params", "200000", "--repeats", "2", "--world", "2",
                   home=tmp_path)
    text = json.dumps(report)
    assert "gloo" in text and "tls" in text.lower()


def test_bench_mesh_runs_one_device_and_two_over_a_shaped_link(tmp_path, shared_dir, stories_gguf):
    """Two network namespaces, a worker paired through its prompt, the pooled job beside the
    single-device one: the ratios, the prediction and each device's busy seconds per epoch.
    The tiny stories260K model has no chat template: the household facts go in as notes."""
    from tests.netns import lab_unavailable
    from tests.test_pooled import household_notes

    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    notes = household_notes(shared_dir, tmp_path / "notes")
    report = bench("mesh", "--model", str(stories_gguf), "--data", str(notes), "--batch-size", "10",
                   "--epochs", "2", home=tmp_path / "home")
    for key in ("epoch1_speedup", "later_epochs_speedup", "prediction_error", "prediction_error_epoch1"):
        assert isinstance(report[key], (int, float)) and report[key] >= 0, key
    assert len(report["single_epoch_s"]) == len(report["pooled_epoch_s"]) == 2
    assert len(report["device_busy_s"]) == 2 and "bench-worker" in report["device_busy_s"]
    assert all(len(epochs) == 2 for epochs in report["device_busy_s"].values())
    assert abs(report["single_final_loss"] - report["pooled_final_loss"]) < 1e-4
    assert isinstance(report["rebalanced"], list) and report["targets"]["later_epochs_speedup"] == 1.8
