"""FedSpine's planned rounds: the time model (`RoundCost`, each device's rates from its reports),
the round length T, and the shared quality bandit rewarded by the global model's loss."""

from __future__ import annotations

import math

import pytest
import torch

from training.aggregation import LoraFactors
from training.fedsim import SimConfig, device_round_seconds, make_fleet, round_cost
from training.fedspine import (
    MAX_EXTRA_RATIO,
    MIN_PLANNED_RANK,
    UNMEASURED_RANK,
    DeviceRates,
    DeviceReport,
    FedSpineConfig,
    FedSpineServer,
    Importance,
    ModuleUnits,
    RoundCost,
    UnitLayout,
    dequantise_slots,
    quantise_slots,
    sparsity_at,
)

LAYERS, HEADS, HEAD_DIM, CHANNELS, HIDDEN = 2, 4, 2, 8, 8


def _layout() -> UnitLayout:
    modules = {}
    for layer in range(LAYERS):
        modules[f"{layer}.q"] = ModuleUnits(layer, "heads", "rows", HEAD_DIM)
        modules[f"{layer}.down"] = ModuleUnits(layer, "channels", "cols", 1)
    return UnitLayout(LAYERS, HEADS, CHANNELS, modules)


def _shape(name: str) -> tuple[int, int]:   # (in, out)
    return (HIDDEN, HEADS * HEAD_DIM) if name.endswith(".q") else (CHANNELS, HIDDEN)


def _lora(rank: int, fill: float = 0.0) -> dict[str, LoraFactors]:
    return {n: LoraFactors(torch.full((rank, _shape(n)[0]), fill), torch.full((_shape(n)[1], rank), fill)) for n in _layout().modules}


# One unit of work per kept fraction and one byte per rank: times are easy to compute by hand.
COST = RoundCost(fixed_work=10.0, head_work=20.0, channel_work=70.0, fixed_bytes=4.0, rank_bytes=1.0)


def _server(**kw) -> FedSpineServer:
    config = FedSpineConfig(**{"target_sparsity": 0.5, "warmup_rounds": 1, "ramp_rounds": 2, **kw})
    return FedSpineServer(config, _layout(), _lora(16), {"head": torch.zeros(3)}, seed=0, cost=COST)


def _report(server: FedSpineServer, plan, opened_at: float, loss_before: float = 2.0, rates: DeviceRates | None = None) -> DeviceReport:
    """A report whose timings follow `rates` (default: 1 work/s, 1 byte/s) at the plan's cell."""
    rates = rates or DeviceRates(1.0, 1.0)
    heads, channels = float(plan.keep.heads.float().mean()), float(plan.keep.channels.float().mean())
    compute = COST.work(heads, channels) / rates.compute
    transfer = COST.bytes(plan.rank, heads, channels) / rates.link
    return DeviceReport(
        round=plan.round, device=plan.device, lora=_lora(plan.rank, 0.1), keep=plan.keep,
        dense={"head": torch.ones(3)}, samples=10, loss_before=loss_before, loss_after=loss_before - 0.1,
        importance=Importance(torch.ones(LAYERS, HEADS), torch.ones(LAYERS, CHANNELS)),
        compute_s=compute, transfer_s=transfer, finished_at_s=opened_at + compute + transfer,
    )


def test_one_report_predicts_every_cell_on_the_simulated_clock():
    config = SimConfig.for_scale("quick")
    layout = UnitLayout(30, 9, 1536, {})
    server = FedSpineServer(FedSpineConfig(), layout, {}, seed=0, cost=round_cost(config, 16))
    device = make_fleet(config)[0]
    plan = server.plan_round([device.name])[0]          # round 0: warmup, nothing pruned
    # Every slot of the rank-16 global state is sent; the plan's rank of them train.
    compute, transfer = device_round_seconds(device, plan.keep, plan.rank, config, 16)
    server.aggregate_round([DeviceReport(
        round=0, device=device.name, lora={}, keep=plan.keep, dense={}, samples=1, loss_before=1.0, loss_after=1.0,
        importance=Importance(torch.zeros(30, 9), torch.zeros(30, 1536)),
        compute_s=compute, transfer_s=transfer, finished_at_s=compute + transfer)])
    for ratio, rank in ((0.0, 2), (0.3, 4), (0.5, 16)):
        keep = server.consensus_mask(ratio)
        actual = sum(device_round_seconds(device, keep, rank, config, 16))
        # Exact but for the link's latency (0.1 s a round), which the link rate absorbs.
        assert server.predicted_seconds(device.name, ratio, rank) == pytest.approx(actual, abs=0.15)
    assert server.predicted_seconds("never-seen", 0.3, 4) == math.inf


def test_measured_devices_finish_within_the_slowest_ones_fastest_option():
    server = _server()
    server.round = 4                                      # past the ramp: the schedule prunes half
    floor = sparsity_at(4, server.config)
    server.rates = {"slow": DeviceRates(0.5, 0.5), "mid": DeviceRates(2.0, 1.0), "fast": DeviceRates(8.0, 8.0),
                    "other": DeviceRates(1.0, 1.0)}
    devices = ["slow", "mid", "fast", "new"]
    limit = server.round_length(devices)
    # T is the slow device's time at the schedule and the lowest planned rank ("new" counts at the
    # median measured rates, which are faster).
    assert limit == pytest.approx(server.predicted_seconds("slow", floor, MIN_PLANNED_RANK))
    for _ in range(6):                                    # whatever cells the bandit tries
        plans = {p.device: p for p in server.plan_round(devices)}
        for name in ("slow", "mid", "fast"):
            p = plans[name]
            assert server.predicted_seconds(name, p.ratio, p.rank) <= limit * (1 + 1e-9)
            assert floor <= p.ratio <= floor + MAX_EXTRA_RATIO and p.rank >= MIN_PLANNED_RANK
        if plans["slow"].ratio == pytest.approx(floor):  # at the schedule only its fastest option fits
            assert plans["slow"].rank == MIN_PLANNED_RANK
        assert MIN_PLANNED_RANK <= plans["new"].rank <= UNMEASURED_RANK
        server.aggregate_round([_report(server, p, 0.0, rates=server.rates.get(d) or DeviceRates(1.0, 1.0))
                                for d, p in plans.items()])
        server.rates.pop("new")                           # its report measured it; keep it new
        server.round = 4


