"""A fleet simulator for FedSpine and its baselines: real training, simulated clock.

What is real: every sampled virtual device really trains its own copy of a small Llama-style
model (RMSNorm, multi-head attention, SwiGLU MLP) with LoRA on q, o, gate, up and down, on its own
non-IID shard of CLINC150 (Dirichlet alpha over intents), with its heads and MLP channels pruned
by the round's keep-mask; the coordinator's logic is training/fedspine.py (bandits, aggregation,
consensus mask, sparsity schedule) unchanged. Accuracy is measured on CLINC150's validation split.

What is simulated: time. 80 devices with Jetson-like speed ratios cannot run here, so each
device's round time comes from a cost model: the FLOPs a SmolLM2-135M-sized backbone (30 layers,
d=576, 1536 MLP channels, 128 tokens per sample) would need for the same local steps at the same
kept fraction of heads/channels (forward + backward, 3x forward), divided by the device's rate,
plus moving the LoRA factors and the classifier head both ways over its link: down, the slots it
trains in float32 and (FedSpine's planned rounds) the frozen rest of the global state in int8,
all in unpruned coordinates; up, the trained slots' kept rows only. The small model stands in for
SmolLM2 in accuracy only; the docs say so.

The backbone is "pretrained" centrally, before federated training, by masked-word prediction on
the texts of a public 20% of the training split (no labels); the federated task is the 150
intents on the other 80%, with a new classifier head and LoRA.

Pruning here is by masks, not the physical removal of training/pruning.py: that module works on
transformers/PEFT models and would rebuild a model per device per round; a masked head or channel
contributes exactly zero (and gets zero gradient), and the clock charges only the kept units.

Methods (one run, same devices, data, sampled clients and seed):
- fedspine: planned rounds (training/fedspine.py): a time model from each device's reports, the
  round length T, and one S-UCB over (pruning beyond the schedule, rank) shared by all devices,
  rewarded by the global model's loss drop, choosing each device's cell within T; a device of
  rank r trains the first r slots of the whole rank-16 global state, the rest frozen;
- hetlora: no pruning, fixed heterogeneous ranks by device class (HetLoRA-style);
- uniform: every device the schedule's sparsity and one fixed rank (no bandit);
- random: a random (ratio >= schedule, rank) per device per round.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import HearthError
from training.aggregation import LoraFactors
from training.bandit import Arm, BanditConfig
from training.fedspine import (
    FROZEN_SCALE_BYTES,
    FROZEN_VALUE_BYTES,
    DeviceReport,
    FedSpineConfig,
    FedSpineServer,
    Importance,
    KeepMask,
    ModuleUnits,
    RoundCost,
    UnitLayout,
    sparsity_at,
)

METHODS = ("fedspine", "hetlora", "uniform", "random")
EVAL_CHUNK = 500        # validation rows per forward pass
GLOBAL_RANK = 16        # the global LoRA state's rank (the highest a device trains)


# --- configuration --------------------------------------------------------------------------

@dataclass
class DeviceClass:
    name: str
    count: int
    flops_per_s: float                 # effective training rate (simulated)
    hetlora_rank: int                  # the fixed rank HetLoRA gives this class


# Jetson TX2 : Xavier NX : AGX Xavier at 1 : 3 : 6 effective training speed (their FP16 peaks are
# about 1.3, 6 and 11 TFLOPS); 30 / 40 / 10 devices as in the FedSpine paper's fleet of 80.
PAPER_FLEET = (
    DeviceClass("jetson-tx2", 30, 0.4e12, 4),
    DeviceClass("xavier-nx", 40, 1.2e12, 8),
    DeviceClass("agx-xavier", 10, 2.4e12, 16),
)


@dataclass
class CostModel:
    """The simulated clock: a SmolLM2-135M-sized backbone's work at the device's kept fraction."""

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    tokens: int = 128
    classes: int = 150
    latency_s: float = 0.05

    def train_flops_per_sample(self, head_keep: float, channel_keep: float) -> float:
        d, hd = self.hidden, self.hidden // self.heads
        attention = (2 * d * self.heads * hd) * head_keep + 2 * d * self.kv_heads * hd     # q, o scale; k, v stay
        mlp = 3 * d * self.intermediate * channel_keep
        scores = 4 * self.tokens * self.tokens * self.heads * hd * head_keep
        forward = self.layers * (2 * self.tokens * (attention + mlp) + scores)
        return 3.0 * forward

    def lora_bytes(self, rank: float, head_keep: float, channel_keep: float, width: float = 4.0) -> float:
        """Bytes of `rank` slots of LoRA factors at `width` bytes a value (kept rows/columns only)."""
        d, c = self.hidden, self.intermediate
        per_layer = rank * ((d + d * head_keep) * 2 + 2 * (d + c * channel_keep) + (c * channel_keep + d))
        return width * self.layers * per_layer

    def frozen_bytes(self, slots: float) -> float:
        """Bytes of `slots` frozen slots: int8 values and, per module, a scale for A and one for B."""
        modules = 5 * self.layers
        return self.lora_bytes(slots, 1.0, 1.0, FROZEN_VALUE_BYTES) + slots * modules * 2 * FROZEN_SCALE_BYTES

    def head_bytes(self) -> float:
        return 4.0 * (self.classes * self.hidden + self.classes)


@dataclass
class SimConfig:
    scale: str = "quick"
    devices: int = 80
    rounds: int = 30
    clients_per_round: int = 10
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 2e-2                   # LoRA factors (Adam, fresh each round)
    head_lr: float = 1e-1              # the classifier head, trained from zero
    target_sparsity: float = 0.3
    warmup_rounds: int = 3
    ramp_rounds: int = 15
    dirichlet_alpha: float = 0.5
    uniform_rank: int = 8
    seed: int = 0
    # the small real model
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    channels: int = 256
    max_tokens: int = 16
    vocab_size: int = 4000
    pretrain_steps: int = 300
    lora_scale: float = 2.0
    eval_samples: int = 3000
    methods: tuple[str, ...] = METHODS
    fleet: tuple[DeviceClass, ...] = PAPER_FLEET
    cost: CostModel = field(default_factory=CostModel)

    @classmethod
    def for_scale(cls, scale: str, devices: int = 80, **overrides) -> "SimConfig":
        if scale == "quick":
            config = cls(scale=scale, devices=devices)
        elif scale == "paper":
            config = cls(scale=scale, devices=devices, rounds=150, clients_per_round=20, local_steps=10,
                         hidden=128, layers=4, heads=8, channels=512, pretrain_steps=800, ramp_rounds=50)
        else:
            raise HearthError(f"--scale: expected quick or paper (got {scale!r})")
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


# --- data -----------------------------------------------------------------------------------

@dataclass
class Encoded:
    ids: torch.Tensor                  # [n, max_tokens] (0 = padding, 1 = unknown)
    labels: torch.Tensor               # [n]


@dataclass
class FleetData:
    pretrain: Encoded                  # public split (texts for masked-word pretraining)
    eval: Encoded                      # validation split, intent labels
    client_indices: list[list[int]]    # per device, indices into `train`
    train: Encoded                     # federated split, intent labels
    intents: list[str]
    vocab_size: int


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def load_fleet_data(path: Path, config: SimConfig) -> FleetData:
    """CLINC150: 20% of train (texts only) to pretrain, 80% split over devices by Dirichlet."""
    try:
        raw = json.loads(Path(path).read_text())
        train, val = raw["train"], raw["val"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise HearthError(f"{path}: cannot read CLINC150 ({exc})") from None
    rng = random.Random(config.seed)
    intents = sorted({label for _, label in train})
    intent_id = {name: i for i, name in enumerate(intents)}

    by_intent: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(train):
        by_intent.setdefault(label, []).append(i)
    public, private = [], []
    for label in intents:
        items = by_intent[label][:]
        rng.shuffle(items)
        cut = len(items) // 5
        public += items[:cut]
        private += items[cut:]

    counts: dict[str, int] = {}
    for text, _ in train:
        for w in _words(text):
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i + 2 for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: config.vocab_size - 2])}

    def encode(rows: list[tuple[str, int]]) -> Encoded:
        ids = torch.zeros(len(rows), config.max_tokens, dtype=torch.long)
        for r, (text, _) in enumerate(rows):
            tokens = [vocab.get(w, 1) for w in _words(text)][: config.max_tokens] or [1]
            ids[r, : len(tokens)] = torch.tensor(tokens)
        return Encoded(ids, torch.tensor([label for _, label in rows], dtype=torch.long))

    pretrain = encode([(train[i][0], 0) for i in public])   # texts only
    fed = encode([(train[i][0], intent_id[train[i][1]]) for i in private])
    val_rows = [(t, intent_id[label]) for t, label in val]
    rng.shuffle(val_rows)
    evaluation = encode(val_rows[: config.eval_samples])

    # Non-IID: each intent's samples go to devices in Dirichlet(alpha) proportions.
    gen = torch.Generator().manual_seed(config.seed)
    clients: list[list[int]] = [[] for _ in range(config.devices)]
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(fed.labels.tolist()):
        by_label.setdefault(label, []).append(i)
    dirichlet = torch.distributions.Dirichlet(torch.full((config.devices,), config.dirichlet_alpha))
    torch.manual_seed(config.seed)
    for label in sorted(by_label):
        items = by_label[label]
        props = dirichlet.sample()
        cuts = (torch.cumsum(props, 0) * len(items)).round().long().tolist()
        start = 0
        for device, end in enumerate(cuts):
            clients[device] += items[start:end]
            start = end
    for device, items in enumerate(clients):   # every device holds at least one batch
        while len(items) < config.batch_size:
            items.append(int(torch.randint(len(fed.labels), (1,), generator=gen)))
    return FleetData(pretrain, evaluation, clients, fed, intents, config.vocab_size)


# --- the small real model -------------------------------------------------------------------

LORA_KINDS = ("q", "o", "gate", "up", "down")


class TinyLlama(torch.nn.Module):
    """A small Llama-style encoder: RMSNorm, multi-head attention, SwiGLU MLP, mean pooling.

    The backbone is frozen after pretraining; LoRA factors, the keep-masks and the classifier
    head are passed to `forward`, so one backbone serves every virtual device.
    """

    def __init__(self, config: SimConfig, vocab_size: int):
        super().__init__()
        d, c = config.hidden, config.channels
        self.config = config
        self.embed = torch.nn.Embedding(vocab_size, d, padding_idx=0)
        self.weights = torch.nn.ParameterDict()
        for layer in range(config.layers):
            for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)),
                                ("gate", (c, d)), ("up", (c, d)), ("down", (d, c))):
                self.weights[f"{layer}_{name}"] = torch.nn.Parameter(torch.randn(shape) / math.sqrt(shape[1]))
            self.weights[f"{layer}_norm1"] = torch.nn.Parameter(torch.ones(d))
            self.weights[f"{layer}_norm2"] = torch.nn.Parameter(torch.ones(d))
        self.weights["final_norm"] = torch.nn.Parameter(torch.ones(d))

    def module_shape(self, name: str) -> tuple[int, int]:
        layer, kind = name.split(".")
        out_f, in_f = self.weights[f"{layer}_{kind}"].shape
        return in_f, out_f

    def lora_modules(self) -> list[str]:
        return [f"{layer}.{kind}" for layer in range(self.config.layers) for kind in LORA_KINDS]

    def _linear(self, x, layer: int, kind: str, lora: dict[str, LoraFactors] | None):
        y = x @ self.weights[f"{layer}_{kind}"].T
        f = lora.get(f"{layer}.{kind}") if lora else None
        if f is not None:
            y = y + self.config.lora_scale * ((x @ f.a.T) @ f.b.T)
        return y

    @staticmethod
    def _norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def features(self, ids: torch.Tensor, lora=None, keep: KeepMask | None = None) -> torch.Tensor:
        """Mean-pooled final hidden states of the non-padding tokens."""
        x = self.hidden_states(ids, lora, keep)
        m = (ids != 0).unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    def hidden_states(self, ids: torch.Tensor, lora=None, keep: KeepMask | None = None) -> torch.Tensor:
        c = self.config
        mask = ids != 0
        x = self.embed(ids)
        n, t, d = x.shape
        hd = d // c.heads
        attn_bias = torch.zeros(n, 1, 1, t).masked_fill(~mask[:, None, None, :], float("-inf"))
        for layer in range(c.layers):
            h = self._norm(x, self.weights[f"{layer}_norm1"])
            q = self._linear(h, layer, "q", lora).view(n, t, c.heads, hd).transpose(1, 2)
            k = (h @ self.weights[f"{layer}_k"].T).view(n, t, c.heads, hd).transpose(1, 2)
            v = (h @ self.weights[f"{layer}_v"].T).view(n, t, c.heads, hd).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + attn_bias
            out = torch.softmax(scores, dim=-1) @ v                       # [n, heads, t, hd]
            if keep is not None:                                           # a pruned head contributes nothing
                out = out * keep.heads[layer].view(1, -1, 1, 1).to(out.dtype)
            x = x + self._linear(out.transpose(1, 2).reshape(n, t, d), layer, "o", lora)
            h = self._norm(x, self.weights[f"{layer}_norm2"])
            act = F.silu(self._linear(h, layer, "gate", lora)) * self._linear(h, layer, "up", lora)
            if keep is not None:
                act = act * keep.channels[layer].to(act.dtype)
            x = x + self._linear(act, layer, "down", lora)
        return self._norm(x, self.weights["final_norm"])

    def logits(self, ids, head: dict[str, torch.Tensor], lora=None, keep=None) -> torch.Tensor:
        return self.features(ids, lora, keep) @ head["weight"].T + head["bias"]


def pretrain_backbone(model: TinyLlama, data: Encoded, config: SimConfig) -> float:
    """Masked-word pretraining of the whole small model on the public texts (15% of the words
    hidden, predicted through the tied embedding); returns its masked-word accuracy on the last
    batches. The federated task's labels are never seen here."""
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(config.seed)
    right = seen = 0
    for step in range(config.pretrain_steps):
        ids = data.ids[torch.randint(len(data.ids), (64,), generator=gen)]
        hide = (torch.rand(ids.shape, generator=gen) < 0.15) & (ids > 1)
        hide[:, 0] |= ~hide.any(dim=1) & (ids[:, 0] > 1)
        inputs = ids.masked_fill(hide, 1)
        logits = model.hidden_states(inputs)[hide] @ model.embed.weight.T
        loss = F.cross_entropy(logits, ids[hide])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= config.pretrain_steps - 20:
            right += int((logits.argmax(-1) == ids[hide]).sum())
            seen += int(hide.sum())
    for p in model.parameters():
        p.requires_grad_(False)
    return right / max(seen, 1)


