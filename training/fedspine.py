"""FedSpine's round logic, independent of transport (ALGORITHMS.md sections 5-7).

A round: the coordinator picks, per device, a pruning ratio and a LoRA rank with that device's
S-UCB bandit (training/bandit.py), sends a `RoundPlan` (ratio, rank, which heads/channels to keep,
the global LoRA state); each device trains its pruned model with LoRA and
sends a `DeviceReport` (its LoRA factors in unpruned coordinates with masks, loss before/after,
LoRA-gradient importance of the units it kept, timings). `FedSpineServer.aggregate_round` closes
the round at its deadline or as soon as a quorum has reported, whichever is first; reports that
arrive later, for another round, twice, or from devices not in the round change nothing in the
model (a late report still teaches that device's bandit how slow the arm was).

- Planned rounds (when the server is given a `RoundCost`, as the mesh coordinator's and the
  simulator's FedSpine are): each
  report gives the device's compute and link rates, so the time of every (ratio, rank) it has not
  played is predicted; the round length T is the slowest device's fastest option at the schedule;
  one S-UCB bandit shared by all devices (over pruning beyond the schedule x rank) picks each
  device's cell among those it finishes within T, and is rewarded by the global model's progress
  (the drop in the devices' loss before training from one round to the next), not by a device's
  own loss or time. A device of rank r is sent every slot of the global state and trains the
  first r with the rest frozen (sent in int8: the device never changes them); its r trained
  slots come back and its frozen ones count as unchanged in the aggregate. A device given only
  r slots would train a different model (the global one cut to r slots), and its update, averaged
  beside the slots it never saw, counted twice what they do: at paper scale (seed 0) FedSpine
  ended 3.6 points below uniform pruning with truncation and 3.3 above it with frozen slots
  (docs/federated.md, 2026-12-05).
  Without a `RoundCost` (the simulator's baselines, mesh jobs checkpointed before 2026-12-05)
  each device's own bandit chooses, as below, and is sent the state truncated to its rank
  (HetLoRA).
- Sparsity schedule: the target is reached over `ramp_rounds` rounds after `warmup_rounds`
  (cubic, as in gradual magnitude pruning: fast early, gentle near the target). A device prunes at
  least the scheduled sparsity; its bandit may choose more to finish faster, but only a device
  that was not faster than its round's mean the last time it reported: in a synchronous round
  the fast devices' extra pruning shortens nothing and costs accuracy ([spec], docs/federated.md).
- Consensus mask: importance accumulated (EMA, 0.9 old, only where observed) from the devices'
  reports; every layer keeps the same number of its most important heads and channels, so the
  pruned model is an ordinary Llama config (training/pruning.py removes them physically).
- Aggregation: heterogeneous-rank, norm-weighted and masked (training/aggregation.py).
- Checkpoint: tensors in safetensors + everything else in JSON, written as one directory
  atomically.

Not here: training a device's model (the caller, e.g. training/fedsim.py), transport, physical
pruning.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_dir
from core.errors import HearthError
from training.aggregation import LoraFactors, LoraUpdate, aggregate_lora, truncate_update, weighted_average
from training.bandit import Arm, BanditConfig, BanditState, Cell, RewardWeights, SmoothUCB, reward

CHECKPOINT_VERSION = 1
# A device whose last round took less than this fraction of its round's mean time prunes only to
# the schedule: 20 devices x 3 seeds, this took FedSpine's final accuracy from 25.5% to 27.9% at
# the same round length (docs/federated.md).
FAST_RELATIVE_TIME = 1.0
# With a time model (`RoundCost`) and the shared quality bandit (docs/federated.md, 2026-12-05):
# a device not yet measured plays only cells whose lowest rank is at most this, at that lowest
# rank: its time is unknown until it reports, and rank 16 over a 5 Mbit/s link doubles a round.
UNMEASURED_RANK = 8
# The lowest rank the planner gives a slow device: ranks 2 / 4 / 8 cost 2.3 / 0.6 / 0.2 points
# against uniform pruning for rounds of 34 / 38 / 45 s (3 seeds), so 4.
MIN_PLANNED_RANK = 4
# How far beyond the schedule the quality bandit may prune; a cell plays its least pruning (0 or
# 0.05): pruning 0.05-0.15 beyond it cost about 2 points (3 seeds).
MAX_EXTRA_RATIO = 0.1
# The quality signal's mean and spread are EMAs with this weight on the old value: the global
# loss falls fast in the first rounds and slowly later, so a drop is judged against recent ones.
GAIN_EMA = 0.8
# A planned round's frozen slots travel as int8 with one float32 scale per slot (A's row, B's
# column): a quarter of float32's bytes. On the simulated fleet's slowest link (5 Mbit/s) the
# transfer is still over a third of a slow device's round (rank 4 of 16: 18 s of 50).
# The device only reads them; the slots it trains travel in float32 both ways. (A float16 scale
# would underflow for B's small early slots.)
FROZEN_VALUE_BYTES = 1
FROZEN_SCALE_BYTES = 4


@dataclass
class RoundCost:
    """What one round asks of a device, linear in its kept fractions and its rank ([spec]).

    The coordinator knows the model's shapes and the bytes of every rank it sends and receives, so
    one report (compute and transfer seconds) gives a device's compute and link rates, and from
    them the time of every (ratio, rank) it has not played. Units are the caller's (FLOPs, bytes).
    """

    fixed_work: float = 0.0            # compute that pruning does not remove (k, v, embeddings)
    head_work: float = 0.0             # compute proportional to the kept fraction of heads
    channel_work: float = 0.0          # ... of MLP channels
    fixed_bytes: float = 0.0           # transferred whatever the rank (a classifier head, frozen slots)
    rank_bytes: float = 0.0            # per trained slot, not shrunk by pruning (both ways)
    rank_head_bytes: float = 0.0       # per unit of rank, proportional to the kept heads (the upload)
    rank_channel_bytes: float = 0.0    # ... to the kept channels

    def work(self, head_keep: float, channel_keep: float) -> float:
        return self.fixed_work + self.head_work * head_keep + self.channel_work * channel_keep

    def bytes(self, rank: int, head_keep: float, channel_keep: float) -> float:
        per_rank = self.rank_bytes + self.rank_head_bytes * head_keep + self.rank_channel_bytes * channel_keep
        return self.fixed_bytes + rank * per_rank


@dataclass
class DeviceRates:
    compute: float                     # RoundCost work per second
    link: float                        # bytes per second (latency folded in)


@dataclass
class FedSpineConfig:
    target_sparsity: float = 0.3       # fraction of heads and of MLP channels removed at the end
    warmup_rounds: int = 2             # rounds of LoRA only before pruning starts
    ramp_rounds: int = 10              # rounds over which sparsity rises to the target
    quorum: float = 1.0                # fraction of the round's devices whose reports close it early
    deadline_s: float = math.inf       # a round closes this long after it opens at the latest
    importance_beta: float = 0.9       # EMA: weight of the old importance
    min_heads: int = 1                 # every layer keeps at least this many heads
    bandit: BanditConfig = field(default_factory=BanditConfig)

    def validate(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise HearthError(f"fedspine config: target_sparsity must be in [0, 1) (got {self.target_sparsity})")
        if not 0.0 < self.quorum <= 1.0:
            raise HearthError(f"fedspine config: quorum must be in (0, 1] (got {self.quorum})")
        if self.deadline_s <= 0:
            raise HearthError(f"fedspine config: deadline_s must be positive (got {self.deadline_s})")
        self.bandit.validate()


@dataclass
class ModuleUnits:
    """How one LoRA module's rows or columns belong to a layer's prunable units."""

    layer: int
    unit: str                          # "heads" or "channels"
    axis: str                          # "rows" (B's rows: output features) or "cols" (A's columns)
    unit_size: int = 1                 # features per unit (head_dim for heads)


@dataclass
class UnitLayout:
    layers: int
    heads: int
    channels: int
    modules: dict[str, ModuleUnits]    # LoRA module name -> its units


@dataclass
class Importance:
    """Per-unit importance in unpruned coordinates; `seen_*` marks what a device observed."""

    heads: torch.Tensor                # [layers, heads]
    channels: torch.Tensor             # [layers, channels]
    seen_heads: torch.Tensor | None = None     # bool, same shape (None: all)
    seen_channels: torch.Tensor | None = None


@dataclass
class KeepMask:
    heads: torch.Tensor                # bool [layers, heads]
    channels: torch.Tensor             # bool [layers, channels]

    def sparsity(self) -> float:
        h = 1.0 - float(self.heads.float().mean())
        c = 1.0 - float(self.channels.float().mean())
        return (h + c) / 2


@dataclass
class RoundPlan:
    round: int
    device: str
    arm: Arm
    ratio: float                       # fraction of heads and channels this device removes
    rank: int                          # the device trains the first `rank` slots of `lora`
    keep: KeepMask
    lora: dict[str, LoraFactors]       # the global state as sent, unpruned coordinates: every slot
                                       # (those beyond `rank` frozen) in planned rounds, else `rank`
    dense: dict[str, torch.Tensor]     # other trainables (e.g. a classifier head), shared by all

    @property
    def sent_rank(self) -> int:
        """How many slots were sent (`rank` of them to train, the rest frozen)."""
        return max((f.rank for f in self.lora.values()), default=self.rank)


@dataclass
class DeviceReport:
    round: int
    device: str
    lora: dict[str, LoraFactors]       # trained slots, unpruned coordinates (pruned rows are ignored)
    keep: KeepMask
    dense: dict[str, torch.Tensor]
    samples: int
    loss_before: float
    loss_after: float
    importance: Importance
    compute_s: float
    transfer_s: float
    finished_at_s: float               # clock time the report reached the coordinator


@dataclass
class RoundResult:
    round: int
    accepted: list[str]
    late: list[str]
    missing: list[str]
    ignored: list[str]                 # wrong round, duplicate, or not in the round
    closed_at_s: float
    round_time_s: float
    mean_loss_after: float


def quantise_slots(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one float32 scale per slot of LoRA factors: `dim` is the axis a slot spans
    (1 for A's rows, 0 for B's columns). A slot's largest value maps to +-127."""
    scale = x.float().abs().amax(dim=dim, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))     # an all-zero slot (B at start)
    values = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return values, scale


