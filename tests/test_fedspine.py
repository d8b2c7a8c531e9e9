"""FedSpine round logic: plans, deadline/quorum, late reports, consensus mask, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.errors import HearthError
from training.aggregation import LoraFactors, LoraUpdate, aggregate_lora
from training.fedspine import (
    DeviceReport,
    FedSpineConfig,
    FedSpineServer,
    Importance,
    ModuleUnits,
    UnitLayout,
    module_masks,
    sparsity_at,
)

LAYERS, HEADS, HEAD_DIM, CHANNELS, HIDDEN = 2, 4, 2, 6, 8


def _layout() -> UnitLayout:
    modules = {}
    for layer in range(LAYERS):
        modules[f"{layer}.q"] = ModuleUnits(layer, "heads", "rows", HEAD_DIM)
        modules[f"{layer}.o"] = ModuleUnits(layer, "heads", "cols", HEAD_DIM)
        modules[f"{layer}.up"] = ModuleUnits(layer, "channels", "rows", 1)
        modules[f"{layer}.down"] = ModuleUnits(layer, "channels", "cols", 1)
    return UnitLayout(LAYERS, HEADS, CHANNELS, modules)


def _shape(name: str) -> tuple[int, int]:   # (in, out)
    kind = name.split(".")[1]
    return {"q": (HIDDEN, HEADS * HEAD_DIM), "o": (HEADS * HEAD_DIM, HIDDEN), "up": (HIDDEN, CHANNELS), "down": (CHANNELS, HIDDEN)}[kind]


def _lora(rank: int, fill: float = 0.0) -> dict[str, LoraFactors]:
    return {n: LoraFactors(torch.full((rank, _shape(n)[0]), fill), torch.full((_shape(n)[1], rank), fill)) for n in _layout().modules}


def _server(**kw) -> FedSpineServer:
    config = FedSpineConfig(**{"target_sparsity": 0.5, "warmup_rounds": 1, "ramp_rounds": 2, **kw})
    return FedSpineServer(config, _layout(), _lora(16), {"head": torch.zeros(3)}, seed=0)


def _report(plan, finished_at: float, value: float = 1.0, loss_after: float = 1.0, round_: int | None = None, imp=None) -> DeviceReport:
    heads = torch.full((LAYERS, HEADS), value) if imp is None else imp[0]
    channels = torch.full((LAYERS, CHANNELS), value) if imp is None else imp[1]
    return DeviceReport(
        round=plan.round if round_ is None else round_, device=plan.device,
        lora=_lora(plan.rank, value), keep=plan.keep, dense={"head": torch.full((3,), value)},
        samples=10, loss_before=2.0, loss_after=loss_after,
        importance=Importance(heads, channels), compute_s=finished_at, transfer_s=0.0, finished_at_s=finished_at,
    )


def test_sparsity_schedule_rises_to_the_target():
    config = FedSpineConfig(target_sparsity=0.3, warmup_rounds=2, ramp_rounds=5)
    values = [sparsity_at(r, config) for r in range(12)]
    assert values[:2] == [0.0, 0.0]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[6] == pytest.approx(0.3) and values[-1] == pytest.approx(0.3)
    assert 0 < values[2] < 0.3


def test_round_plan_truncates_the_global_state_and_prunes_at_least_the_schedule():
    server = _server()
    server.round = 5   # past the ramp: every device prunes at least half
    plans = server.plan_round(["tx2", "agx"])
    for plan in plans:
        assert plan.ratio >= 0.5
        assert all(f.rank == plan.rank for f in plan.lora.values())
        kept = plan.keep.heads.sum(dim=1)
        assert (kept == kept[0]).all()          # the same number per layer
        assert int(kept[0]) == max(1, round(HEADS * (1 - plan.ratio)))


def test_only_devices_not_faster_than_their_round_may_prune_beyond_the_schedule():
    from training.bandit import BanditConfig

    # Every arm of this bandit asks for 0.75, above the schedule.
    server = _server(bandit=BanditConfig(ratio_min=0.7, ratio_max=0.8, grid_ratios=1, grid_ranks=1))
    plans = server.plan_round(["fast", "slow"])          # warmup: nobody prunes
    assert [p.ratio for p in plans] == [0.0, 0.0]
    server.aggregate_round([_report(plans[0], 1.0), _report(plans[1], 9.0)], opened_at_s=0.0)
    assert server.last_relative_time == {"fast": pytest.approx(0.2), "slow": pytest.approx(1.8)}
    floor = sparsity_at(1, server.config)
    plans = {p.device: p for p in server.plan_round(["fast", "slow", "new"])}
    # In a synchronous round the fast device's extra pruning would shorten nothing: the schedule only.
    assert plans["fast"].ratio == pytest.approx(floor) and 0 < floor < 0.75
    assert plans["slow"].ratio == pytest.approx(0.75) and plans["new"].ratio == pytest.approx(0.75)
    assert plans["fast"].rank == plans["slow"].rank      # the rank stays the bandit's choice
    # A device that misses a round counts as slow from then on.
    server.aggregate_round([_report(plans["fast"], 2.0), _report(plans["slow"], 2.0)], opened_at_s=0.0)
    assert server.last_relative_time["new"] == pytest.approx(2.0)


def test_quorum_closes_the_round_and_late_reports_change_nothing():
    server = _server(quorum=2 / 3)
    plans = server.plan_round(["a", "b", "c"])
    reports = [_report(plans[0], 5.0, 1.0), _report(plans[1], 3.0, 2.0), _report(plans[2], 50.0, 100.0)]
    result = server.aggregate_round(reports, opened_at_s=0.0)
    assert sorted(result.accepted) == ["a", "b"] and result.late == ["c"]
    assert result.closed_at_s == 5.0
    rows, cols = module_masks(_layout(), plans[0].keep)
    expected = aggregate_lora(
        [LoraUpdate(_report(p, 0, v).lora, *module_masks(_layout(), p.keep)) for p, v in ((plans[0], 1.0), (plans[1], 2.0))],
        previous=_lora(16),
    )
    for name, f in expected.items():
        assert torch.allclose(server.lora[name].a, f.a) and torch.allclose(server.lora[name].b, f.b)
    assert torch.allclose(server.dense["head"], torch.full((3,), 1.5))
    assert server.round == 1


def test_deadline_drops_reports_after_it_and_missing_devices_are_fine():
    server = _server(deadline_s=10.0)
    plans = server.plan_round(["a", "b", "c"])
    result = server.aggregate_round([_report(plans[0], 4.0, 3.0), _report(plans[1], 12.0, 100.0)], opened_at_s=0.0)
    assert result.accepted == ["a"] and result.late == ["b"] and result.missing == ["c"]
    assert result.closed_at_s == 10.0
    assert torch.allclose(server.dense["head"], torch.full((3,), 3.0))
    assert all(torch.isfinite(f.a).all() and torch.isfinite(f.b).all() for f in server.lora.values())


def test_wrong_round_duplicates_strangers_and_nan_losses_are_ignored():
    server = _server()
    plans = server.plan_round(["a", "b"])
    stale = _report(plans[0], 1.0, 100.0, round_=7)
    nan = _report(plans[1], 1.0, 100.0, loss_after=math.nan)
    good = _report(plans[0], 2.0, 1.0)
    duplicate = _report(plans[0], 3.0, 100.0)
    stranger = _report(plans[0], 1.0, 100.0)
    stranger.device = "mallory"
    result = server.aggregate_round([stale, nan, good, duplicate, stranger], opened_at_s=0.0)
    assert result.accepted == ["a"]
    assert sorted(result.ignored) == ["a", "a", "b", "mallory"]
    assert torch.allclose(server.dense["head"], torch.ones(3))


def test_a_round_without_reports_leaves_the_model_as_it_was():
    server = _server(deadline_s=5.0)
    before = {n: (f.a.clone(), f.b.clone()) for n, f in server.lora.items()}
    server.plan_round(["a"])
    result = server.aggregate_round([], opened_at_s=100.0)
    assert result.missing == ["a"] and result.closed_at_s == 105.0 and math.isnan(result.mean_loss_after)
    assert all(torch.equal(server.lora[n].a, a) and torch.equal(server.lora[n].b, b) for n, (a, b) in before.items())
    with pytest.raises(HearthError, match="no round is open"):
        server.aggregate_round([])


def test_consensus_mask_keeps_the_units_devices_found_important():
    server = _server()
    plans = server.plan_round(["a"])
    heads = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.7, 0.1, 0.6, 0.2]])
    channels = torch.arange(LAYERS * CHANNELS, dtype=torch.float32).view(LAYERS, CHANNELS)
    server.aggregate_round([_report(plans[0], 1.0, imp=(heads, channels))])
    mask = server.consensus_mask(0.5)
    assert mask.heads.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert mask.channels[:, 3:].all() and not mask.channels[:, :3].any()
    assert mask.sparsity() == pytest.approx(0.5)


def test_importance_is_smoothed_only_where_observed():
    server = _server()
    plans = server.plan_round(["a"])
    server.aggregate_round([_report(plans[0], 1.0, 1.0)])
    plans = server.plan_round(["a"])
    plans[0].keep.heads[:, 0] = False        # the device pruned head 0: its score must not move
    report = _report(plans[0], 1.0, 3.0)
    server.aggregate_round([report])
    heads = server.importance[0]
    assert torch.allclose(heads[:, 0], torch.ones(LAYERS))
    assert torch.allclose(heads[:, 1], torch.full((LAYERS,), 0.9 * 1 + 0.1 * 3))


def test_checkpoint_round_trips(tmp_path):
    server = _server(deadline_s=30.0)
    for _ in range(3):
        plans = server.plan_round(["a", "b"])
        server.aggregate_round([_report(p, 1.0 + i, 0.5 + i) for i, p in enumerate(plans)])
    folder = tmp_path / "ckpt"
    server.save(folder)
    server.save(folder)   # replacing an existing checkpoint works too
    loaded = FedSpineServer.load(folder)
    assert loaded.round == 3 and loaded.config == server.config and loaded.layout == server.layout
    for name, f in server.lora.items():
        assert torch.equal(loaded.lora[name].a, f.a) and torch.equal(loaded.lora[name].b, f.b)
    assert torch.equal(loaded.importance[0], server.importance[0])
    assert {n: b.state for n, b in loaded.bandits.items()} == {n: b.state for n, b in server.bandits.items()}
    assert loaded.last_relative_time == server.last_relative_time and set(server.last_relative_time) == {"a", "b"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left behind


def test_broken_checkpoint_is_a_clear_error(tmp_path):
    server = _server()
    server.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state.json").write_text("{\n  broken")
    with pytest.raises(HearthError, match="state.json: line 2"):
        FedSpineServer.load(tmp_path / "ckpt")
    state = json.loads(json.dumps({"version": 99}))
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps(state))
    with pytest.raises(HearthError, match="version"):
        FedSpineServer.load(tmp_path / "ckpt")
    with pytest.raises(HearthError, match="not a FedSpine checkpoint"):
        FedSpineServer.load(tmp_path / "nothing")