def layout_for(model: TinyLlama) -> UnitLayout:
    c = model.config
    hd = c.hidden // c.heads
    modules = {}
    for layer in range(c.layers):
        modules[f"{layer}.q"] = ModuleUnits(layer, "heads", "rows", hd)
        modules[f"{layer}.o"] = ModuleUnits(layer, "heads", "cols", hd)
        modules[f"{layer}.gate"] = ModuleUnits(layer, "channels", "rows", 1)
        modules[f"{layer}.up"] = ModuleUnits(layer, "channels", "rows", 1)
        modules[f"{layer}.down"] = ModuleUnits(layer, "channels", "cols", 1)
    return UnitLayout(c.layers, c.heads, c.channels, modules)


def initial_lora(model: TinyLlama, rank: int, seed: int) -> dict[str, LoraFactors]:
    """A random, B zero: the adapted model starts exactly at the backbone."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in model.lora_modules():
        in_f, out_f = model.module_shape(name)
        out[name] = LoraFactors(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f), torch.zeros(out_f, rank))
    return out


# --- one device's round ---------------------------------------------------------------------

def _unit_scores(model: TinyLlama, lora: dict[str, LoraFactors], grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 keep: KeepMask, merged_lora: dict[str, LoraFactors] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAPrune-style importance: G = s(dB A + B dA) over the trained slots (`lora`, `grads`);
    |G * (W + s B A)| summed per unit, B A over every slot the device holds (`merged_lora`,
    default `lora`), normalised per layer (the formula of training/pruning.LoraImportance, on
    plain tensors)."""
    merged_lora = merged_lora or lora
    c = model.config
    hd = c.hidden // c.heads
    heads = torch.zeros(c.layers, c.heads)
    channels = torch.zeros(c.layers, c.channels)
    s = c.lora_scale
    for name, f in lora.items():
        layer, kind = name.split(".")
        layer = int(layer)
        ga, gb = grads[name]
        g = s * (gb @ f.a + f.b @ ga)
        merged = model.weights[f"{layer}_{kind}"] + s * merged_lora[name].delta()
        score = (g * merged).abs()
        if kind == "q":
            heads[layer] += score.view(c.heads, hd, -1).sum(dim=(1, 2))
        elif kind == "o":
            heads[layer] += score.view(score.shape[0], c.heads, hd).sum(dim=(0, 2))
        elif kind in ("gate", "up"):
            channels[layer] += score.sum(dim=1)
        else:
            channels[layer] += score.sum(dim=0)
    # A pruned unit is not observed (its estimate would come from the other side's factors only).
    heads = heads * keep.heads
    channels = channels * keep.channels
    heads = heads / heads.sum(dim=1, keepdim=True).clamp_min(1e-12)
    channels = channels / channels.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return heads, channels


