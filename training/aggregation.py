"""Aggregating LoRA adapters of different ranks from devices that pruned differently (FedSpine).

Heterogeneity-aware aggregation (ALGORITHMS.md section 7, after HetLoRA):
- every device's A [r, in] and B [out, r] are zero-padded to the largest rank R in the round;
- each device is weighted by the Frobenius norm of its B·A (per module), the weights normalised
  to sum to one (equal weights when every norm is zero, e.g. B still at its zero initialisation);
- the padded factors are averaged with those weights (a rank slot only some devices have is
  thereby shrunk towards zero, as in HetLoRA), and each device gets the result truncated back to
  its own rank (the first r slots) when the next round is sent;
- a rank slot that no device of the round had keeps its previous global value;
- or, with `lacking_keep_previous` (FedSpine's planned rounds, where a device of rank r is sent
  every slot and trains the first r with the rest frozen), a device's slots beyond r are its
  previous global values, in the average and in its weight.

LoRA tensors live in unpruned coordinates. A device that pruned rows of a module's output (B's
rows) or columns of its input (A's columns) reports masks; a row or column is averaged only over
the devices that kept it, and one that nobody kept keeps its previous global value.

Not here: which devices report (training/fedspine.py), pruning, transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import HearthError


@dataclass
class LoraFactors:
    """One module's LoRA factors in unpruned coordinates: delta W = B @ A (scale applied elsewhere)."""

    a: torch.Tensor                     # [rank, in_features]
    b: torch.Tensor                     # [out_features, rank]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        return self.b @ self.a


@dataclass
class LoraUpdate:
    """What one device sends: its factors per module, and which rows/columns it kept."""

    factors: dict[str, LoraFactors]
    row_masks: dict[str, torch.Tensor] = field(default_factory=dict)   # module -> bool [out] (B rows kept)
    col_masks: dict[str, torch.Tensor] = field(default_factory=dict)   # module -> bool [in] (A columns kept)

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)


def pad_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad A's rows and B's columns up to `rank` (a no-op at that rank already)."""
    r = factors.rank
    if r > rank:
        raise HearthError(f"LoRA factors of rank {r} cannot be padded down to rank {rank}")
    a = torch.zeros(rank, factors.a.shape[1], dtype=factors.a.dtype)
    b = torch.zeros(factors.b.shape[0], rank, dtype=factors.b.dtype)
    a[:r] = factors.a
    b[:, :r] = factors.b
    return LoraFactors(a, b)


def truncate_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first `rank` slots (what a device of that rank trains next round)."""
    if rank < 1:
        raise HearthError(f"LoRA rank must be at least 1 (got {rank})")
    rank = min(rank, factors.rank)
    return LoraFactors(factors.a[:rank].clone(), factors.b[:, :rank].clone())


def truncate_update(factors: dict[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    return {name: truncate_rank(f, rank) for name, f in factors.items()}


def norm_weights(updates: list[LoraUpdate], module: str) -> torch.Tensor:
    """Normalised Frobenius norms of each device's B·A for `module` (equal if all are zero)."""
    norms = torch.tensor([float(torch.linalg.matrix_norm(u.factors[module].delta())) for u in updates], dtype=torch.float64)
    total = float(norms.sum())
    if total <= 0:
        return torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64)
    return norms / total


def _masked_mean(stack: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, previous: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Weighted mean over devices (dim 0 of `stack`), counting along `dim` only devices that kept
    that row/column (`keep` [devices, size]); where nobody kept it: `previous` or zero."""
    shape = [len(weights)] + [1] * (stack.dim() - 1)
    w = weights.view(shape).to(stack.dtype)
    k_shape = [len(weights)] + [1] * (stack.dim() - 1)
    k_shape[dim + 1] = keep.shape[1]
    k = keep.view(k_shape).to(stack.dtype)
    num = (stack * w * k).sum(dim=0)
    den = (w * k).sum(dim=0).expand_as(num)
    out = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    if previous is not None:
        nobody = (den <= 0)
        out = torch.where(nobody, previous.to(out.dtype), out)
    return out


def aggregate_lora(
    updates: list[LoraUpdate],
    previous: dict[str, LoraFactors] | None = None,
    weights: list[float] | None = None,
    lacking_keep_previous: bool = False,
) -> dict[str, LoraFactors]:
    """The global LoRA state at the round's largest rank.

    `weights`, when given, replaces the norm weighting (e.g. equal weights for a plain average).
    `previous` supplies rows/columns that no device kept this round.
    """
    if not updates:
        raise HearthError("aggregation: no device updates to aggregate")
    modules = list(updates[0].factors)
    for i, u in enumerate(updates):
        if list(u.factors) != modules:
            raise HearthError(f"aggregation: update {i} has modules {sorted(u.factors)}, expected {sorted(modules)}")
    result: dict[str, LoraFactors] = {}
    for module in modules:
        rank = max(u.factors[module].rank for u in updates)
        if previous is not None and module in previous:
            rank = max(rank, previous[module].rank)
        padded = [pad_rank(u.factors[module], rank) for u in updates]
        if lacking_keep_previous and previous is not None and module in previous:
            # A device trained its first r slots with the rest frozen at their previous values
            # (docs/federated.md, 2026-12-05): its adapter is all of them, for the average and
            # for its weight, rather than r slots beside zeros that pull the rest towards zero.
            full = pad_rank(previous[module], rank)
            for p, u in zip(padded, updates):
                r = u.factors[module].rank
                p.a[r:] = full.a[r:].to(p.a.dtype)
                p.b[:, r:] = full.b[:, r:].to(p.b.dtype)
        shapes = {(p.a.shape[1], p.b.shape[0]) for p in padded}
        if len(shapes) != 1:
            raise HearthError(f"aggregation: module {module} has different shapes across devices {sorted(shapes)}")
        in_f, out_f = shapes.pop()
        if weights is not None:
            w = torch.tensor(weights, dtype=torch.float64)
            w = w / w.sum()
        else:
            w = norm_weights([LoraUpdate({module: p}) for p in padded], module)
        rows = torch.stack([u.row_masks.get(module, torch.ones(out_f, dtype=torch.bool)) for u in updates])
        cols = torch.stack([u.col_masks.get(module, torch.ones(in_f, dtype=torch.bool)) for u in updates])
        prev = pad_rank(previous[module], rank) if previous is not None and module in previous else None
        b = _masked_mean(torch.stack([p.b for p in padded]), w, rows, prev.b if prev else None, dim=0)
        a = _masked_mean(torch.stack([p.a for p in padded]), w, cols, prev.a if prev else None, dim=1)
        # Rank slots that no device of this round had were trained by nobody: they keep their
        # previous value. (Averaged as zeros they would become A = B = 0, where LoRA has no
        # gradient, and no device could ever train them again.)
        round_rank = max(u.factors[module].rank for u in updates)
        if prev is not None and round_rank < rank:
            a[round_rank:] = prev.a[round_rank:].to(a.dtype)
            b[:, round_rank:] = prev.b[:, round_rank:].to(b.dtype)
        result[module] = LoraFactors(a.to(padded[0].a.dtype), b.to(padded[0].b.dtype))
    return result


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Plain weighted average (FedAvg) of same-shaped tensors, e.g. a classifier head."""
    if not tensors or len(tensors) != len(weights) or sum(weights) <= 0:
        raise HearthError("aggregation: need as many positive weights as tensors")
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        out += t.to(torch.float64) * (w / total)
    return out.to(tensors[0].dtype)
