"""FedSpine's S-UCB bandit over (pruning ratio, LoRA rank)."""

from __future__ import annotations

import json
import random

import pytest

from core.errors import HearthError
from training.bandit import BanditConfig, BanditState, RewardWeights, SmoothUCB, reward


def _stationary_reward(ratio: float, rank: int, rng: random.Random | None) -> float:
    # A device whose best trade-off is a ratio near 0.45 with a rank near 6.
    noise = rng.gauss(0, 0.05) if rng else 0.0
    return 1.0 - 3.0 * (ratio - 0.45) ** 2 - 0.01 * (rank - 6) ** 2 + noise


def test_bandit_learns_the_best_arm_of_a_stationary_problem():
    rng = random.Random(1)
    bandit = SmoothUCB(BanditConfig(ratio_min=0.0, ratio_max=0.6, rank_min=2, rank_max=16), seed=1)
    choices = []
    for _ in range(600):
        arm = bandit.select()
        choices.append(arm)
        bandit.update(arm, _stationary_reward(arm.ratio, arm.rank, rng))
    best = bandit.best()
    assert abs(best.ratio - 0.45) <= 0.1
    assert abs(best.rank - 6) <= 3
    # It exploits: the last 200 pulls earn well above what uniformly random arms earn (0.57 in
    # expectation here; the optimum is 1.0 and the UCB bonus keeps some exploration going).
    late = choices[-200:]
    clean = [_stationary_reward(a.ratio, a.rank, None) for a in late]
    assert sum(clean) / len(clean) > 0.7


def test_unpulled_cells_are_tried_first():
    bandit = SmoothUCB(BanditConfig(grid_ratios=2, grid_ranks=2, split_after=100))
    seen = set()
    for _ in range(4):
        arm = bandit.select()
        seen.add(arm.cell_id)
        bandit.update(arm, 0.0)
    assert seen == {0, 1, 2, 3}


def test_refinement_adds_cells_where_pulled_often():
    bandit = SmoothUCB(BanditConfig(grid_ratios=2, grid_ranks=2, split_after=3), seed=0)
    for _ in range(4):   # every initial cell once
        bandit.update(bandit.select(), 0.0)
    favourite = bandit.cells[0]
    arm = favourite.arm(bandit.config)
    bandit.update(arm, 1.0)
    bandit.update(arm, 1.0)          # third pull of the cell: it is refined
    assert len(bandit.cells) == 7   # one cell became four
    children = [c for c in bandit.cells if c.ratio_lo >= favourite.ratio_lo and c.ratio_hi <= favourite.ratio_hi
                and c.rank_lo >= favourite.rank_lo and c.rank_hi <= favourite.rank_hi]
    assert len(children) == 4
    # Smoothness: children inherit the parent's mean and share its pulls.
    assert all(c.mean == pytest.approx(2 / 3) for c in children)
    assert sum(c.pulls for c in children) == pytest.approx(3)


def test_cells_stop_splitting_at_the_minimum_width():
    config = BanditConfig(ratio_min=0.0, ratio_max=0.1, rank_min=4, rank_max=6, grid_ratios=1, grid_ranks=1,
                          split_after=1, min_ratio_width=0.05, min_rank_width=2.0)
    bandit = SmoothUCB(config)
    for _ in range(50):
        bandit.update(bandit.select(), 0.5)
    assert len(bandit.cells) == 2   # ratio split once (0.1 -> 2 x 0.05), rank never (width 2)


def test_state_round_trips_through_json():
    rng = random.Random(3)
    bandit = SmoothUCB(BanditConfig(split_after=4), seed=5)
    for _ in range(40):
        arm = bandit.select()
        bandit.update(arm, _stationary_reward(arm.ratio, arm.rank, rng))
    text = json.dumps(bandit.state.to_dict())
    restored = SmoothUCB(BanditConfig(split_after=4), BanditState.from_dict(json.loads(text)), seed=5)
    assert restored.state == bandit.state
    assert restored.best() == bandit.best()


def test_broken_state_is_a_clear_error():
    with pytest.raises(HearthError, match="checkpoint.json: not a bandit state"):
        BanditState.from_dict({"cells": [{"id": 0}], "t": 0, "next_id": 1}, where="checkpoint.json")


def test_late_update_for_a_refined_cell_is_ignored():
    bandit = SmoothUCB(BanditConfig(grid_ratios=1, grid_ranks=1, split_after=1))
    arm = bandit.select()
    bandit.update(arm, 1.0)          # splits cell 0
    before = BanditState.from_dict(json.loads(json.dumps(bandit.state.to_dict())))
    bandit.update(arm, 5.0)          # cell 0 no longer exists
    assert bandit.state == before


def test_reward_combines_the_four_terms():
    w = RewardWeights(loss_drop=1.0, sparsity=2.0, update_norm=0.5, time=0.25)
    value = reward(w, loss_before=2.0, loss_after=1.5, sparsity_gained=0.1, update_norm=0.4,
                   round_time_s=30.0, mean_round_time_s=20.0)
    assert value == pytest.approx(0.5 + 0.2 + 0.2 - 0.375)


def test_slow_device_learns_to_prune_more():
    # A device whose round time shrinks with pruning and grows with rank: the time term dominates,
    # so the bandit should settle on a high ratio and a small rank.
    weights = RewardWeights(loss_drop=0.0, sparsity=0.0, update_norm=0.0, time=1.0)
    bandit = SmoothUCB(BanditConfig(weights=weights), seed=2)
    rng = random.Random(2)
    for _ in range(300):
        arm = bandit.select()
        seconds = 100 * (1 - arm.ratio) * (1 + arm.rank / 16) + rng.gauss(0, 1)
        bandit.update(arm, reward(weights, loss_before=0, loss_after=0, sparsity_gained=0, update_norm=0,
                                  round_time_s=seconds, mean_round_time_s=100))
    best = bandit.best()
    assert best.ratio >= 0.45 and best.rank <= 6


def test_select_only_among_allowed_cells():
    bandit = SmoothUCB(BanditConfig(grid_ratios=2, grid_ranks=2, split_after=100), seed=0)
    for _ in range(8):
        arm = bandit.select(lambda cell: cell.rank_hi <= 9)
        assert arm.rank <= 9
        bandit.update(arm, 1.0)
    assert bandit.select(lambda cell: False).cell_id in {c.id for c in bandit.cells}   # none allowed: all