@dataclass
class LocalResult:
    lora: dict[str, LoraFactors]
    head: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    importance: tuple[torch.Tensor, torch.Tensor]


def train_locally(model: TinyLlama, data: FleetData, indices: list[int], lora: dict[str, LoraFactors],
                  head: dict[str, torch.Tensor], keep: KeepMask, config: SimConfig, rng: random.Random,
                  rank: int | None = None) -> LocalResult:
    """A few LoRA + head steps on the device's own samples, with its heads/channels masked. Only
    the first `rank` slots of `lora` train (all by default); the rest stay as sent and are not
    returned."""
    rank = rank or max((f.rank for f in lora.values()), default=0)
    a = {n: f.a[:rank].clone().requires_grad_(True) for n, f in lora.items()}
    b = {n: f.b[:, :rank].clone().requires_grad_(True) for n, f in lora.items()}
    frozen = {n: (f.a[rank:], f.b[:, rank:]) for n, f in lora.items() if f.rank > rank}

    def adapters() -> dict[str, LoraFactors]:
        """Every slot the device holds: the trained ones, then the frozen ones."""
        return {n: LoraFactors(torch.cat([a[n], frozen[n][0]]), torch.cat([b[n], frozen[n][1]], dim=1))
                if n in frozen else LoraFactors(a[n], b[n]) for n in a}

    w = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    optimizer = torch.optim.Adam([{"params": [*a.values(), *b.values()], "lr": config.lr},
                                  {"params": list(w.values()), "lr": config.head_lr}])
    batches = [torch.tensor([indices[rng.randrange(len(indices))] for _ in range(config.batch_size)]) for _ in range(config.local_steps)]
    first = batches[0]

    def loss_on(idx):
        return F.cross_entropy(model.logits(_trimmed(data.train.ids[idx]), w, adapters(), keep), data.train.labels[idx])

    with torch.no_grad():
        before = float(loss_on(first))
    heads = torch.zeros(model.config.layers, model.config.heads)
    channels = torch.zeros(model.config.layers, model.config.channels)
    for idx in batches:
        optimizer.zero_grad()
        loss_on(idx).backward()
        with torch.no_grad():
            h, c = _unit_scores(model, {n: LoraFactors(a[n], b[n]) for n in a}, {n: (a[n].grad, b[n].grad) for n in a},
                                keep, adapters())
            heads += h / len(batches)
            channels += c / len(batches)
        optimizer.step()
    with torch.no_grad():
        after = float(loss_on(first))
    return LocalResult({n: LoraFactors(a[n].detach(), b[n].detach()) for n in a},
                       {k: v.detach() for k, v in w.items()}, before, after, (heads, channels))


