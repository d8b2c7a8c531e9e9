"""Heterogeneous-rank LoRA aggregation with pruning masks (FedSpine / HetLoRA)."""

from __future__ import annotations

import pytest
import torch

from core.errors import HearthError
from training.aggregation import (
    LoraFactors,
    LoraUpdate,
    aggregate_lora,
    norm_weights,
    pad_rank,
    truncate_rank,
    weighted_average,
)


def _factors(rank: int, in_f: int = 5, out_f: int = 4, seed: int = 0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g))


def test_equal_ranks_and_equal_weights_are_a_plain_average():
    ups = [LoraUpdate({"q": _factors(3, seed=s)}) for s in range(4)]
    out = aggregate_lora(ups, weights=[1.0] * 4)["q"]
    assert torch.allclose(out.a, torch.stack([u.factors["q"].a for u in ups]).mean(0), atol=1e-6)
    assert torch.allclose(out.b, torch.stack([u.factors["q"].b for u in ups]).mean(0), atol=1e-6)


def test_norm_weights_follow_the_frobenius_norm_of_the_delta():
    small = LoraFactors(torch.ones(1, 2), torch.ones(2, 1))          # B A = ones(2,2): norm 2
    big = LoraFactors(torch.ones(1, 2) * 3, torch.ones(2, 1))        # norm 6
    w = norm_weights([LoraUpdate({"m": small}), LoraUpdate({"m": big})], "m")
    assert w.tolist() == pytest.approx([0.25, 0.75])
    out = aggregate_lora([LoraUpdate({"m": small}), LoraUpdate({"m": big})])["m"]
    assert torch.allclose(out.a, torch.full((1, 2), 0.25 * 1 + 0.75 * 3))


def test_all_zero_deltas_fall_back_to_equal_weights():
    zero_b = [LoraUpdate({"m": LoraFactors(torch.full((2, 3), float(s)), torch.zeros(3, 2))}) for s in (1, 3)]
    assert norm_weights(zero_b, "m").tolist() == pytest.approx([0.5, 0.5])
    assert torch.allclose(aggregate_lora(zero_b)["m"].a, torch.full((2, 3), 2.0))


def test_padding_puts_zeros_in_the_missing_rank_slots():
    f = _factors(2)
    p = pad_rank(f, 4)
    assert p.a.shape == (4, 5) and p.b.shape == (4, 4)
    assert torch.equal(p.a[:2], f.a) and torch.equal(p.b[:, :2], f.b)
    assert not p.a[2:].any() and not p.b[:, 2:].any()
    assert torch.allclose(p.delta(), f.delta())   # padding does not change the update
    with pytest.raises(HearthError, match="rank 2 cannot be padded down to rank 1"):
        pad_rank(f, 1)


def test_mixed_ranks_average_slots_with_zeros_for_devices_without_them():
    low = LoraFactors(torch.ones(2, 3), torch.ones(3, 2))
    high = LoraFactors(torch.full((4, 3), 3.0), torch.full((3, 4), 3.0))
    out = aggregate_lora([LoraUpdate({"m": low}), LoraUpdate({"m": high})], weights=[1, 1])["m"]
    assert out.rank == 4
    assert torch.allclose(out.a[:2], torch.full((2, 3), 2.0))   # (1 + 3) / 2
    assert torch.allclose(out.a[2:], torch.full((2, 3), 1.5))   # (0 + 3) / 2
    assert torch.allclose(out.b[:, 2:], torch.full((3, 2), 1.5))


def test_truncation_keeps_the_first_slots():
    f = _factors(6)
    t = truncate_rank(f, 2)
    assert torch.equal(t.a, f.a[:2]) and torch.equal(t.b, f.b[:, :2])
    assert truncate_rank(f, 10).rank == 6
    with pytest.raises(HearthError):
        truncate_rank(f, 0)


def test_masked_rows_and_columns_average_only_over_devices_that_kept_them():
    # Two devices, rank 1, out=3 rows, in=2 columns. Device 1 pruned row 2 and column 1.
    d0 = LoraFactors(a=torch.tensor([[1.0, 2.0]]), b=torch.tensor([[1.0], [1.0], [1.0]]))
    d1 = LoraFactors(a=torch.tensor([[3.0, 0.0]]), b=torch.tensor([[3.0], [5.0], [0.0]]))
    u0 = LoraUpdate({"m": d0})
    u1 = LoraUpdate({"m": d1}, row_masks={"m": torch.tensor([True, True, False])},
                    col_masks={"m": torch.tensor([True, False])})
    out = aggregate_lora([u0, u1], weights=[1, 1])["m"]
    assert out.b.flatten().tolist() == pytest.approx([2.0, 3.0, 1.0])   # row 2: only device 0
    assert out.a.flatten().tolist() == pytest.approx([2.0, 2.0])        # column 1: only device 0


