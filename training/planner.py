"""The PAC planner: which household device does what in a pooled training job.

Hybrid parallelism (PAC, ALGORITHMS.md section 4):
- devices that can hold the whole quantised backbone are data-parallel replicas: each runs epoch 1
  (backbone forward, activation cache, adapter step) for its own shard of the samples;
- devices that cannot are grouped into pipelines; a pipeline's layer split is chosen by dynamic
  programming minimising the slowest stage's time per sample (its layers' compute plus sending
  the boundary activation on), under each device's memory;
- the global batch is split over replicas and pipelines in proportion to measured speed
  (integers that sum to the batch), so a slow phone does not hold back a desktop;
- epochs 2.. are adapter-only data parallelism: every cache holder trains on its own cached
  samples, and adapter gradients are averaged each step through the coordinator: every device's
  contribution goes up, and each device gets the sum back (the last one to finish is sent the
  others' part while its own is still on the way up, so on a full-duplex link a two-device
  step costs one transfer, not two; on shared Wi-Fi all bytes cross the same air, so a ring
  buys nothing).

What it is not: it measures nothing (mesh/profile.py measures; `profile_from_measurement` turns
such measurements into per-layer times here), sends nothing, and does not re-plan when a device
leaves (the job calls `make_plan` again with the devices that remain).

The DP is optimal for the order in which the pipeline's devices are given (memory first, then
speed); it may leave a device without layers when adding it would only add transfer time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.errors import HearthError

INF = math.inf


@dataclass
class ModelSpec:
    """What the planner needs to know about the backbone, in bytes and FLOPs per sample."""

    layer_bytes: list[int]             # weight bytes of each decoder layer (quantised as loaded)
    activation_bytes: int              # bytes per sample crossing a layer boundary (hidden state and
                                       # the tapped states carried along to the cache holder)
    embedding_bytes: int = 0           # embeddings / LM head (held by a replica or a pipeline's first stage)
    adapter_bytes: int = 0             # adapter parameters: what one gradient average moves per device
    working_bytes: int = 0             # activations, optimiser and runtime a device needs besides weights
    layer_flops: list[float] = field(default_factory=list)   # forward FLOPs per sample per layer
    adapter_flops: float = 0.0         # adapter forward FLOPs per sample

    @property
    def layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def backbone_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embedding_bytes


@dataclass
class DeviceProfile:
    """One device as measured: per-layer forward time per sample, memory and link."""

    name: str
    layer_time_s: list[float]          # forward seconds per sample for each layer
    adapter_step_s: float              # adapter forward + backward + update seconds per sample
    memory_bytes: int                  # what the job may use on this device
    bandwidth_bps: float               # link bandwidth, bytes per second
    latency_s: float = 0.0             # one-way latency of a message

    @property
    def forward_s(self) -> float:
        return sum(self.layer_time_s)


@dataclass
class RawMeasurement:
    """What mesh/profile.py measures on a device (its fields mirror that module's report)."""

    name: str
    cores: int
    memory_bytes: int
    matmul_flops_per_s: float          # float32 matmul rate with all cores
    bandwidth_bps: float               # bytes per second to the coordinator
    rtt_s: float                       # round-trip time to the coordinator


@dataclass
class Stage:
    device: str
    first_layer: int                   # 0-based, inclusive
    last_layer: int                    # 0-based, inclusive
    seconds_per_sample: float          # compute + boundary transfer


@dataclass
class Unit:
    """A replica (one device) or a pipeline group: it takes a share of every batch in epoch 1."""

    kind: str                          # "replica" or "pipeline"
    devices: list[str]
    stages: list[Stage]
    seconds_per_sample: float          # epoch 1: forward + adapter step (a pipeline: its slowest stage)
    share: int = 0                     # samples of each global batch
    cache_holder: str = ""             # who keeps the activation cache of this unit's samples

    def describe(self) -> str:
        if self.kind == "replica":
            return f"{self.devices[0]}: whole backbone, {self.share} samples per step"
        split = ", ".join(f"{s.device} layers {s.first_layer + 1}-{s.last_layer + 1}" for s in self.stages)
        return f"pipeline [{split}], {self.share} samples per step, cache on {self.cache_holder}"


@dataclass
class Plan:
    units: list[Unit]
    idle: list[str]                    # devices with no epoch-1 work (they still average adapters)
    excluded: list[str]                # devices too small even for adapter training
    coordinator: str
    global_batch: int
    epoch1_step_s: float
    later_step_s: float
    epoch1_bytes_per_step: int
    later_bytes_per_step: int

    @property
    def shares(self) -> dict[str, int]:
        return {u.cache_holder: u.share for u in self.units}

    def describe(self) -> str:
        lines = [f"Training plan for a batch of {self.global_batch} (coordinator: {self.coordinator})"]
        for unit in self.units:
            lines.append(f"  - {unit.describe()}")
        if self.idle:
            lines.append(f"  - idle in epoch 1: {', '.join(self.idle)}")
        if self.excluded:
            lines.append(f"  - too little memory to take part: {', '.join(self.excluded)}")
        receivers = sorted({name for u in self.units if u.share for name in u.devices})
        lines.append(f"The job's training data is sent to: {', '.join(receivers)}")
        lines.append(
            f"Predicted step: {self.epoch1_step_s:.3f} s in epoch 1, {self.later_step_s:.3f} s later "
            f"({_human_bytes(self.epoch1_bytes_per_step)} / {_human_bytes(self.later_bytes_per_step)} sent per step)"
        )
        return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# --- from measurements to profiles ----------------------------------------------------------

def llama_model_spec(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tokens_per_sample: int,
    weight_bits: float = 4.5,          # NF4/Q4_1 with its block scales
    activation_dtype_bytes: int = 2,
    taps: int = 0,                     # tapped layers whose states travel to the cache holder
    adapter_params: int = 0,
    working_bytes: int = 64 << 20,
) -> ModelSpec:
    """A Llama-style backbone's sizes and forward FLOPs (2 per multiply-add, plus attention scores)."""
    head_dim = hidden // heads
    per_layer_params = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
    attention_flops = 4 * tokens_per_sample * tokens_per_sample * hidden   # scores and weighted sum
    layer_flops = 2.0 * per_layer_params * tokens_per_sample + attention_flops
    hidden_bytes = tokens_per_sample * hidden * activation_dtype_bytes
    return ModelSpec(
        layer_bytes=[int(per_layer_params * weight_bits / 8)] * layers,
        activation_bytes=hidden_bytes * (1 + taps),
        embedding_bytes=int(vocab * hidden * weight_bits / 8),
        adapter_bytes=adapter_params * 4,
        working_bytes=working_bytes,
        layer_flops=[layer_flops] * layers,
        adapter_flops=2.0 * adapter_params * tokens_per_sample,
    )


def profile_from_measurement(raw: RawMeasurement, model: ModelSpec, efficiency: float = 0.5) -> DeviceProfile:
    """Per-layer forward time = the layer's FLOPs / the measured matmul rate.

    `efficiency` is the fraction of the peak matmul rate a whole layer reaches (norms, attention
    softmax and memory traffic cost extra); an adapter step is forward + backward + update, about
    3x its forward FLOPs.
    """
    if raw.matmul_flops_per_s <= 0:
        raise HearthError(f"profile of {raw.name}: matmul_flops_per_s must be positive (got {raw.matmul_flops_per_s})")
    if raw.bandwidth_bps <= 0:
        raise HearthError(f"profile of {raw.name}: bandwidth_bps must be positive (got {raw.bandwidth_bps})")
    if not model.layer_flops or len(model.layer_flops) != model.layers:
        raise HearthError("model spec: layer_flops must give one value per layer")
    rate = raw.matmul_flops_per_s * efficiency
    return DeviceProfile(
        name=raw.name,
        layer_time_s=[f / rate for f in model.layer_flops],
        adapter_step_s=3.0 * model.adapter_flops / rate,
        memory_bytes=raw.memory_bytes,
        bandwidth_bps=raw.bandwidth_bps,
        latency_s=raw.rtt_s / 2,
    )


# --- the pipeline split (dynamic programming) -------------------------------------------------

def stage_cost(device: DeviceProfile, model: ModelSpec, first: int, end: int, microbatch: int = 1) -> float:
    """Seconds per sample for `device` running layers [first, end): compute, then sending the
    boundary activation to the next stage (none after the last layer); INF if it does not fit."""
    need = sum(model.layer_bytes[first:end]) + model.working_bytes + (model.embedding_bytes if first == 0 else 0)
    if need > device.memory_bytes:
        return INF
    compute = sum(device.layer_time_s[first:end])
    send = 0.0 if end == model.layers else model.activation_bytes / device.bandwidth_bps + device.latency_s / microbatch
    return compute + send


def split_layers(devices: list[DeviceProfile], model: ModelSpec, microbatch: int = 1) -> tuple[float, list[tuple[int, int]]]:
    """Contiguous layer blocks for `devices` in order (a block may be empty: (i, i)), minimising the
    slowest stage. Returns (bottleneck seconds per sample, [(first, end) per device]); INF if none fits.

    best[k][j] = the smallest bottleneck placing layers [0, j) on the first k devices.
    """
    n, layers = len(devices), model.layers
    best = [[INF] * (layers + 1) for _ in range(n + 1)]
    cut = [[0] * (layers + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        device = devices[k - 1]
        for j in range(layers + 1):
            best[k][j], cut[k][j] = best[k - 1][j], j          # device k takes no layers
            for i in range(j):
                if best[k - 1][i] == INF:
                    continue
                value = max(best[k - 1][i], stage_cost(device, model, i, j, microbatch))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    if best[n][layers] == INF:
        return INF, []
    blocks, j = [], layers
    for k in range(n, 0, -1):
        i = cut[k][j]
        blocks.append((i, j))
        j = i
    blocks.reverse()
    return best[n][layers], blocks


# --- shares ---------------------------------------------------------------------------------

def proportional_shares(speeds: list[float], total: int) -> list[int]:
    """Integers summing to `total`, proportional to `speeds` (largest remainder)."""
    if total < 0:
        raise HearthError(f"batch size must not be negative (got {total})")
    if not speeds or any(s < 0 or math.isnan(s) for s in speeds) or sum(speeds) <= 0:
        raise HearthError("batch shares need at least one device with a positive speed")
    whole = sum(speeds)
    exact = [total * s / whole for s in speeds]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(speeds)), key=lambda i: (-(exact[i] - shares[i]), -speeds[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


# --- the plan -------------------------------------------------------------------------------

def _check(devices: list[DeviceProfile], model: ModelSpec, global_batch: int) -> None:
    if not devices:
        raise HearthError("training plan: no devices to plan for")
    if global_batch < 1:
        raise HearthError(f"training plan: global batch must be at least 1 (got {global_batch})")
    if model.layers == 0:
        raise HearthError("training plan: the model has no layers")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise HearthError(f"training plan: device names must be unique (got {names})")
    for d in devices:
        if len(d.layer_time_s) != model.layers:
            raise HearthError(
                f"profile of {d.name}: layer_time_s has {len(d.layer_time_s)} entries, the model has {model.layers} layers"
            )
        if d.bandwidth_bps <= 0 or any(t < 0 for t in d.layer_time_s) or d.adapter_step_s < 0:
            raise HearthError(f"profile of {d.name}: times must be non-negative and bandwidth_bps positive")


def _average_seconds(members: list[DeviceProfile], coordinator: DeviceProfile, nbytes: int) -> tuple[float, int]:
    """Every other member's upload to the coordinator, and one sum back to each. The uploads
    share the coordinator's link; the send to the last device to finish overlaps them (it needs
    only the others' part), the rest follow once everything is in."""
    others = [d for d in members if d.name != coordinator.name]
    if not others:
        return 0.0, 0
    up = sum(nbytes / d.bandwidth_bps + d.latency_s for d in others)
    one_down = nbytes / coordinator.bandwidth_bps + coordinator.latency_s
    return max(up, one_down) + (len(others) - 1) * one_down, 2 * len(others) * nbytes


def make_plan(devices: list[DeviceProfile], model: ModelSpec, global_batch: int, microbatch: int = 1) -> Plan:
    """Plan epoch 1 (replicas + DP-split pipelines) and later epochs (adapter data parallelism)."""
    _check(devices, model, global_batch)
    adapter_need = model.adapter_bytes * 3 + model.working_bytes   # weights, grads, optimiser moments
    excluded = [d.name for d in devices if d.memory_bytes < adapter_need]
    usable = [d for d in devices if d.name not in excluded]
    replica_need = model.backbone_bytes + model.working_bytes
    strong = [d for d in usable if d.memory_bytes >= replica_need]
    weak = [d for d in usable if d.memory_bytes < replica_need]

    units = [
        Unit("replica", [d.name], [Stage(d.name, 0, model.layers - 1, d.forward_s)], d.forward_s + d.adapter_step_s, cache_holder=d.name)
        for d in strong
    ]
    by_name = {d.name: d for d in usable}
    # Pipelines: the biggest devices first (the first stage also holds the embeddings), then the
    # fastest; after each group, the devices it left without layers may form another.
    remaining = sorted(weak, key=lambda d: (-d.memory_bytes, d.forward_s, d.name))
    idle: list[str] = []
    while remaining:
        bottleneck, blocks = split_layers(remaining, model, microbatch)
        if bottleneck == INF:
            idle.extend(d.name for d in remaining)
            break
        used = [(d, b) for d, b in zip(remaining, blocks) if b[1] > b[0]]
        stages = [Stage(d.name, b[0], b[1] - 1, stage_cost(d, model, b[0], b[1], microbatch)) for d, b in used]
        last = used[-1][0]
        units.append(Unit("pipeline", [d.name for d, _ in used], stages, bottleneck + last.adapter_step_s, cache_holder=last.name))
        remaining = [d for d, b in zip(remaining, blocks) if b[1] == b[0]]

    if not units:
        total = sum(d.memory_bytes for d in usable)
        raise HearthError(
            f"training plan: no device or group of devices can hold the backbone "
            f"({model.backbone_bytes / 1e6:.0f} MB + {model.working_bytes / 1e6:.0f} MB working memory per stage; "
            f"the devices offer {total / 1e6:.0f} MB in all)"
        )

    shares = proportional_shares([1.0 / max(u.seconds_per_sample, 1e-12) for u in units], global_batch)
    for unit, share in zip(units, shares):
        unit.share = share

    members = [d for d in usable if d.name not in idle] + [by_name[n] for n in idle]
    coordinator = max((by_name[u.cache_holder] for u in units), key=lambda d: (d.bandwidth_bps, -d.forward_s))
    average_s, average_bytes = _average_seconds(members, coordinator, model.adapter_bytes)

    pipeline_bytes = sum(u.share * model.activation_bytes * (len(u.stages) - 1) for u in units)
    epoch1_compute = max(_unit_step_seconds(u, by_name, model, microbatch) for u in units)
    # Epochs 2..: each cache holder trains on its own cached samples of every batch.
    later_compute = max(u.share * by_name[u.cache_holder].adapter_step_s for u in units)
    return Plan(
        units=units,
        idle=idle,
        excluded=excluded,
        coordinator=coordinator.name,
        global_batch=global_batch,
        epoch1_step_s=epoch1_compute + average_s,
        later_step_s=later_compute + average_s,
        epoch1_bytes_per_step=int(pipeline_bytes + average_bytes),
        later_bytes_per_step=int(average_bytes),
    )


def _unit_step_seconds(unit: Unit, by_name: dict[str, DeviceProfile], model: ModelSpec, microbatch: int) -> float:
    """A unit's epoch-1 share: a replica's samples one after another; a pipeline's at its
    bottleneck rate plus the time to fill the pipe (each other stage once per microbatch)."""
    if unit.share == 0:
        return 0.0
    if unit.kind == "replica":
        return unit.share * unit.seconds_per_sample
    stage_times = [s.seconds_per_sample for s in unit.stages]
    fill = (sum(stage_times) - max(stage_times)) * min(microbatch, unit.share)
    return unit.share * unit.seconds_per_sample + fill