# --- the fleet ------------------------------------------------------------------------------

@dataclass
class VirtualDevice:
    name: str
    kind: str
    flops_per_s: float
    bandwidth_bps: float
    hetlora_rank: int


def make_fleet(config: SimConfig) -> list[VirtualDevice]:
    """The paper's mix scaled to `devices`, each device jittered (+-25% speed), Wi-Fi 5-50 Mbit/s."""
    total = sum(c.count for c in config.fleet)
    rng = random.Random(config.seed + 1)
    counts = [max(1, round(config.devices * c.count / total)) for c in config.fleet]
    while sum(counts) > config.devices:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < config.devices:
        counts[counts.index(max(counts))] += 1
    fleet = []
    for cls, n in zip(config.fleet, counts):
        for i in range(n):
            speed = cls.flops_per_s * rng.uniform(0.75, 1.25)
            megabits = math.exp(rng.uniform(math.log(5), math.log(50)))
            fleet.append(VirtualDevice(f"{cls.name}-{i}", cls.name, speed, megabits * 1e6 / 8, cls.hetlora_rank))
    rng.shuffle(fleet)
    return fleet


def round_cost(config: SimConfig, sent_rank: int) -> RoundCost:
    """The clock's work and bytes as the coordinator's linear time model when `sent_rank` slots
    are sent (exact for this clock, but for the latency, which the link rate absorbs). Down, every
    slot as a frozen one plus what a trained one's float32 adds; up, the trained slots' kept rows."""
    cost = config.cost
    samples = config.local_steps * config.batch_size
    flops = lambda heads, channels: samples * cost.train_flops_per_sample(heads, channels)
    up = lambda heads, channels: cost.lora_bytes(1, heads, channels)
    return RoundCost(
        fixed_work=flops(0, 0), head_work=flops(1, 0) - flops(0, 0), channel_work=flops(0, 1) - flops(0, 0),
        fixed_bytes=2 * cost.head_bytes() + cost.frozen_bytes(sent_rank),
        rank_bytes=cost.lora_bytes(1, 1.0, 1.0) - cost.frozen_bytes(1) + up(0, 0),     # the download is never pruned
        rank_head_bytes=up(1, 0) - up(0, 0), rank_channel_bytes=up(0, 1) - up(0, 0),
    )


