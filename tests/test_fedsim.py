"""The federated fleet simulator and `hearth bench federated` (tiny settings; the real numbers
come from the benchmark itself, see docs/federated.md)."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch

from core.errors import HearthError
from training.fedsim import (
    CostModel,
    SimConfig,
    TinyLlama,
    device_round_seconds,
    evaluate,
    initial_lora,
    layout_for,
    load_fleet_data,
    make_fleet,
    simulate,
    train_locally,
)
from training.fedspine import FedSpineConfig, FedSpineServer, KeepMask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The small model's ops gain nothing from a second thread; on a busy machine it only spins.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clinc(shared_dir: Path) -> Path:
    return shared_dir / "data" / "clinc150" / "clinc150_train_val.json"


def _tiny(**kw) -> SimConfig:
    base = dict(devices=6, rounds=3, clients_per_round=3, local_steps=2, batch_size=8, pretrain_steps=10,
                eval_samples=200, warmup_rounds=1, ramp_rounds=2)
    base.update(kw)
    return SimConfig.for_scale("quick", **base)


def test_fleet_follows_the_paper_mix():
    fleet = make_fleet(SimConfig.for_scale("quick", 80))
    kinds = [d.kind for d in fleet]
    assert (kinds.count("jetson-tx2"), kinds.count("xavier-nx"), kinds.count("agx-xavier")) == (30, 40, 10)
    tx2 = [d.flops_per_s for d in fleet if d.kind == "jetson-tx2"]
    agx = [d.flops_per_s for d in fleet if d.kind == "agx-xavier"]
    assert max(tx2) < min(agx)


def test_pruning_and_smaller_rank_shorten_a_device_round():
    config = SimConfig.for_scale("quick")
    device = make_fleet(config)[0]
    full = KeepMask(torch.ones(30, 9, dtype=torch.bool), torch.ones(30, 1536, dtype=torch.bool))
    half = KeepMask(full.heads.clone(), full.channels.clone())
    half.heads[:, :4] = False
    half.channels[:, :768] = False
    c_full, t_full = device_round_seconds(device, full, 16, config)
    c_half, t_half = device_round_seconds(device, half, 4, config)
    assert c_half < 0.75 * c_full and t_half < t_full
    # The cost model's backbone is SmolLM2-sized: ~0.9 GFLOP forward per layer at 128 tokens.
    per_layer = CostModel().train_flops_per_sample(1.0, 1.0) / 3 / 30
    assert 0.8e9 < per_layer < 1.1e9


def test_split_is_non_iid_and_covers_every_device(shared_dir):
    config = _tiny(devices=10)
    data = load_fleet_data(_clinc(shared_dir), config)
    assert len(data.client_indices) == 10 and all(len(ix) >= config.batch_size for ix in data.client_indices)
    label_sets = [set(data.train.labels[ix].tolist()) for ix in data.client_indices]
    # Dirichlet(0.5): devices see quite different intents.
    assert min(len(s) for s in label_sets) < 150
    assert len(data.intents) == 150 and data.eval.ids.shape[0] == 200


def test_evaluation_in_length_sorted_trimmed_chunks_counts_what_the_padded_batch_counts(shared_dir):
    torch.manual_seed(0)
    config = _tiny(eval_samples=1200)
    data = load_fleet_data(_clinc(shared_dir), config)
    model = TinyLlama(config, data.vocab_size)
    head = {"weight": torch.randn(150, config.hidden), "bias": torch.zeros(150)}
    server = FedSpineServer(FedSpineConfig(), layout_for(model), initial_lora(model, 4, 0), head)
    with torch.no_grad():
        padded = model.logits(data.eval.ids, head, server.lora, None).argmax(-1)
    expected = float((padded == data.eval.labels).float().mean())
    assert expected > 0   # a random head still gets some right: the comparison means something
    assert evaluate(model, data.eval, server, None) == pytest.approx(expected, abs=1 / 1200)


@pytest.mark.slow
def test_masked_units_get_no_gradient_and_training_lowers_the_loss(shared_dir):
    torch.manual_seed(0)
    config = _tiny(local_steps=8, batch_size=16)
    data = load_fleet_data(_clinc(shared_dir), config)
    model = TinyLlama(config, data.vocab_size)
    for p in model.parameters():
        p.requires_grad_(False)
    keep = KeepMask(torch.ones(config.layers, config.heads, dtype=torch.bool), torch.ones(config.layers, config.channels, dtype=torch.bool))
    keep.heads[:, 1] = False
    keep.channels[:, :100] = False
    lora = initial_lora(model, 4, 0)
    head = {"weight": torch.zeros(150, config.hidden), "bias": torch.zeros(150)}
    result = train_locally(model, data, data.client_indices[0], lora, head, keep, config, random.Random(0))
    assert result.loss_after < result.loss_before
    hd = config.hidden // config.heads
    for layer in range(config.layers):
        q = result.lora[f"{layer}.q"]
        assert torch.equal(q.b[hd:2 * hd], lora[f"{layer}.q"].b[hd:2 * hd])     # pruned head's rows untouched
        assert torch.equal(result.lora[f"{layer}.up"].b[:100], lora[f"{layer}.up"].b[:100])
        assert torch.equal(result.lora[f"{layer}.down"].a[:, :100], lora[f"{layer}.down"].a[:, :100])
        heads, channels = result.importance
        assert heads[layer, 1] == 0 and channels[layer, :100].sum() == 0
        # Normalised per layer and averaged over the steps; the first step has no LoRA gradient
        # (the classifier head starts at zero), so the sum is (steps - 1) / steps.
        assert heads[layer].sum() == pytest.approx(7 / 8, abs=1e-4)


def test_a_device_trains_its_first_slots_on_the_whole_adapter_with_the_rest_frozen(shared_dir):
    config = _tiny(local_steps=3, batch_size=8)
    data = load_fleet_data(_clinc(shared_dir), config)
    torch.manual_seed(0)
    model = TinyLlama(config, data.vocab_size)
    for p in model.parameters():
        p.requires_grad_(False)
    keep = KeepMask(torch.ones(config.layers, config.heads, dtype=torch.bool), torch.ones(config.layers, config.channels, dtype=torch.bool))
    generator = torch.Generator().manual_seed(1)
    lora = {n: type(f)(f.a, 0.05 * torch.randn(f.b.shape, generator=generator)) for n, f in initial_lora(model, 4, 0).items()}
    head = {"weight": 0.1 * torch.randn(150, config.hidden, generator=generator), "bias": torch.zeros(150)}
    indices = data.client_indices[0]
    whole = train_locally(model, data, indices, lora, head, keep, config, random.Random(0))
    frozen = train_locally(model, data, indices, lora, head, keep, config, random.Random(0), rank=2)
    cut = train_locally(model, data, indices, {n: type(f)(f.a[:2], f.b[:, :2]) for n, f in lora.items()}, head,
                        keep, config, random.Random(0))
    # The loss before training is the whole adapter's, frozen slots included; cut to 2 it is not.
    assert frozen.loss_before == pytest.approx(whole.loss_before, abs=1e-5)
    assert abs(cut.loss_before - whole.loss_before) > 1e-3
    assert all(f.rank == 2 for f in frozen.lora.values())          # only the trained slots come back
    assert frozen.loss_after < frozen.loss_before
    assert any(not torch.equal(frozen.lora[n].b, lora[n].b[:, :2]) for n in lora)


def test_frozen_slots_cost_a_quarter_of_the_bytes_of_trained_ones_on_the_way_down():
    config = SimConfig.for_scale("quick")
    device = make_fleet(config)[0]
    keep = KeepMask(torch.ones(30, 9, dtype=torch.bool), torch.ones(30, 1536, dtype=torch.bool))
    latency = 2 * config.cost.latency_s
    _, cut = device_round_seconds(device, keep, 4, config)
    _, frozen = device_round_seconds(device, keep, 4, config, 16)
    _, full = device_round_seconds(device, keep, 16, config)
    slot = config.cost.lora_bytes(1, 1.0, 1.0) / device.bandwidth_bps        # one float32 slot, one way
    scales = 30 * 5 * 2 * 4 / device.bandwidth_bps        # per slot: float32 scales of A and B, 150 modules
    assert frozen - cut == pytest.approx(12 * (slot / 4 + scales))
    assert cut - latency < frozen - latency < full - latency


def test_unknown_scale_and_method_are_clear_errors(shared_dir):
    with pytest.raises(HearthError, match="--scale"):
        SimConfig.for_scale("huge")
    with pytest.raises(HearthError, match="unknown federated method 'fedavg'"):
        simulate(_tiny(methods=("fedavg",)), _clinc(shared_dir))
    from training.bench_federated import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(HearthError, match="--seeds: need at least 1"):
        build_config(parser.parse_args(["--seeds", "0"]))


@pytest.mark.slow
def test_methods_in_worker_processes_give_what_they_give_one_by_one(shared_dir):
    config = _tiny()
    alone = simulate(config, _clinc(shared_dir), workers=1)
    pooled = simulate(config, _clinc(shared_dir), workers=2)
    for method, result in alone.results.items():
        other = pooled.results[method]
        assert [(p.time_s, p.accuracy) for p in other.curve] == [(p.time_s, p.accuracy) for p in result.curve]
        assert (other.final_accuracy, other.mean_rank, other.mean_ratio) == (result.final_accuracy, result.mean_rank, result.mean_ratio)


@pytest.mark.slow
def test_quick_smoke_run_gives_sane_json(shared_dir, tmp_path):
    from training.bench_federated import add_arguments, report_dict

    report = simulate(_tiny(), _clinc(shared_dir))
    out = report_dict(report, tmp_path / "curve.png")
    json.dumps(out)   # plain JSON
    assert set(out["methods"]) == {"fedspine", "hetlora", "uniform", "random"}
    for name, m in out["methods"].items():
        assert 0.0 <= m["final_accuracy"] <= 1.0 and 0.0 <= m["final_accuracy_unpruned"] <= 1.0
        assert m["sim_time_s"] > 0 and math.isfinite(m["sim_time_s"])
        assert len(m["curve"]) == 4 and all(b[0] >= a[0] for a, b in zip(m["curve"], m["curve"][1:]))
        assert m["time_to_target_s"] is not None   # the target is chosen so that every method reaches it
    assert out["methods"]["hetlora"]["mean_pruning_ratio"] == 0.0
    assert out["methods"]["fedspine"]["mean_pruning_ratio"] > 0.0
    assert out["speedup_vs_best_baseline"] is None or (out["speedup_vs_best_baseline"] > 0 and math.isfinite(out["speedup_vs_best_baseline"]))
    assert math.isfinite(out["accuracy_gain_vs_uniform_pruning"])
    assert set(out["targets_met"]) == {"speedup", "accuracy_gain"}
    assert out["speedup_vs_best_baseline_smoothed"] > 0 and math.isfinite(out["accuracy_gain_vs_uniform_pruning_smoothed"])
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # The command's arguments parse as documented.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--devices", "80", "--scale", "quick", "--plot", "x.png", "--seeds", "3"])
    assert args.devices == 80 and args.scale == "quick" and args.plot == Path("x.png") and args.seeds == 3

    # Several seeds: means (the speed-up a geometric mean), spreads and each seed's own figures.
    from training.bench_federated import combine_seeds

    other = report_dict(simulate(_tiny(seed=1), _clinc(shared_dir)))
    assert (out["seed"], other["seed"]) == (0, 1)
    both = combine_seeds([out, other])
    json.dumps(both)
    assert both["seeds"] == [0, 1] and [s["seed"] for s in both["per_seed"]] == [0, 1]
    for name, m in both["methods"].items():
        a, b = out["methods"][name]["final_accuracy"], other["methods"][name]["final_accuracy"]
        assert m["final_accuracy"] == pytest.approx((a + b) / 2)
        assert m["final_accuracy_sd"] == pytest.approx(abs(a - b) / math.sqrt(2))
        assert m["curve_of_first_seed"] == out["methods"][name]["curve"]
    gains = [out["accuracy_gain_vs_uniform_pruning"], other["accuracy_gain_vs_uniform_pruning"]]
    assert both["accuracy_gain_vs_uniform_pruning"] == pytest.approx(sum(gains) / 2)
    speedups = [out["speedup_vs_best_baseline"], other["speedup_vs_best_baseline"]]
    assert both["speedup_vs_best_baseline_per_seed"] == speedups
    assert all(speedups)   # both seeds of this tiny fleet have one (0.17 and 1.31 here)
    assert both["speedup_vs_best_baseline"] == pytest.approx(math.sqrt(speedups[0] * speedups[1]))
    assert both["targets_met"]["accuracy_gain"] == (both["accuracy_gain_vs_uniform_pruning"] >= 0.4)
    smoothed = [out["speedup_vs_best_baseline_smoothed"], other["speedup_vs_best_baseline_smoothed"]]
    assert both["speedup_vs_best_baseline_smoothed"] == pytest.approx(math.sqrt(smoothed[0] * smoothed[1]))
    assert both["accuracy_gain_vs_uniform_pruning_smoothed"] == pytest.approx(
        (out["accuracy_gain_vs_uniform_pruning_smoothed"] + other["accuracy_gain_vs_uniform_pruning_smoothed"]) / 2)


def test_smoothed_figures_average_the_curves_over_several_evaluations():
    """One evaluation swings by points from round to round: the smoothed figures take each
    curve's trailing mean over SMOOTHING evaluations, a target every method's mean reaches, and
    the mean of the last SMOOTHING evaluations."""
    from training.bench_federated import SMOOTHING, smoothed_figures

    assert SMOOTHING == 5
    # uniform reaches 0.5 once by luck at t=4; fedspine climbs steadily.
    methods = {
        "fedspine": {"curve": [[t, a] for t, a in enumerate([0.0, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4])]},
        "uniform": {"curve": [[t * 2, a] for t, a in enumerate([0.0, 0.1, 0.5, 0.3, 0.3, 0.3, 0.3, 0.1])]},
    }
    out = smoothed_figures(methods)
    # Trailing means: fedspine 0, .1, .167, .225, .26, .34, .38, .4; uniform 0, .05, .2, .225, .24, .3, .34, .26.
    assert out["target_accuracy_smoothed"] == pytest.approx(0.95 * 0.34)
    assert methods["fedspine"]["time_to_target_smoothed_s"] == 5
    assert methods["uniform"]["time_to_target_smoothed_s"] == 12      # its lucky 0.5 at t=4 alone does not count
    assert methods["fedspine"]["final_accuracy_smoothed"] == pytest.approx(0.4)
    assert methods["uniform"]["final_accuracy_smoothed"] == pytest.approx(0.26)
    assert out["speedup_vs_best_baseline_smoothed"] == pytest.approx(12 / 5)
    assert out["accuracy_gain_vs_uniform_pruning_smoothed"] == pytest.approx(100 * (0.4 - 0.26))
