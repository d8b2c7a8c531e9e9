"""The PAC planner: DP layer split, memory limits, batch shares, step-time predictions."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import HearthError
from training.planner import (
    DeviceProfile,
    ModelSpec,
    RawMeasurement,
    llama_model_spec,
    make_plan,
    profile_from_measurement,
    proportional_shares,
    split_layers,
    stage_cost,
)

MB = 1_000_000


def _model(layers: int = 6, layer_mb: int = 10, embed_mb: int = 5) -> ModelSpec:
    return ModelSpec(
        layer_bytes=[layer_mb * MB] * layers,
        activation_bytes=200_000,
        embedding_bytes=embed_mb * MB,
        adapter_bytes=1 * MB,
        working_bytes=2 * MB,
    )


def _device(name: str, per_layer_s: float, memory_mb: float, layers: int = 6, bw: float = 10 * MB) -> DeviceProfile:
    return DeviceProfile(name, [per_layer_s] * layers, per_layer_s, int(memory_mb * MB), bw, 0.002)


def _brute_force(devices, model, microbatch=1) -> float:
    best = math.inf
    layers = model.layers
    for cuts in itertools.combinations_with_replacement(range(layers + 1), len(devices) - 1):
        bounds = [0, *cuts, layers]
        worst = 0.0
        for k, device in enumerate(devices):
            first, end = bounds[k], bounds[k + 1]
            if end > first:
                worst = max(worst, stage_cost(device, model, first, end, microbatch))
        best = min(best, worst)
    return best


@st.composite
def _instances(draw):
    layers = draw(st.integers(1, 6))
    n = draw(st.integers(1, 4))
    layer_bytes = draw(st.lists(st.integers(1, 20), min_size=layers, max_size=layers))
    model = ModelSpec(
        layer_bytes=[b * MB for b in layer_bytes],
        activation_bytes=draw(st.integers(0, 5)) * MB,
        embedding_bytes=draw(st.integers(0, 10)) * MB,
        working_bytes=MB,
    )
    devices = []
    for k in range(n):
        times = draw(st.lists(st.floats(0.001, 1.0), min_size=layers, max_size=layers))
        memory = draw(st.integers(2, 80)) * MB
        bandwidth = draw(st.floats(1.0, 50.0)) * MB
        devices.append(DeviceProfile(f"d{k}", times, 0.01, memory, bandwidth, draw(st.floats(0, 0.01))))
    return devices, model


@settings(max_examples=150, deadline=None)
@given(_instances())
def test_layer_split_matches_brute_force(instance):
    devices, model = instance
    bottleneck, blocks = split_layers(devices, model)
    expected = _brute_force(devices, model)
    if expected == math.inf:
        assert bottleneck == math.inf and blocks == []
        return
    assert bottleneck == pytest.approx(expected)
    # The blocks are contiguous, cover every layer once, and realise the bottleneck.
    assert blocks[0][0] == 0 and blocks[-1][1] == model.layers
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    realised = max(stage_cost(d, model, i, j) for d, (i, j) in zip(devices, blocks) if j > i)
    assert realised == pytest.approx(bottleneck)


@settings(max_examples=100, deadline=None)
@given(_instances())
def test_every_stage_fits_its_device_memory(instance):
    devices, model = instance
    _, blocks = split_layers(devices, model)
    for device, (first, end) in zip(devices, blocks):
        if end > first:
            need = sum(model.layer_bytes[first:end]) + model.working_bytes + (model.embedding_bytes if first == 0 else 0)
            assert need <= device.memory_bytes


def test_strong_devices_are_replicas_and_weak_ones_form_a_pipeline():
    model = _model()   # 65 MB backbone + 2 MB working
    devices = [
        _device("desktop", 0.001, 4000),
        _device("laptop", 0.002, 2000),
        _device("phone-a", 0.01, 40),
        _device("phone-b", 0.01, 40),
    ]
    plan = make_plan(devices, model, global_batch=32)
    kinds = {u.kind: u for u in plan.units}
    assert [u.devices for u in plan.units if u.kind == "replica"] == [["desktop"], ["laptop"]]
    pipeline = kinds["pipeline"]
    assert sorted(pipeline.devices) == ["phone-a", "phone-b"]
    covered = [layer for s in pipeline.stages for layer in range(s.first_layer, s.last_layer + 1)]
    assert covered == list(range(model.layers))
    assert sum(u.share for u in plan.units) == 32
    text = plan.describe()
    assert "desktop" in text and "phone-a" in text and "layers" in text and "sent to" in text


def test_no_group_can_hold_the_backbone_is_a_clear_error():
    model = _model()
    devices = [_device("phone-a", 0.01, 20), _device("phone-b", 0.01, 20)]
    with pytest.raises(HearthError, match="no device or group of devices can hold the backbone"):
        make_plan(devices, model, global_batch=8)


def test_wrong_profile_length_names_the_device():
    model = _model(layers=6)
    bad = DeviceProfile("tablet", [0.01] * 5, 0.01, 10**10, 1e7)
    with pytest.raises(HearthError, match="tablet.*layer_time_s"):
        make_plan([bad], model, global_batch=4)


def test_shares_sum_to_the_batch_and_follow_speed():
    model = _model()
    devices = [_device("fast", 0.001, 4000), _device("mid", 0.002, 4000), _device("slow", 0.004, 4000)]
    plan = make_plan(devices, model, global_batch=70)
    shares = plan.shares
    assert sum(shares.values()) == 70
    assert shares == {"fast": 40, "mid": 20, "slow": 10}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=10), st.integers(0, 500))
def test_proportional_shares_are_integers_within_one_of_exact(speeds, total):
    shares = proportional_shares(speeds, total)
    assert sum(shares) == total
    for s, speed in zip(shares, speeds):
        assert abs(s - total * speed / sum(speeds)) < 1.0


def test_slow_phone_gets_a_small_share():
    model = _model()
    devices = [_device("desktop", 0.001, 4000), _device("phone", 0.05, 4000)]
    plan = make_plan(devices, model, global_batch=64)
    assert plan.shares["phone"] <= 2
    assert plan.shares["desktop"] >= 62
    # The phone's small share keeps it from holding the step back: predicted epoch-1 step is
    # close to the desktop alone doing its share, far below an even split.
    even_split = 32 * (0.05 * 6 + 0.05)
    assert plan.epoch1_step_s < even_split / 5


def test_later_epochs_are_faster_and_send_only_adapter_averages():
    model = _model()
    devices = [_device("desktop", 0.001, 4000), _device("phone-a", 0.01, 40), _device("phone-b", 0.01, 40)]
    plan = make_plan(devices, model, global_batch=16)
    # Later steps: adapter gradients up to the coordinator and back down, from every other device.
    assert plan.later_bytes_per_step == 2 * 2 * model.adapter_bytes
    assert plan.epoch1_bytes_per_step > plan.later_bytes_per_step   # pipeline boundaries too
    assert plan.later_step_s < plan.epoch1_step_s


def test_device_too_small_for_adapters_is_excluded_by_name():
    model = _model()
    devices = [_device("desktop", 0.001, 4000), _device("watch", 0.001, 3)]
    plan = make_plan(devices, model, global_batch=8)
    assert plan.excluded == ["watch"]
    assert "watch" in plan.describe()


def test_profile_from_measurement_turns_flops_into_layer_times():
    model = llama_model_spec(
        layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
        tokens_per_sample=128, adapter_params=500_000,
    )
    fast = profile_from_measurement(RawMeasurement("desktop", 8, 16 << 30, 200e9, 50e6, 0.004), model)
    slow = profile_from_measurement(RawMeasurement("phone", 4, 2 << 30, 20e9, 5e6, 0.02), model)
    assert len(fast.layer_time_s) == 30
    assert slow.forward_s == pytest.approx(10 * fast.forward_s)
    # A SmolLM2 layer holds 3.54M weights: 2 x 3.54M x 128 tokens + attention = 0.94 GFLOP forward.
    assert model.layer_flops[0] == pytest.approx(2 * 3_538_944 * 128 + 4 * 128 * 128 * 576)
    assert fast.latency_s == pytest.approx(0.002)
    plan = make_plan([fast, slow], model, global_batch=32)
    assert plan.shares["desktop"] > plan.shares["phone"]


def test_bad_measurement_is_a_clear_error():
    model = llama_model_spec(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100, tokens_per_sample=8)
    with pytest.raises(HearthError, match="phone.*matmul_flops_per_s"):
        profile_from_measurement(RawMeasurement("phone", 4, 1 << 30, 0.0, 1e6, 0.01), model)