def device_round_seconds(device: VirtualDevice, keep: KeepMask, rank: int, config: SimConfig,
                         sent_rank: int | None = None) -> tuple[float, float]:
    """(compute, transfer) seconds of one round on the simulated clock: `rank` slots trained of
    `sent_rank` sent (default: only those)."""
    cost = config.cost
    head_keep = float(keep.heads.float().mean())
    channel_keep = float(keep.channels.float().mean())
    samples = config.local_steps * config.batch_size
    compute = samples * cost.train_flops_per_sample(head_keep, channel_keep) / device.flops_per_s
    frozen = max(0, (sent_rank or rank) - rank)
    down = cost.lora_bytes(rank, 1.0, 1.0) + cost.frozen_bytes(frozen) + cost.head_bytes()
    up = cost.lora_bytes(rank, head_keep, channel_keep) + cost.head_bytes()
    transfer = (down + up) / device.bandwidth_bps + 2 * cost.latency_s
    return compute, transfer


@dataclass
class CurvePoint:
    round: int
    time_s: float
    accuracy: float
    sparsity: float


@dataclass
class MethodResult:
    name: str
    curve: list[CurvePoint]
    final_accuracy: float               # at the target sparsity (consensus mask), after all rounds
    final_accuracy_unpruned: float
    sim_time_s: float
    mean_round_s: float
    wall_s: float
    mean_rank: float
    mean_ratio: float


