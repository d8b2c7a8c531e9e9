"""FedSpine's per-device bandit over (pruning ratio, LoRA rank): S-UCB (ALGORITHMS.md section 6).

One bandit per device learns, without knowing the device's compute or link in advance, which
pruning ratio and LoRA rank pay off on it. The arms are cells of a grid over the box
[ratio_min, ratio_max] x [rank_min, rank_max]; a pulled cell plays its centre. The choice is the
upper confidence bound: argmax mean reward + sqrt(2 ln t / n_cell), cells never pulled first.

"Smooth" UCB here ([spec]): a cell pulled `split_after` times is split into four (two along each
axis that is still wider than its minimum); the children start from the parent's mean with a
quarter of its pulls each, so knowledge carries over smoothly while the grid gets finer where the
device spends its time.

Reward (the paper's four terms; the weights are configuration):
  w1 * loss drop + w2 * sparsity gained + w3 * update norm - w4 * (round time / mean round time).
Keep the terms O(1) (loss drop in nats, sparsity as a fraction, a normalised update norm) so the
exploration bonus has the right scale.

Not here: what a round does with the arm (training/fedspine.py), or any transport.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from core.errors import HearthError


@dataclass
class RewardWeights:
    loss_drop: float = 1.0      # w1
    sparsity: float = 1.0       # w2
    update_norm: float = 0.2    # w3
    time: float = 0.5           # w4


@dataclass
class BanditConfig:
    ratio_min: float = 0.0
    ratio_max: float = 0.6
    rank_min: int = 2
    rank_max: int = 16
    grid_ratios: int = 3        # initial cells along the ratio axis
    grid_ranks: int = 3         # initial cells along the rank axis
    split_after: int = 6        # pulls before a cell is refined
    min_ratio_width: float = 0.05
    min_rank_width: float = 2.0
    weights: RewardWeights = field(default_factory=RewardWeights)

    def validate(self) -> None:
        if not 0.0 <= self.ratio_min <= self.ratio_max < 1.0:
            raise HearthError(f"bandit config: need 0 <= ratio_min <= ratio_max < 1 (got {self.ratio_min}, {self.ratio_max})")
        if not 1 <= self.rank_min <= self.rank_max:
            raise HearthError(f"bandit config: need 1 <= rank_min <= rank_max (got {self.rank_min}, {self.rank_max})")
        if self.grid_ratios < 1 or self.grid_ranks < 1 or self.split_after < 1:
            raise HearthError("bandit config: grid sizes and split_after must be at least 1")


@dataclass
class Cell:
    id: int
    ratio_lo: float
    ratio_hi: float
    rank_lo: float
    rank_hi: float
    pulls: float = 0.0          # fractional after a split (children inherit a quarter each)
    reward_sum: float = 0.0
    real_pulls: int = 0         # pulls of this very cell (for refinement)

    @property
    def mean(self) -> float:
        return self.reward_sum / self.pulls if self.pulls else 0.0

    def arm(self, config: BanditConfig) -> "Arm":
        ratio = (self.ratio_lo + self.ratio_hi) / 2
        rank = int(round((self.rank_lo + self.rank_hi) / 2))
        return Arm(self.id, ratio, max(config.rank_min, min(config.rank_max, rank)))


@dataclass
class Arm:
    cell_id: int
    ratio: float
    rank: int


@dataclass
class BanditState:
    """Everything a bandit knows, as plain values (json.dumps(asdict(state)) works)."""

    cells: list[Cell]
    t: int = 0
    next_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "bandit state") -> "BanditState":
        try:
            cells = [Cell(**c) for c in data["cells"]]
            state = cls(cells=cells, t=int(data["t"]), next_id=int(data["next_id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise HearthError(f"{where}: not a bandit state ({exc})") from None
        if not cells:
            raise HearthError(f"{where}: a bandit state needs at least one cell")
        return state


def reward(
    weights: RewardWeights,
    *,
    loss_before: float,
    loss_after: float,
    sparsity_gained: float,
    update_norm: float,
    round_time_s: float,
    mean_round_time_s: float,
) -> float:
    """The S-UCB reward of one device's round (section 6)."""
    relative_time = round_time_s / mean_round_time_s if mean_round_time_s > 0 else 1.0
    return (
        weights.loss_drop * (loss_before - loss_after)
        + weights.sparsity * sparsity_gained
        + weights.update_norm * update_norm
        - weights.time * relative_time
    )