def test_a_planned_round_sends_every_slot_and_the_frozen_ones_quantised():
    server = _server()
    generator = torch.Generator().manual_seed(0)
    server.lora = {n: LoraFactors(torch.randn(f.a.shape, generator=generator), torch.randn(f.b.shape, generator=generator))
                   for n, f in server.lora.items()}
    server.round = 4
    server.rates = {"slow": DeviceRates(0.5, 0.5), "fast": DeviceRates(8.0, 8.0)}
    plans = {p.device: p for p in server.plan_round(["slow", "fast"])}
    assert plans["slow"].rank < 16 and plans["slow"].sent_rank == 16
    for plan in plans.values():
        r = plan.rank
        for name, f in plan.lora.items():
            g = server.lora[name]
            assert f.rank == 16 and torch.equal(f.a[:r], g.a[:r]) and torch.equal(f.b[:, :r], g.b[:, :r])
            assert torch.equal(f.a[r:], dequantise_slots(*quantise_slots(g.a[r:], 1)))
            assert torch.equal(f.b[:, r:], dequantise_slots(*quantise_slots(g.b[:, r:], 0)))
            assert r == 16 or not torch.equal(f.a[r:], g.a[r:])
    # The time model charges the whole state down: a fixed part at the frozen width, then per slot trained.
    assert server.predicted_seconds("slow", 0.5, 4) < server.predicted_seconds("slow", 0.5, 8)


def test_a_report_teaches_the_time_model_the_device_rates():
    server = _server()
    plan = server.plan_round(["a"])[0]
    server.aggregate_round([_report(server, plan, 0.0, rates=DeviceRates(2.0, 4.0))])
    assert server.rates["a"].compute == pytest.approx(2.0) and server.rates["a"].link == pytest.approx(4.0)
    assert server.bandits == {}                           # the per-device bandits are not used


def test_fixed_arms_bypass_the_planner():
    from training.bandit import Arm

    server = _server()
    server.round = 4
    server.rates = {"a": DeviceRates(1.0, 1.0)}
    plan = server.plan_round(["a"], fixed={"a": Arm(-1, 0.5, 8)})[0]
    assert (plan.ratio, plan.rank) == (0.5, 8)


def test_the_quality_bandit_is_credited_with_the_next_rounds_global_loss_drop():
    server = _server(warmup_rounds=0)
    # The global model's loss (the devices' loss before training) drops by 0.1-0.15 a round, then
    # by 0.5 once: the round before that drop is the one its cells are credited for.
    losses = [3.0, 2.85, 2.75, 2.6, 2.1, 2.0]
    played = []
    for loss in losses:
        plans = server.plan_round(["a", "b"])
        played.append({p.arm.cell_id for p in plans})
        before = {c.id: (c.pulls, c.reward_sum) for c in server.quality.cells}
        server.aggregate_round([_report(server, p, 0.0, loss_before=loss) for p in plans])
        if loss == 2.1:
            # Credited now: the cells of the round before, with a drop well above the recent ones.
            gained = [c.reward_sum - before[c.id][1] for c in server.quality.cells
                      if c.id in before and c.pulls > before[c.id][0]]
            assert gained and all(g > 1.0 for g in gained)
            assert {c.id for c in server.quality.cells if c.id in before and c.pulls > before[c.id][0]} <= played[-2]
    assert server.credit["loss"] == pytest.approx(2.0)


def test_planned_server_checkpoint_round_trips(tmp_path):
    server = _server()
    for _ in range(4):
        plans = server.plan_round(["a", "b"])
        server.aggregate_round([_report(server, p, 0.0, loss_before=2.0 - 0.1 * server.round) for p in plans])
    server.save(tmp_path / "ckpt")
    loaded = FedSpineServer.load(tmp_path / "ckpt")
    assert loaded.cost == COST and loaded.rates == server.rates
    assert loaded.quality.state == server.quality.state and loaded.credit == server.credit
    assert (loaded.gain_mean, loaded.gain_var) == (server.gain_mean, server.gain_var)
    assert loaded.round_length(["a", "b"]) == server.round_length(["a", "b"])


def test_frozen_slots_quantise_to_int8_with_a_scale_per_slot():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [300.0, 1.0, -2.0]])
    values, scale = quantise_slots(x, 1)
    assert values.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert values[0].tolist() == [64, -127, 32] and values[2, 0] == 127      # a slot's largest maps to 127
    assert torch.equal(dequantise_slots(values, scale)[1], x[1])               # an all-zero slot stays zero
    back = dequantise_slots(values, scale)
    assert torch.all((back - x).abs() <= x.abs().amax(1, keepdim=True) / 254 * 1.001)
    # Quantising what came back gives it again (to float32's rounding of the scale).
    assert torch.allclose(dequantise_slots(*quantise_slots(back, 1)), back, rtol=1e-6, atol=0)
    # B's slots are tiny early on: a float16 scale would underflow to nothing here.
    tiny = 1e-9 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    back = dequantise_slots(*quantise_slots(tiny, 0))
    assert torch.all((back - tiny).abs() <= tiny.abs().amax(0, keepdim=True) / 254 * 1.001)