def _trimmed(ids: torch.Tensor) -> torch.Tensor:
    """`ids` without the padding columns every row has (padding is at the end). Exact: a padded
    position is masked out of attention and pooling, so it only costs time."""
    return ids[:, : max(int((ids != 0).sum(1).max()), 1)]


def evaluate(model: TinyLlama, data: Encoded, server: FedSpineServer, keep: KeepMask | None) -> float:
    """Accuracy on `data`, in chunks of similar length (CLINC150's questions average half the
    padded width, so sorting first halves the work)."""
    order = torch.argsort((data.ids != 0).sum(1), stable=True)
    correct = 0
    with torch.no_grad():
        for chunk in order.split(EVAL_CHUNK):
            logits = model.logits(_trimmed(data.ids[chunk]), server.dense, server.lora, keep)
            correct += int((logits.argmax(-1) == data.labels[chunk]).sum())
    return correct / max(len(data.labels), 1)


def _magnitude_mask(model: TinyLlama, server: FedSpineServer, ratio: float) -> KeepMask:
    """For a method without importance (HetLoRA): one-shot pruning by merged-weight magnitude."""
    c = model.config
    hd = c.hidden // c.heads
    heads = torch.zeros(c.layers, c.heads)
    channels = torch.zeros(c.layers, c.channels)
    for layer in range(c.layers):
        def merged(kind):
            f = server.lora[f"{layer}.{kind}"]
            return model.weights[f"{layer}_{kind}"] + c.lora_scale * (f.b @ f.a)
        heads[layer] = merged("q").view(c.heads, hd, -1).pow(2).sum(dim=(1, 2)) + merged("o").view(-1, c.heads, hd).pow(2).sum(dim=(0, 2))
        channels[layer] = merged("gate").pow(2).sum(1) + merged("up").pow(2).sum(1) + merged("down").pow(2).sum(0)
    saved = server.importance
    server.importance = (heads, channels)
    try:
        return server.consensus_mask(ratio)
    finally:
        server.importance = saved