def test_rows_nobody_kept_keep_their_previous_value():
    prev = {"m": LoraFactors(a=torch.tensor([[7.0, 7.0]]), b=torch.tensor([[9.0], [9.0]]))}
    mask = {"m": torch.tensor([True, False])}
    ups = [LoraUpdate({"m": LoraFactors(torch.tensor([[1.0, 1.0]]), torch.tensor([[s], [0.0]]))}, row_masks=dict(mask))
           for s in (2.0, 4.0)]
    out = aggregate_lora(ups, previous=prev, weights=[1, 1])["m"]
    assert out.b.flatten().tolist() == pytest.approx([3.0, 9.0])
    # Without a previous state such a row is zero, never NaN.
    out = aggregate_lora(ups, weights=[1, 1])["m"]
    assert out.b.flatten().tolist() == pytest.approx([3.0, 0.0])


def test_rank_slots_no_device_of_the_round_had_keep_their_previous_value():
    # The global state has rank 4; this round's devices trained ranks 1 and 2. Slots 2 and 3 were
    # trained by nobody: averaging them over nobody would set A = B = 0 there, where LoRA has no
    # gradient, and no later device of rank 4 could ever train them again.
    prev = {"m": LoraFactors(torch.full((4, 3), 7.0), torch.full((2, 4), 9.0))}
    low = LoraFactors(torch.ones(1, 3), torch.ones(2, 1))
    mid = LoraFactors(torch.full((2, 3), 3.0), torch.full((2, 2), 3.0))
    out = aggregate_lora([LoraUpdate({"m": low}), LoraUpdate({"m": mid})], previous=prev, weights=[1, 1])["m"]
    assert out.rank == 4
    assert torch.allclose(out.a[0], torch.full((3,), 2.0))      # both had slot 0
    assert torch.allclose(out.a[1], torch.full((3,), 1.5))      # one had slot 1: HetLoRA's shrinking
    assert torch.equal(out.a[2:], prev["m"].a[2:]) and torch.equal(out.b[:, 2:], prev["m"].b[:, 2:])


def test_mismatched_modules_are_a_clear_error():
    with pytest.raises(HearthError, match="update 1 has modules"):
        aggregate_lora([LoraUpdate({"q": _factors(2)}), LoraUpdate({"v": _factors(2)})])
    with pytest.raises(HearthError, match="no device updates"):
        aggregate_lora([])


def test_weighted_average_of_heads():
    out = weighted_average([torch.zeros(2), torch.ones(2)], [1.0, 3.0])
    assert out.tolist() == pytest.approx([0.75, 0.75])


def test_a_slot_a_lower_rank_device_lacks_can_count_as_unchanged():
    previous = {"m": LoraFactors(torch.full((4, 3), 2.0), torch.full((5, 4), 2.0))}
    low = LoraUpdate({"m": LoraFactors(torch.zeros(2, 3), torch.zeros(5, 2))})
    high = LoraUpdate({"m": LoraFactors(torch.full((4, 3), 4.0), torch.full((5, 4), 4.0))})
    zero_padded = aggregate_lora([low, high], previous=previous, weights=[1.0, 1.0])["m"]
    unchanged = aggregate_lora([low, high], previous=previous, weights=[1.0, 1.0], lacking_keep_previous=True)["m"]
    assert torch.allclose(zero_padded.a[2:], torch.full((2, 3), 2.0))     # (0 + 4) / 2
    assert torch.allclose(unchanged.a[2:], torch.full((2, 3), 3.0))       # (2 + 4) / 2
    assert torch.allclose(unchanged.b[:, 2:], torch.full((5, 2), 3.0))
    assert torch.equal(unchanged.a[:2], zero_padded.a[:2])                # slots both had: as before


def test_a_devices_frozen_slots_count_in_its_norm_weight():
    # The low-rank device trained slots 0-1 to zero and held slots 2-3 frozen at their previous 2.0:
    # its adapter is all four slots, so its weight is not zero though its trained part is.
    previous = {"m": LoraFactors(torch.full((4, 3), 2.0), torch.full((5, 4), 2.0))}
    low = LoraUpdate({"m": LoraFactors(torch.zeros(2, 3), torch.zeros(5, 2))})
    high = LoraUpdate({"m": LoraFactors(torch.full((4, 3), 4.0), torch.full((5, 4), 4.0))})
    out = aggregate_lora([low, high], previous=previous, lacking_keep_previous=True)["m"]
    # ||B·A||: low 2 slots x 2.0 x 2.0 = 8 per entry, high 4 x 4.0 x 4.0 = 64: weights 8/72, 64/72.
    assert torch.allclose(out.a[2:], torch.full((2, 3), (8 * 2.0 + 64 * 4.0) / 72))
    assert torch.allclose(out.a[:2], torch.full((2, 3), 64 * 4.0 / 72))