class SmoothUCB:
    """S-UCB over a refinable (ratio, rank) grid for one device."""

    def __init__(self, config: BanditConfig | None = None, state: BanditState | None = None, seed: int = 0):
        self.config = config or BanditConfig()
        self.config.validate()
        self.rng = random.Random(seed)   # breaks ties among equal bounds
        self.state = state or self._initial_state()

    def _initial_state(self) -> BanditState:
        c = self.config
        cells = []
        ratio_step = (c.ratio_max - c.ratio_min) / c.grid_ratios
        rank_step = (c.rank_max - c.rank_min) / c.grid_ranks
        for i in range(c.grid_ratios):
            for j in range(c.grid_ranks):
                cells.append(Cell(
                    len(cells),
                    c.ratio_min + i * ratio_step, c.ratio_min + (i + 1) * ratio_step,
                    c.rank_min + j * rank_step, c.rank_min + (j + 1) * rank_step,
                ))
        return BanditState(cells=cells, t=0, next_id=len(cells))

    @property
    def cells(self) -> list[Cell]:
        return self.state.cells

    def select(self, allowed: Callable[[Cell], bool] | None = None) -> Arm:
        """The cell with the highest upper confidence bound (never-pulled cells first), among the
        cells `allowed` accepts (default all; if it accepts none, all)."""
        t = max(self.state.t, 1)

        def bound(cell: Cell) -> float:
            if cell.pulls <= 0:
                return math.inf
            return cell.mean + math.sqrt(2.0 * math.log(t) / cell.pulls)

        cells = [c for c in self.cells if allowed is None or allowed(c)] or self.cells
        bounds = [bound(c) for c in cells]
        top = max(bounds)
        candidates = [c for c, b in zip(cells, bounds) if b == top]
        return self.rng.choice(candidates).arm(self.config)

    def cell(self, cell_id: int) -> Cell | None:
        return next((c for c in self.cells if c.id == cell_id), None)

    def update(self, arm: Arm, value: float) -> None:
        """Record the reward of `arm`; refine its cell once it has been pulled often enough."""
        if not math.isfinite(value):
            raise HearthError(f"bandit: reward must be a finite number (got {value})")
        cell = next((c for c in self.cells if c.id == arm.cell_id), None)
        if cell is None:
            return   # the cell was refined away since this arm was chosen (a late report): ignore
        self.state.t += 1
        cell.pulls += 1
        cell.real_pulls += 1
        cell.reward_sum += value
        if cell.real_pulls >= self.config.split_after:
            self._split(cell)

    def _split(self, cell: Cell) -> None:
        c = self.config
        ratio_cuts = [cell.ratio_lo, cell.ratio_hi]
        rank_cuts = [cell.rank_lo, cell.rank_hi]
        if cell.ratio_hi - cell.ratio_lo >= 2 * c.min_ratio_width:
            ratio_cuts.insert(1, (cell.ratio_lo + cell.ratio_hi) / 2)
        if cell.rank_hi - cell.rank_lo >= 2 * c.min_rank_width:
            rank_cuts.insert(1, (cell.rank_lo + cell.rank_hi) / 2)
        pieces = (len(ratio_cuts) - 1) * (len(rank_cuts) - 1)
        if pieces == 1:
            return   # as fine as the grid goes: the cell keeps its statistics
        children = []
        for r0, r1 in zip(ratio_cuts, ratio_cuts[1:]):
            for k0, k1 in zip(rank_cuts, rank_cuts[1:]):
                # Smoothness: a child starts from its parent's mean, with its share of the pulls.
                pulls = cell.pulls / pieces
                children.append(Cell(self.state.next_id, r0, r1, k0, k1, pulls, cell.mean * pulls, 0))
                self.state.next_id += 1
        index = self.cells.index(cell)
        self.state.cells[index:index + 1] = children

    def best(self) -> Arm:
        """The cell with the highest mean among those pulled (what the bandit has learnt)."""
        pulled = [c for c in self.cells if c.pulls > 0] or self.cells
        return max(pulled, key=lambda c: c.mean).arm(self.config)