def run_method(method: str, model: TinyLlama, data: FleetData, fleet: list[VirtualDevice], config: SimConfig,
               schedule: list[list[int]]) -> MethodResult:
    """Train with `method` for `config.rounds` rounds over the pre-drawn client `schedule`."""
    started = time.perf_counter()
    pruning = method != "hetlora"
    bandit = BanditConfig(ratio_min=0.0, ratio_max=0.6, rank_min=2, rank_max=GLOBAL_RANK, grid_ratios=2, grid_ranks=2,
                          split_after=4)
    fed = FedSpineConfig(target_sparsity=config.target_sparsity if pruning else 0.0, warmup_rounds=config.warmup_rounds,
                         ramp_rounds=config.ramp_rounds, quorum=1.0, bandit=bandit)
    head = {"weight": torch.zeros(len(data.intents), config.hidden), "bias": torch.zeros(len(data.intents))}
    # FedSpine's coordinator predicts each device's time from its reports (the baselines need no plan).
    cost = round_cost(config, GLOBAL_RANK) if method == "fedspine" else None
    server = FedSpineServer(fed, layout_for(model), initial_lora(model, GLOBAL_RANK, config.seed), head,
                            seed=config.seed, cost=cost)
    rng = random.Random(config.seed + 7)
    choice_rng = random.Random(config.seed + 11)
    clock = 0.0
    curve = [CurvePoint(0, 0.0, evaluate(model, data.eval, server, None), 0.0)]
    ranks, ratios, round_times = [], [], []
    for round_index in range(config.rounds):
        devices = [fleet[i] for i in schedule[round_index]]
        floor = sparsity_at(round_index, fed)
        fixed = None
        if method == "hetlora":
            fixed = {d.name: Arm(-1, 0.0, d.hetlora_rank) for d in devices}
        elif method == "uniform":
            fixed = {d.name: Arm(-1, floor, config.uniform_rank) for d in devices}
        elif method == "random":
            fixed = {d.name: Arm(-1, choice_rng.uniform(0.0, 0.6), choice_rng.randint(2, 16)) for d in devices}
        plans = server.plan_round([d.name for d in devices], fixed)
        by_name = {d.name: d for d in devices}
        reports = []
        for plan in plans:
            device = by_name[plan.device]
            local = train_locally(model, data, data.client_indices[fleet.index(device)], plan.lora, plan.dense,
                                  plan.keep, config, rng, plan.rank)
            compute_s, transfer_s = device_round_seconds(device, plan.keep, plan.rank, config, plan.sent_rank)
            heads, channels = local.importance
            reports.append(DeviceReport(
                round=plan.round, device=plan.device, lora=local.lora, keep=plan.keep, dense=local.head,
                samples=config.local_steps * config.batch_size, loss_before=local.loss_before, loss_after=local.loss_after,
                importance=Importance(heads, channels), compute_s=compute_s, transfer_s=transfer_s,
                finished_at_s=clock + compute_s + transfer_s,
            ))
            ranks.append(plan.rank)
            ratios.append(plan.ratio)
        result = server.aggregate_round(reports, opened_at_s=clock)
        round_times.append(result.round_time_s)
        clock = result.closed_at_s
        sparsity = sparsity_at(round_index + 1, fed) if pruning else 0.0
        keep = server.consensus_mask(sparsity) if sparsity > 0 else None
        curve.append(CurvePoint(round_index + 1, clock, evaluate(model, data.eval, server, keep), sparsity))
    final_keep = (server.consensus_mask(config.target_sparsity) if pruning else _magnitude_mask(model, server, config.target_sparsity))
    return MethodResult(
        name=method, curve=curve,
        final_accuracy=evaluate(model, data.eval, server, final_keep),
        final_accuracy_unpruned=evaluate(model, data.eval, server, None),
        sim_time_s=clock, mean_round_s=sum(round_times) / len(round_times),
        wall_s=time.perf_counter() - started,
        mean_rank=sum(ranks) / len(ranks), mean_ratio=sum(ratios) / len(ratios),
    )