def dequantise_slots(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale


def frozen_beyond(lora: dict[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """The global state as a planned round sends it to a device of `rank`: every slot, those
    beyond `rank` quantised as they travel (values in float32 here)."""
    out = {}
    for name, f in lora.items():
        a, b = f.a.clone(), f.b.clone()
        if a.shape[0] > rank:
            a[rank:] = dequantise_slots(*quantise_slots(a[rank:], 1))
            b[:, rank:] = dequantise_slots(*quantise_slots(b[:, rank:], 0))
        out[name] = LoraFactors(a, b)
    return out


def sparsity_at(round_index: int, config: FedSpineConfig) -> float:
    """Cubic ramp from 0 (through warmup) to the target (after warmup + ramp rounds)."""
    if round_index < config.warmup_rounds or config.target_sparsity == 0:
        return 0.0
    if config.ramp_rounds <= 0:
        return config.target_sparsity
    progress = min(1.0, (round_index - config.warmup_rounds + 1) / config.ramp_rounds)
    return config.target_sparsity * (1.0 - (1.0 - progress) ** 3)


def keep_count(total: int, ratio: float, at_least: int = 1) -> int:
    return max(at_least, min(total, int(round(total * (1.0 - ratio)))))


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row (layer), True for the `keep` highest scores (ties: lower index first)."""
    order = torch.argsort(-scores, dim=1, stable=True)[:, :keep]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask


def module_masks(layout: UnitLayout, keep: KeepMask) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Row masks (B) and column masks (A) of every LoRA module from a unit keep-mask."""
    rows, cols = {}, {}
    for name, m in layout.modules.items():
        units = keep.heads[m.layer] if m.unit == "heads" else keep.channels[m.layer]
        features = units.repeat_interleave(m.unit_size)
        (rows if m.axis == "rows" else cols)[name] = features
    return rows, cols


class FedSpineServer:
    """The coordinator's state across rounds: global LoRA, importance, one bandit per device (or,
    with a `RoundCost`, the devices' rates and one quality bandit shared by all)."""

    def __init__(self, config: FedSpineConfig, layout: UnitLayout, lora: dict[str, LoraFactors],
                 dense: dict[str, torch.Tensor] | None = None, seed: int = 0, cost: RoundCost | None = None):
        config.validate()
        self.config = config
        self.layout = layout
        self.lora = lora
        self.dense = dict(dense or {})
        self.importance = torch.zeros(layout.layers, layout.heads), torch.zeros(layout.layers, layout.channels)
        self.importance_seen = False
        self.round = 0
        self.mean_round_time_s = 0.0
        # device -> its round time / its round's mean, the last time it reported (late included).
        self.last_relative_time: dict[str, float] = {}
        self.bandits: dict[str, SmoothUCB] = {}
        self.seed = seed
        self._open: dict[str, RoundPlan] = {}
        # With a time model the round is planned (`_plan_timed`): each device's rates from its last
        # report, and one quality bandit shared by all devices, rewarded by the global model's
        # progress. Without one (None), each device's own bandit chooses (`plan_round`).
        self.cost = cost
        self.rates: dict[str, DeviceRates] = {}
        self.quality = SmoothUCB(self._quality_config(), seed=seed + 7919)
        # The arms the last round's accepted devices played and the global model's loss they
        # measured on receiving it: the next round's loss before training tells what they did.
        self.credit: dict[str, Any] = {"cells": [], "loss": None}
        self.gain_mean: float | None = None   # EMA of the round-to-round gain of that loss
        self.gain_var = 0.0

    # --- planning ---

    def bandit(self, device: str) -> SmoothUCB:
        if device not in self.bandits:
            self.bandits[device] = SmoothUCB(self.config.bandit, seed=self.seed + len(self.bandits))
        return self.bandits[device]

    def consensus_mask(self, ratio: float) -> KeepMask:
        """Each layer keeps its most important heads and channels (the same count in every layer)."""
        heads, channels = self.importance
        return KeepMask(
            _top_mask(heads, keep_count(self.layout.heads, ratio, self.config.min_heads)),
            _top_mask(channels, keep_count(self.layout.channels, ratio, 1)),
        )

    def plan_round(self, devices: list[str], fixed: dict[str, Arm] | None = None) -> list[RoundPlan]:
        """Open the next round for `devices`; `fixed` overrides a device's arm (baselines)."""
        if not devices:
            raise HearthError("fedspine: a round needs at least one device")
        if self.cost is not None and not fixed:
            return self._plan_timed(devices)
        floor = sparsity_at(self.round, self.config)
        plans = []
        for device in devices:
            arm = (fixed or {}).get(device) or self.bandit(device).select()
            # Warmup rounds train every unit, so importance is first gathered over all of them.
            ratio = 0.0 if self.round < self.config.warmup_rounds else max(floor, arm.ratio)
            if device not in (fixed or {}) and self.last_relative_time.get(device, math.inf) < FAST_RELATIVE_TIME:
                ratio = min(ratio, floor)   # a fast device: the schedule only (the bandit still picks its rank)
            plans.append(RoundPlan(
                round=self.round, device=device, arm=arm, ratio=ratio, rank=arm.rank,
                keep=self.consensus_mask(ratio),
                lora=truncate_update(self.lora, arm.rank),
                dense={k: v.clone() for k, v in self.dense.items()},
            ))
        self._open = {p.device: p for p in plans}
        return plans

    def _quality_config(self) -> BanditConfig:
        """The shared bandit's box: pruning beyond the schedule (0 to MAX_EXTRA_RATIO) x rank."""
        b = self.config.bandit
        extra = max(0.0, min(MAX_EXTRA_RATIO, b.ratio_max))
        rank_min = min(b.rank_max, max(b.rank_min, MIN_PLANNED_RANK))
        return BanditConfig(ratio_min=0.0, ratio_max=extra, rank_min=rank_min, rank_max=b.rank_max,
                            grid_ratios=b.grid_ratios, grid_ranks=b.grid_ranks, split_after=b.split_after,
                            min_ratio_width=b.min_ratio_width, min_rank_width=b.min_rank_width, weights=b.weights)

    def keep_fractions(self, ratio: float) -> tuple[float, float]:
        """The kept fractions of heads and of channels at `ratio` (counts are whole units)."""
        heads = keep_count(self.layout.heads, ratio, self.config.min_heads) / self.layout.heads
        return heads, keep_count(self.layout.channels, ratio, 1) / self.layout.channels

    def predicted_seconds(self, device: str, ratio: float, rank: int) -> float:
        """The device's round time at (ratio, rank) from its measured rates (inf if unmeasured)."""
        rates = self.rates.get(device)
        return math.inf if rates is None or self.cost is None else self._seconds(rates, ratio, rank)

    def round_length(self, devices: list[str]) -> float:
        """The planned round length T: the slowest device's fastest option at the schedule (the
        quality bandit's lowest rank, no pruning beyond the schedule). A synchronous round cannot
        be shorter, and a device finishing before it gains nothing by finishing sooner. A device
        not yet measured counts at the median measured rates (a guess; inf before any report)."""
        floor, rank_min = self._floor(), self.quality.config.rank_min
        times = [self.predicted_seconds(d, floor, rank_min) for d in devices if d in self.rates]
        if len(times) < len(devices):
            if not self.rates:
                return math.inf
            median = DeviceRates(statistics.median(r.compute for r in self.rates.values()),
                                 statistics.median(r.link for r in self.rates.values()))
            times.append(self._seconds(median, floor, rank_min))
        return max(times)

    def _seconds(self, rates: DeviceRates, ratio: float, rank: int) -> float:
        heads, channels = self.keep_fractions(ratio)
        return self.cost.work(heads, channels) / rates.compute + self.cost.bytes(rank, heads, channels) / rates.link

    def _floor(self) -> float:
        # Warmup rounds train every unit, so importance is first gathered over all of them.
        return 0.0 if self.round < self.config.warmup_rounds else sparsity_at(self.round, self.config)

    def _plan_timed(self, devices: list[str]) -> list[RoundPlan]:
        """Each device plays the quality bandit's best-bound cell among those it can play within T:
        the cell's least pruning beyond the schedule, at the highest of its ranks that the device
        finishes within T (a device not yet measured: the cell's lowest rank, at most UNMEASURED_RANK)."""
        floor, pruning = self._floor(), self.round >= self.config.warmup_rounds
        limit = self.round_length(devices) * (1 + 1e-9)
        plans = []
        for device in devices:
            def ranks(cell: Cell) -> list[int]:
                """The ranks of `cell` this device may play, highest first (none: not playable)."""
                lo, hi = _cell_ranks(cell, self.quality.config)
                if device not in self.rates:
                    return [lo] if lo <= UNMEASURED_RANK else []
                ratio = self._cell_ratio(cell, floor, pruning)
                return [k for k in range(hi, lo - 1, -1) if self.predicted_seconds(device, ratio, k) <= limit]

            arm = self.quality.select(lambda cell: bool(ranks(cell)))
            cell = self.quality.cell(arm.cell_id)
            # No playable cell (T is the slowest device's lowest rank, so only by rounding): its lowest.
            rank = (ranks(cell) or [_cell_ranks(cell, self.quality.config)[0]])[0]
            ratio = self._cell_ratio(cell, floor, pruning)
            plans.append(RoundPlan(
                round=self.round, device=device, arm=Arm(arm.cell_id, arm.ratio, rank), ratio=ratio, rank=rank,
                keep=self.consensus_mask(ratio), lora=frozen_beyond(self.lora, rank),
                dense={k: v.clone() for k, v in self.dense.items()},
            ))
        self._open = {p.device: p for p in plans}
        return plans

    def _cell_ratio(self, cell: Cell, floor: float, pruning: bool) -> float:
        """A cell prunes its least beyond the schedule (none during warmup)."""
        return min(self.config.bandit.ratio_max, floor + cell.ratio_lo) if pruning else 0.0

    def _learn_rates(self, report: DeviceReport, plan: RoundPlan) -> None:
        heads = float(report.keep.heads.float().mean())
        channels = float(report.keep.channels.float().mean())
        self.rates[report.device] = DeviceRates(
            compute=self.cost.work(heads, channels) / max(report.compute_s, 1e-6),
            link=self.cost.bytes(plan.rank, heads, channels) / max(report.transfer_s, 1e-6),
        )

    def _credit_quality(self, accepted: list[DeviceReport], plans: dict[str, RoundPlan]) -> None:
        """Reward the cells the previous round played with the global model's progress.

        The loss before training of this round's devices is the global model's loss on fresh
        batches of their own data: its drop from the previous round's is what that round's
        aggregate did for everyone (a shared, global signal, unlike a device's loss on the batch
        it just trained on). The drop is centred and scaled by EMAs of recent drops, so that the
        early rounds' large ones do not make every early cell look good.
        """
        if not accepted:
            return
        weight = sum(r.samples for r in accepted) or len(accepted)
        loss = sum(r.loss_before * (r.samples or 1) for r in accepted) / weight
        previous = self.credit.get("loss")
        if previous is not None:
            gain = previous - loss
            if self.gain_mean is not None and self.gain_var > 0:
                value = (gain - self.gain_mean) / math.sqrt(self.gain_var)
                for cell_id, ratio, rank in self.credit["cells"]:
                    self.quality.update(Arm(int(cell_id), float(ratio), int(rank)), value)
            if self.gain_mean is None:
                self.gain_mean = gain
            else:
                deviation = gain - self.gain_mean
                self.gain_mean += (1 - GAIN_EMA) * deviation
                self.gain_var = GAIN_EMA * (self.gain_var + (1 - GAIN_EMA) * deviation * deviation)
        # Warmup rounds prune nothing, so their cells' ratios were not played: not credited.
        played = self.round >= self.config.warmup_rounds
        self.credit = {"cells": [[plans[r.device].arm.cell_id, plans[r.device].arm.ratio, plans[r.device].rank]
                                 for r in accepted if played and plans[r.device].arm.cell_id >= 0],
                       "loss": loss}

    # --- closing a round ---

    def aggregate_round(self, reports: list[DeviceReport], opened_at_s: float = 0.0) -> RoundResult:
        """Close the open round: accept reports in time (deadline or quorum), aggregate, learn."""
        if not self._open:
            raise HearthError("fedspine: no round is open")
        plans, config = self._open, self.config
        ignored, candidates, seen = [], [], set()
        for r in sorted(reports, key=lambda r: r.finished_at_s):
            if r.round != self.round or r.device not in plans or r.device in seen:
                ignored.append(r.device)
                continue
            if not all(math.isfinite(x) for x in (r.loss_before, r.loss_after, r.finished_at_s)):
                ignored.append(r.device)
                continue
            seen.add(r.device)
            candidates.append(r)
        deadline = opened_at_s + config.deadline_s
        quorum = max(1, math.ceil(config.quorum * len(plans)))
        in_time = [r for r in candidates if r.finished_at_s <= deadline]
        if len(in_time) >= quorum:
            accepted = in_time[:quorum]
            closed_at = accepted[-1].finished_at_s
        else:
            accepted = in_time
            last = max((r.finished_at_s for r in accepted), default=opened_at_s)
            closed_at = deadline if math.isfinite(deadline) else last
        late = [r for r in candidates if r not in accepted]
        missing = [d for d in plans if d not in seen]

        if accepted:
            self._merge(accepted)
        round_times = [r.finished_at_s - opened_at_s for r in accepted]
        mean_time = sum(round_times) / len(round_times) if round_times else max(closed_at - opened_at_s, 1e-9)
        norms = [_update_norm(r, plans[r.device]) for r in accepted]
        mean_norm = sum(norms) / len(norms) if norms and sum(norms) > 0 else 1.0
        weights = config.bandit.weights
        if self.cost is not None:
            # Planned rounds: the time model learns each reporting device's rates, and the shared
            # quality bandit is credited; the per-device bandits are not used.
            for r in accepted + late:
                self._learn_rates(r, plans[r.device])
            self._credit_quality(accepted, plans)
        for r, norm in zip(accepted, norms):
            plan = plans[r.device]
            self.last_relative_time[r.device] = (r.finished_at_s - opened_at_s) / mean_time
            if self.cost is not None:
                continue
            self.bandit(r.device).update(plan.arm, reward(
                weights, loss_before=r.loss_before, loss_after=r.loss_after,
                sparsity_gained=plan.ratio, update_norm=norm / mean_norm,
                round_time_s=r.finished_at_s - opened_at_s, mean_round_time_s=mean_time,
            ))
        # Late or missing: the model is untouched, but the device's bandit learns that the arm
        # took too long (a missing device is charged twice the round's length).
        for r in late:
            relative = self.last_relative_time[r.device] = (r.finished_at_s - opened_at_s) / mean_time
            if self.cost is None:
                self.bandit(r.device).update(plans[r.device].arm, -weights.time * relative)
        for d in missing:
            relative = self.last_relative_time[d] = 2 * (closed_at - opened_at_s) / mean_time
            if self.cost is None:
                self.bandit(d).update(plans[d].arm, -weights.time * relative)

        self.mean_round_time_s = mean_time
        result = RoundResult(
            round=self.round,
            accepted=[r.device for r in accepted], late=[r.device for r in late], missing=missing, ignored=ignored,
            closed_at_s=closed_at, round_time_s=closed_at - opened_at_s,
            mean_loss_after=sum(r.loss_after for r in accepted) / len(accepted) if accepted else math.nan,
        )
        self.round += 1
        self._open = {}
        return result

    def _merge(self, accepted: list[DeviceReport]) -> None:
        updates = []
        for r in accepted:
            rows, cols = module_masks(self.layout, r.keep)
            updates.append(LoraUpdate(r.lora, rows, cols))
        # With the planner, a device trains its first r slots of the state it was sent, the rest
        # frozen: those count as unchanged, not as zero (docs/federated.md, 2026-12-05).
        self.lora = aggregate_lora(updates, previous=self.lora, lacking_keep_previous=self.cost is not None)
        if self.dense:
            samples = [float(r.samples) for r in accepted]
            self.dense = {k: weighted_average([r.dense[k] for r in accepted], samples) for k in self.dense}
        beta = self.config.importance_beta
        old_h, old_c = self.importance
        new_h, new_c = _masked_importance_mean(accepted)
        if not self.importance_seen:
            self.importance = (torch.where(new_h[1], new_h[0], old_h), torch.where(new_c[1], new_c[0], old_c))
            self.importance_seen = True
        else:
            self.importance = (
                torch.where(new_h[1], beta * old_h + (1 - beta) * new_h[0], old_h),
                torch.where(new_c[1], beta * old_c + (1 - beta) * new_c[0], old_c),
            )

    # --- checkpoints ---

    def save(self, folder: Path) -> None:
        """Write the server state as one directory (atomically): tensors.safetensors + state.json."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {"importance.heads": self.importance[0], "importance.channels": self.importance[1]}
        for name, f in self.lora.items():
            tensors[f"lora.{name}.a"] = f.a.contiguous()
            tensors[f"lora.{name}.b"] = f.b.contiguous()
        for name, t in self.dense.items():
            tensors[f"dense.{name}"] = t.contiguous()
        state = {
            "version": CHECKPOINT_VERSION,
            "round": self.round,
            "mean_round_time_s": self.mean_round_time_s,
            "last_relative_time": self.last_relative_time,
            "importance_seen": self.importance_seen,
            "seed": self.seed,
            "lora_modules": list(self.lora),
            "dense": list(self.dense),
            "config": _config_to_dict(self.config),
            "layout": {"layers": self.layout.layers, "heads": self.layout.heads, "channels": self.layout.channels,
                       "modules": {k: asdict(v) for k, v in self.layout.modules.items()}},
            "bandits": {name: b.state.to_dict() for name, b in self.bandits.items()},
            "cost": None if self.cost is None else asdict(self.cost),
            "rates": {name: asdict(r) for name, r in self.rates.items()},
            "quality": self.quality.state.to_dict(),
            "credit": self.credit,
            "gain_mean": self.gain_mean,
            "gain_var": self.gain_var,
        }
        with atomic_dir(Path(folder)) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "FedSpineServer":
        from safetensors.torch import load_file

        folder = Path(folder)
        state_path, tensor_path = folder / "state.json", folder / "tensors.safetensors"
        if not state_path.is_file() or not tensor_path.is_file():
            raise HearthError(f"{folder}: not a FedSpine checkpoint (state.json and tensors.safetensors expected)")
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError as exc:
            raise HearthError(f"{state_path}: line {exc.lineno}: not valid JSON") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise HearthError(f"{state_path}: version: expected {CHECKPOINT_VERSION}, got {state.get('version')}")
        tensors = load_file(str(tensor_path))
        try:
            layout_data = state["layout"]
            layout = UnitLayout(layout_data["layers"], layout_data["heads"], layout_data["channels"],
                                {k: ModuleUnits(**v) for k, v in layout_data["modules"].items()})
            lora = {n: LoraFactors(tensors[f"lora.{n}.a"], tensors[f"lora.{n}.b"]) for n in state["lora_modules"]}
            dense = {n: tensors[f"dense.{n}"] for n in state["dense"]}
            cost = state.get("cost")
            server = cls(_config_from_dict(state["config"]), layout, lora, dense, seed=int(state["seed"]),
                         cost=None if cost is None else RoundCost(**cost))
            server.importance = (tensors["importance.heads"], tensors["importance.channels"])
            server.importance_seen = bool(state["importance_seen"])
            server.round = int(state["round"])
            server.mean_round_time_s = float(state["mean_round_time_s"])
            server.last_relative_time = {str(k): float(v) for k, v in state.get("last_relative_time", {}).items()}
            for i, (name, data) in enumerate(state["bandits"].items()):
                server.bandits[name] = SmoothUCB(server.config.bandit, BanditState.from_dict(data, str(state_path)),
                                                 seed=server.seed + i)
            server.rates = {str(k): DeviceRates(**v) for k, v in state.get("rates", {}).items()}
            if "quality" in state:
                server.quality = SmoothUCB(server._quality_config(), BanditState.from_dict(state["quality"], str(state_path)),
                                           seed=server.seed + 7919)
            server.credit = state.get("credit", server.credit)
            server.gain_mean = state.get("gain_mean")
            server.gain_var = float(state.get("gain_var", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise HearthError(f"{folder}: incomplete FedSpine checkpoint (missing {exc})") from None
        return server


def _cell_ranks(cell: Cell, config: BanditConfig) -> tuple[int, int]:
    """The lowest and highest whole rank inside a bandit cell."""
    lo = max(config.rank_min, math.ceil(cell.rank_lo - 1e-9))
    return lo, max(lo, min(config.rank_max, math.floor(cell.rank_hi + 1e-9)))


def _update_norm(report: DeviceReport, plan: RoundPlan) -> float:
    """Frobenius norm of the change in B·A this device made, summed over modules."""
    total = 0.0
    for name, f in report.lora.items():
        before = plan.lora[name]
        delta = f.delta() - before.b[:, : f.rank] @ before.a[: f.rank] if before.rank >= f.rank else f.delta()
        total += float(torch.linalg.matrix_norm(delta))
    return total


def _masked_importance_mean(reports: list[DeviceReport]) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Mean importance per unit over the devices that observed it; and whether anyone did."""
    def mean(values, seens):
        v = torch.stack(values)
        s = torch.stack([x.float() for x in seens])
        count = s.sum(0)
        return torch.where(count > 0, (v * s).sum(0) / count.clamp_min(1), torch.zeros_like(v[0])), count > 0

    heads = mean([r.importance.heads for r in reports],
                 [r.importance.seen_heads if r.importance.seen_heads is not None else r.keep.heads for r in reports])
    channels = mean([r.importance.channels for r in reports],
                    [r.importance.seen_channels if r.importance.seen_channels is not None else r.keep.channels for r in reports])
    return heads, channels


def _config_to_dict(config: FedSpineConfig) -> dict[str, Any]:
    data = asdict(config)
    data["deadline_s"] = None if math.isinf(config.deadline_s) else config.deadline_s
    return data


def _config_from_dict(data: dict[str, Any]) -> FedSpineConfig:
    bandit = dict(data["bandit"])
    bandit["weights"] = RewardWeights(**bandit["weights"])
    fields = dict(data)
    fields["bandit"] = BanditConfig(**bandit)
    fields["deadline_s"] = math.inf if data["deadline_s"] is None else data["deadline_s"]
    return FedSpineConfig(**fields)