def client_schedule(config: SimConfig) -> list[list[int]]:
    """Which devices each round samples: the same for every method."""
    if config.clients_per_round > config.devices:
        raise HearthError(f"clients per round ({config.clients_per_round}) exceeds the fleet ({config.devices})")
    rng = random.Random(config.seed + 3)
    return [sorted(rng.sample(range(config.devices), config.clients_per_round)) for _ in range(config.rounds)]


def time_to_accuracy(curve: list[CurvePoint], target: float) -> float:
    for point in curve:
        if point.accuracy >= target:
            return point.time_s
    return math.inf


def accuracy_at_time(curve: list[CurvePoint], seconds: float) -> float:
    return max((p for p in curve if p.time_s <= seconds), key=lambda p: p.time_s).accuracy


@dataclass
class SimReport:
    config: SimConfig
    pretrain_accuracy: float
    results: dict[str, MethodResult]
    target_accuracy: float
    wall_s: float


def _run_method_in_worker(method: str, state: dict[str, torch.Tensor], data: FleetData, fleet: list[VirtualDevice],
                          config: SimConfig, schedule: list[list[int]]) -> MethodResult:
    torch.set_num_threads(1)
    model = TinyLlama(config, data.vocab_size)
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return run_method(method, model, data, fleet, config, schedule)


def simulate(config: SimConfig, clinc_path: Path, workers: int | None = None) -> SimReport:
    """Pretrain the small backbone, then run every method on the same fleet, data and schedule,
    `workers` methods at a time (default: one per core this process may use; 1 runs them here)."""
    started = time.perf_counter()
    for method in config.methods:
        if method not in METHODS:
            raise HearthError(f"unknown federated method {method!r} (expected one of {', '.join(METHODS)})")
    torch.manual_seed(config.seed)
    data = load_fleet_data(clinc_path, config)
    model = TinyLlama(config, data.vocab_size)
    pretrain_accuracy = pretrain_backbone(model, data.pretrain, config)
    fleet = make_fleet(config)
    schedule = client_schedule(config)
    workers = min(len(config.methods), workers or len(os.sched_getaffinity(0)))
    if workers <= 1:
        results = {m: run_method(m, model, data, fleet, config, schedule) for m in config.methods}
    else:
        # The methods are independent runs from the same backbone, each on one thread (the small
        # model's ops gain nothing from a second one), so they share the cores as processes.
        # Same seeds, same single thread: the results are those of running them one by one.
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {m: pool.submit(_run_method_in_worker, m, state, data, fleet, config, schedule)
                       for m in config.methods}
            results = {m: f.result() for m, f in futures.items()}
    # Target: 95% of the lowest final accuracy, so that every method reaches it.
    target = 0.95 * min(max(p.accuracy for p in r.curve) for r in results.values())
    return SimReport(config, pretrain_accuracy, results, target, time.perf_counter() - started)
