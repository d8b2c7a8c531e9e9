"""Federated training (FedSpine) over real devices: the coordinator.

Each device trains on its own data, which never leaves it (`hearth worker --data PATH`); only
LoRA factors, keep-masks, importance and a few numbers cross the links. The round logic is
training/fedspine.py's `FedSpineServer` unchanged; this module drives it with real devices:

1. Open: every device gets the job (`fed.open`); one that lacks the base model is sent its files
   (one GGUF file or the files of a model folder) through the mesh's chunked, SHA-256-checked file
   transfer, as pooled training does. A device without local data cannot take part.
2. Rounds: the server plans each device's (pruning ratio, LoRA rank): from every report it learns
   the device's compute and link rates (`round_cost` is the work and bytes of a round of this
   model), the round lasts what the slowest device needs at the schedule's pruning and the lowest
   rank, and each device plays what one quality bandit shared by all (rewarded by the global
   model's loss) picks among the options it finishes within that time, as the simulator's FedSpine
   does (docs/federated.md): a fast laptop trains a larger rank in the time a phone needs for a
   small one. The device is sent the whole global LoRA state, the first `rank` slots to train (in
   float32) and the rest frozen (in int8), and the consensus keep-mask at its ratio (made
   realisable: the same number of query heads from every KV group), prunes its copy of the base
   model physically, trains LoRA on its local data for the round's steps gathering LoRA-gradient
   importance, and answers its trained slots (`fed.round`). The round closes at its deadline or
   when a quorum of its devices answered; the server aggregates (heterogeneous ranks,
   masked), credits the bandit, and the job is checkpointed (atomically) before the next round.
   (A job checkpointed before 2026-12-05 resumes with the per-device bandits it started with.)
3. End: the consensus mask at the target sparsity (training/pruning.plan_pruning on the
   accumulated importance) cuts the base model, with the family LoRA merged into its weights,
   into an ordinary smaller Llama written to the model store (format "hf"), so `hearth chat` and
   `hearth export --gguf` take it like any pruned model.

Faults: a device whose request fails (killed, unplugged, asleep: the transport closes a
connection after three silent heartbeats) is dropped from that round, which is aggregated from
the others; at the start of each later round `rejoin` may reach it again, and it is re-opened and
offered that round. A device still busy with a round that closed without it (deadline, quorum)
skips rounds until it is free. A restarted coordinator continues with `resume=True` from the last
completed round.

Peers are anything with `request(type, fields, tensors, data, timeout) -> reply` and
`send_file(path, name)`, e.g. mesh.client.PeerClient; this module opens no socket itself.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from core.errors import HearthError
from core.paths import hearth_paths
from training.aggregation import LoraFactors
from training.bandit import BanditConfig
from training.fed_parts import (
    CLOSE, LORA_SCALE, OPEN, ROUND, FedJobs, FedSpec, ModelFile, RoundOrder, RoundReport, model_files,
    module_shapes, unit_layout,
)
from training.fedspine import (
    FROZEN_SCALE_BYTES, FROZEN_VALUE_BYTES, DeviceReport, FedSpineConfig, FedSpineServer, Importance, KeepMask,
    RoundCost, RoundPlan,
)
from training.job import ProgressEvent, one_run_at_a_time
from training.local_peer import LocalPeer, MemberLost, close_job_on
from training.part_fields import LocalData

STATE_FILE = "federated.json"
SERVER_DIR = "server"
NO_DEADLINE_TIMEOUT_S = 3600.0     # one device's round, when the job sets no deadline


@dataclass
class FedDevice:
    """A device for the job: a paired peer, or `peer=None` for this device (with `local` data)."""

    name: str
    peer: Any = None


@dataclass
class DeviceRound:
    """One device's figures in a round (the progress events)."""

    name: str
    state: str                     # accepted, late, missing, gone, busy, idle
    ratio: float | None = None
    rank: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    seconds: float | None = None


@dataclass
class RoundSummary:
    round: int                     # 0-based
    sparsity: float                # mean ratio over the devices that were sent the round
    accepted: list[str]
    late: list[str]
    missing: list[str]
    mean_loss_before: float | None
    mean_loss_after: float | None
    seconds: float


@dataclass
class FedEvent(ProgressEvent):
    devices: list[DeviceRound] = field(default_factory=list)
    sparsity: float | None = None
    accepted: list[str] | None = None
    missing: list[str] | None = None


@dataclass
class FedResult:
    spec: FedSpec
    rounds: list[RoundSummary]
    wall_s: float
    output: Path | None = None
    lost: list[str] = field(default_factory=list)
    rejoined: list[str] = field(default_factory=list)
    resumed_from: int = 0
    head_ratio: float = 0.0
    channel_ratio: float = 0.0
    parameters_before: int = 0
    parameters_after: int = 0
    model: Any = None              # the family model (pruned, LoRA merged), when not saved

    @property
    def final_loss(self) -> float | None:
        for summary in reversed(self.rounds):
            if summary.mean_loss_after is not None:
                return summary.mean_loss_after
        return None

    @property
    def steps(self) -> int:
        return len(self.rounds)


def fedspine_config(spec: FedSpec) -> FedSpineConfig:
    """Warmup (LoRA only, importance gathered over every unit) on the first quarter of the rounds
    (at most 2), then the cubic ramp reaches the target on the last round."""
    warmup = min(2, spec.rounds // 4)
    return FedSpineConfig(
        target_sparsity=spec.target_sparsity, warmup_rounds=warmup, ramp_rounds=max(1, spec.rounds - warmup),
        quorum=spec.quorum, deadline_s=math.inf if spec.deadline_s is None else spec.deadline_s,
        # A device may prune somewhat beyond the schedule to finish sooner (the bandit's choice).
        bandit=BanditConfig(ratio_max=min(0.6, spec.target_sparsity + 0.2) if spec.target_sparsity > 0 else 0.0),
    )


def round_cost(config: Any, shapes: dict[str, tuple[int, int]], sent_rank: int) -> RoundCost:
    """A round of this model as the planner's time model. Work is counted in weights a token passes
    through (the rate learnt from each report absorbs tokens per round and operations per weight):
    q and o projections shrink with the kept heads, the MLP with the kept channels; k, v and the LM
    head do not (the realisable mask keeps every KV group). Bytes, all in unpruned coordinates (so
    not shrunk by pruning): the `sent_rank` slots of the global state down, the trained ones in
    float32 and the frozen rest in int8 with a scale per slot, and the trained slots back in
    float32; the masks down, the importance up and every slot as a frozen one are the fixed part."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    units = layers * (config.num_attention_heads + config.intermediate_size)
    values = sum(i + o for i, o in shapes.values())                  # of one slot
    frozen = FROZEN_VALUE_BYTES * values + 2 * FROZEN_SCALE_BYTES * len(shapes)   # one slot's bytes, frozen
    return RoundCost(
        fixed_work=layers * 2 * hidden * kv_width + config.vocab_size * hidden,
        head_work=layers * 2 * hidden * q_width,
        channel_work=layers * 3 * hidden * config.intermediate_size,
        # bool masks down, float32 importance up, and every slot at the frozen width down
        fixed_bytes=units * (1 + 4) + sent_rank * frozen,
        rank_bytes=(4 + 4) * values - frozen,             # a trained slot: float32 down instead of frozen, float32 up
    )


def initial_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, LoraFactors]:
    """A random, B zero: the adapted model starts exactly at the base model, on every device."""
    generator = torch.Generator().manual_seed(seed)
    return {name: LoraFactors(torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f), torch.zeros(out_f, rank))
            for name, (in_f, out_f) in shapes.items()}


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` highest scores of a 1-d tensor (ties: lower index first)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.argsort(-scores, stable=True)[:keep]] = True
    return mask


def realisable_mask(importance: tuple[torch.Tensor, torch.Tensor], ratio: float, kv_groups: int) -> KeepMask:
    """The consensus mask at `ratio`, with the same number of query heads kept in every KV group
    of every layer (what a physically pruned Llama needs) and the same channel count per layer."""
    from training.fedspine import keep_count
    from training.pruning import _closest_count

    heads, channels = importance
    layers, total = heads.shape
    per_group = total // kv_groups
    keep_per_group = per_group - _closest_count(per_group, ratio, keep_at_least=1)
    keep_heads = torch.zeros_like(heads, dtype=torch.bool)
    for layer in range(layers):
        for g in range(kv_groups):
            span = slice(g * per_group, (g + 1) * per_group)
            keep_heads[layer, span] = _top(heads[layer, span], keep_per_group)
    kept_channels = keep_count(channels.shape[1], ratio, 1)
    keep_channels = torch.stack([_top(row, kept_channels) for row in channels])
    return KeepMask(keep_heads, keep_channels)


@dataclass
class _Member:
    name: str
    peer: Any
    local: bool
    state: str = "ready"                  # ready, gone
    examples: int = 0
    busy: Future | None = None            # a round still running after its round closed


@one_run_at_a_time
def train_federated(spec: FedSpec, devices: list[FedDevice], *, local: LocalData | None = None,
                    resume: bool = False, on_event: Callable[[ProgressEvent], None] | None = None,
                    rejoin: Callable[[str], Any] | None = None, base: tuple[Any, Any] | None = None,
                    save: bool = True) -> FedResult:
    """Run (or resume) `spec` over `devices`. `local`: this device's own data when a device with
    `peer=None` is in the list; `base`: the loaded (model, tokenizer) of `spec.model`, to share."""
    from training.model_store import ensure_local, load_torch, resolve

    emit = on_event or (lambda event: None)
    spec.validate()
    if not devices:
        raise HearthError("federated training: no devices")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise HearthError(f"federated training: device names must be unique (got {names})")
    job_dir = hearth_paths().jobs_dir / spec.name
    server, history = _load_state(job_dir, spec) if resume else (None, [])
    if not resume:
        shutil.rmtree(job_dir, ignore_errors=True)
    ref = resolve(spec.model)
    if ref.personal is not None and ref.personal.needs_base:
        raise HearthError(f"model {spec.model} is already personalised: train from its base ({ref.personal.base})")
    if ref.personal is not None:
        # The devices prune in the rounds, from the consensus of every unit's importance.
        raise HearthError(f"model {spec.model}: a federated job prunes the model itself (--sparsity); "
                          f"start it from an unpruned base ({ref.personal.base})")
    ref = ensure_local(ref)
    assert ref.path is not None
    files = model_files(ref.path)
    emit(ProgressEvent("load", message=f"loading {spec.model}"))
    model, tokenizer = base if base is not None else load_torch(ref)
    layout = unit_layout(model.config)
    if server is None:
        config = fedspine_config(spec)
        shapes = module_shapes(model)
        server = FedSpineServer(config, layout, initial_lora(shapes, config.bandit.rank_max, spec.seed),
                                seed=spec.seed, cost=round_cost(model.config, shapes, config.bandit.rank_max))
    resumed_from = server.round
    members = []
    for d in devices:
        if d.peer is None:
            if local is None or not local.paths:
                raise HearthError("federated training: this device takes part only with local data (--data)")
            members.append(_Member(d.name, LocalPeer(FedJobs(local, local_model=(model, tokenizer))), True))
        else:
            members.append(_Member(d.name, d.peer, False))
    job = _FederatedJob(spec, server, members, files, int(model.config.num_key_value_heads), emit, rejoin)
    started = time.perf_counter()
    try:
        job.open_all()
        rounds = [RoundSummary(**h) for h in history[:server.round]]
        while server.round < spec.rounds:
            summary, event = job.run_round()
            rounds.append(summary)
            _save_state(job_dir, spec, server, rounds)
            emit(event)          # after the checkpoint: a round reported is a round kept
    finally:
        job.close()
    result = FedResult(spec, rounds, time.perf_counter() - started, lost=job.lost, rejoined=job.rejoined,
                       resumed_from=resumed_from)
    emit(ProgressEvent("save", message=f"pruning and merging the family model {spec.name}"))
    family, plan = family_model(model, server, spec)
    result.head_ratio, result.channel_ratio = plan.head_ratio, plan.channel_ratio
    result.parameters_before = sum(p.numel() for p in model.parameters())
    result.parameters_after = sum(p.numel() for p in family.parameters())
    if save:
        result.output = _save_model(family, tokenizer, spec, result, [m.name for m in members])
        shutil.rmtree(job_dir, ignore_errors=True)
    else:
        result.model = family
    emit(FedEvent("done", len(rounds), spec.rounds, len(rounds), result.final_loss,
                  message=str(result.output or ""), sparsity=round((plan.head_ratio + plan.channel_ratio) / 2, 4)))
    return result


# --- checkpoints ------------------------------------------------------------------------------

def _load_state(job_dir: Path, spec: FedSpec) -> tuple[FedSpineServer | None, list[dict]]:
    state_path = job_dir / STATE_FILE
    if not state_path.is_file() or not (job_dir / SERVER_DIR).is_dir():
        return None, []
    try:
        state = json.loads(state_path.read_text("utf-8"))
        saved = FedSpec(**state["spec"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise HearthError(f"{state_path}: unreadable federated checkpoint ({exc}); start again without --resume") from None
    if saved != spec:
        raise HearthError(f"{job_dir}: the interrupted job was started with other settings; "
                          "run again without --resume to start over")
    return FedSpineServer.load(job_dir / SERVER_DIR), list(state.get("rounds", []))


def _save_state(job_dir: Path, spec: FedSpec, server: FedSpineServer, rounds: list[RoundSummary]) -> None:
    """The server (one atomic directory) first, then the JSON: after a crash between the two the
    JSON's history is one round short, and `_load_state` trusts the server's round."""
    from core.atomic import atomic_write_text

    server.save(job_dir / SERVER_DIR)
    atomic_write_text(job_dir / STATE_FILE, json.dumps({"spec": asdict(spec), "rounds": [asdict(r) for r in rounds]}))


# --- the family model -------------------------------------------------------------------------

def family_model(model: Any, server: FedSpineServer, spec: FedSpec) -> tuple[Any, Any]:
    """A copy of the base model with the family LoRA merged in, cut by the consensus mask at the
    target sparsity (physically: smaller matrices). Returns (model, pruning.PrunePlan)."""
    import copy

    from training.pruning import CHANNEL_ALIGN, UnitScores, _layers, apply_pruning, plan_pruning

    family = copy.deepcopy(model)
    layers = _layers(family)
    with torch.no_grad():
        for name, factors in server.lora.items():
            index, proj = name.split(".", 1)
            layer = layers[int(index)]
            parent = layer.self_attn if proj in ("q_proj", "o_proj") else layer.mlp
            weight = getattr(parent, proj).weight
            weight += (LORA_SCALE * (factors.b.float() @ factors.a.float())).to(weight.dtype)
    width = int(family.config.intermediate_size)
    # llama.cpp quantises rows in blocks of 32; a model too narrow for that keeps any width.
    align = CHANNEL_ALIGN if width % CHANNEL_ALIGN == 0 and width >= 4 * CHANNEL_ALIGN else 1
    heads, channels = server.importance
    plan = plan_pruning(family, UnitScores(heads.clone(), channels.clone(), "lora-gradient"),
                        spec.target_sparsity, "query", align)
    apply_pruning(family, plan)
    family.eval()
    return family, plan


def _save_model(family: Any, tokenizer: Any, spec: FedSpec, result: FedResult, devices: list[str]) -> Path:
    from core.atomic import atomic_dir, atomic_write_text
    from training.model_store import MANIFEST, PersonalModel
    from training.pruning import write_hf_folder

    target = hearth_paths().models_dir / spec.name
    manifest = PersonalModel(
        name=spec.name, base=spec.model, method="federated", format="hf",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pruning_ratio=spec.target_sparsity, parameters=result.parameters_after,
        details={"rounds": len(result.rounds), "devices": devices, "final_loss": result.final_loss,
                 "head_ratio": round(result.head_ratio, 4), "channel_ratio": round(result.channel_ratio, 4),
                 "parameters_removed": round(1 - result.parameters_after / max(1, result.parameters_before), 4),
                 "attention_heads": family.config.num_attention_heads,
                 "intermediate_size": family.config.intermediate_size,
                 "importance": "lora-gradient", "spec": asdict(spec)},
    )
    with atomic_dir(target) as tmp:
        write_hf_folder(family, tokenizer, tmp)
        atomic_write_text(tmp / MANIFEST, manifest.to_json() + "\n")
    return target


# --- the rounds -------------------------------------------------------------------------------

class _FederatedJob:
    def __init__(self, spec: FedSpec, server: FedSpineServer, members: list[_Member], files: list[ModelFile],
                 kv_groups: int, emit: Callable[[ProgressEvent], None], rejoin: Callable[[str], Any] | None):
        self.spec, self.server, self.members, self.files = spec, server, members, files
        self.kv_groups, self.emit, self.rejoin = kv_groups, emit, rejoin
        self.job_id = f"{spec.name}-{uuid.uuid4().hex[:12]}"
        self.lost: list[str] = []
        self.rejoined: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(members)), thread_name_prefix="federated")
        self._lock = threading.Lock()

    # --- talking to devices ---

    def _call(self, member: _Member, type: str, fields: dict, tensors: dict | None = None, timeout: float = 300.0) -> Any:
        try:
            return member.peer.request(type, fields, tensors, None, timeout)
        except Exception as exc:  # a peer's failure of any kind ends its part in this round
            if member.local:
                raise
            raise MemberLost(member, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None

    def _gone(self, member: _Member, reason: str) -> None:
        with self._lock:
            if member.state == "gone":
                return
            member.state = "gone"
            self.lost.append(member.name)
        self.emit(ProgressEvent("devices", message=f"{member.name} left the job ({reason})"))

    def _open(self, member: _Member) -> None:
        fields = {"job": self.job_id, "spec": self.spec.to_json(), "files": [f.to_field() for f in self.files]}
        reply = self._call(member, OPEN, fields, timeout=600)
        missing = reply.fields.get("need_files")
        if missing:
            by_name = {f.name: f for f in self.files}
            self.emit(ProgressEvent("load", message=f"sending the base model to {member.name}"))
            for name in missing:
                if name not in by_name:
                    raise MemberLost(member, f"it asked for a file that is not part of the model ({str(name)[:60]})")
                try:
                    member.peer.send_file(by_name[name].path, name)
                except Exception as exc:
                    raise MemberLost(member, f"model transfer failed: {exc}") from None
            reply = self._call(member, OPEN, fields, timeout=600)
            if reply.fields.get("need_files"):
                raise MemberLost(member, "it did not keep the base model it was sent")
        member.examples = int(reply.fields.get("examples", 0))

    def open_all(self) -> None:
        futures = [(m, self.pool.submit(self._open, m)) for m in self.members]
        for member, future in futures:
            try:
                future.result()
            except MemberLost as lost:
                self._gone(lost.member, lost.reason)
        opened = [m for m in self.members if m.state == "ready"]
        if not opened:
            raise HearthError(f"federated training: no device could open the job ({', '.join(self.lost)})")
        self.emit(ProgressEvent("devices", message="training on " + ", ".join(
            f"{m.name} ({m.examples} local examples)" for m in opened)))

    def _take_back(self) -> None:
        """Before a round: a device that left and can be reached again is opened again."""
        if self.rejoin is None:
            return
        for member in [m for m in self.members if m.state == "gone" and not m.local]:
            try:
                peer = self.rejoin(member.name)
            except Exception:
                peer = None
            if peer is None:
                continue
            member.peer, member.busy = peer, None
            try:
                self._open(member)
            except MemberLost as lost:
                self.emit(ProgressEvent("devices", message=f"{member.name} could not rejoin ({lost.reason})"))
                continue
            member.state = "ready"
            self.rejoined.append(member.name)
            self.emit(ProgressEvent("devices", message=f"{member.name} rejoined the job"))

    # --- one round ---

    def _order(self, plan: RoundPlan) -> RoundOrder:
        keep = realisable_mask(self.server.importance, plan.ratio, self.kv_groups)
        plan.keep = keep
        return RoundOrder(plan.round, plan.ratio, plan.rank, self.spec.local_steps, keep.heads, keep.channels,
                          {name: (f.a, f.b) for name, f in plan.lora.items()})

    def _device_round(self, member: _Member, plan: RoundPlan, order: RoundOrder, opened_at: float) -> DeviceReport:
        fields, tensors = order.to_request(self.job_id)
        timeout = NO_DEADLINE_TIMEOUT_S if self.spec.deadline_s is None else 2 * self.spec.deadline_s + 60
        reply = self._call(member, ROUND, fields, tensors, timeout=timeout)
        arrived = time.monotonic()
        try:
            report = RoundReport.from_reply(reply.fields, reply.tensors)
            self._check(report, plan, order)
        except ValueError as exc:
            raise MemberLost(member, f"bad round report ({str(exc)[:160]})") from None
        compute = report.prune_s + report.train_s
        return DeviceReport(
            round=report.round, device=member.name,
            lora={name: LoraFactors(a, b) for name, (a, b) in report.lora.items()},
            keep=KeepMask(report.keep_heads, report.keep_channels), dense={}, samples=report.samples,
            loss_before=report.loss_before, loss_after=report.loss_after,
            importance=Importance(report.importance_heads, report.importance_channels,
                                  report.keep_heads, report.keep_channels),
            compute_s=compute, transfer_s=max(0.0, arrived - opened_at - compute), finished_at_s=arrived,
        )

    def _check(self, report: RoundReport, plan: RoundPlan, order: RoundOrder) -> None:
        """A report the aggregation can use: the round asked for, the mask sent, fitting factors."""
        if report.round != plan.round:
            raise ValueError(f"it answered round {report.round}, not {plan.round}")
        if not (torch.equal(report.keep_heads, order.keep_heads) and torch.equal(report.keep_channels, order.keep_channels)):
            raise ValueError("it applied another keep mask")
        if set(report.lora) != set(plan.lora):
            raise ValueError("its LoRA modules differ")
        for name, (a, b) in report.lora.items():
            sent = plan.lora[name]
            if a.shape[1] != sent.a.shape[1] or b.shape[0] != sent.b.shape[0] or a.shape[0] > plan.rank:
                raise ValueError(f"LoRA factors of {name} have the wrong shape")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"LoRA factors of {name} are not finite")
        for t, shape in ((report.importance_heads, order.keep_heads.shape),
                         (report.importance_channels, order.keep_channels.shape)):
            if t.shape != shape or not torch.isfinite(t).all():
                raise ValueError("importance has the wrong shape or is not finite")

    def run_round(self) -> tuple[RoundSummary, FedEvent]:
        server, spec = self.server, self.spec
        self._take_back()
        for m in self.members:
            if m.busy is not None and m.busy.done():
                m.busy = None
        ready = [m for m in self.members if m.state == "ready" and m.busy is None]
        if not ready:
            busy = [m.name for m in self.members if m.state == "ready"]
            if busy:   # every live device is still in a round that closed without it: wait for one
                wait([m.busy for m in self.members if m.busy is not None], return_when=FIRST_COMPLETED)
                return self.run_round()
            raise HearthError(f"federated training: every device left the job ({', '.join(self.lost)})")
        plans = server.plan_round([m.name for m in ready])
        by_name = {m.name: m for m in ready}
        opened_at = time.monotonic()
        futures: dict[Future, _Member] = {}
        orders = {}
        for plan in plans:
            member = by_name[plan.device]
            orders[plan.device] = self._order(plan)
            future = self.pool.submit(self._device_round, member, plan, orders[plan.device], opened_at)
            member.busy = future
            futures[future] = member
        quorum = max(1, math.ceil(spec.quorum * len(plans)))
        deadline = math.inf if spec.deadline_s is None else opened_at + spec.deadline_s
        reports: list[DeviceReport] = []
        pending = set(futures)
        while pending and len(reports) < quorum:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = wait(pending, timeout=None if math.isinf(left) else left, return_when=FIRST_COMPLETED)
            for future in done:
                member = futures[future]
                member.busy = None
                try:
                    reports.append(future.result())
                except MemberLost as lost:
                    self._gone(lost.member, lost.reason)
        outcome = server.aggregate_round(reports, opened_at)
        seconds = time.monotonic() - opened_at
        figures = []
        accepted = {r.device: r for r in reports if r.device in outcome.accepted}
        for m in self.members:
            plan = next((p for p in plans if p.device == m.name), None)
            if plan is None:
                figures.append(DeviceRound(m.name, "gone" if m.state == "gone" else ("busy" if m.busy else "idle")))
                continue
            r = accepted.get(m.name)
            state = "accepted" if r else ("late" if m.name in outcome.late else ("gone" if m.state == "gone" else "missing"))
            figures.append(DeviceRound(m.name, state, round(plan.ratio, 4), plan.rank,
                                       r.loss_before if r else None, r.loss_after if r else None,
                                       round(r.finished_at_s - opened_at, 3) if r else None))
        used = list(accepted.values())
        summary = RoundSummary(
            round=outcome.round, sparsity=round(sum(p.ratio for p in plans) / len(plans), 4),
            accepted=outcome.accepted, late=outcome.late, missing=outcome.missing,
            mean_loss_before=sum(r.loss_before for r in used) / len(used) if used else None,
            mean_loss_after=sum(r.loss_after for r in used) / len(used) if used else None,
            seconds=round(seconds, 3),
        )
        event = FedEvent("train", outcome.round + 1, spec.rounds, outcome.round + 1, summary.mean_loss_after,
                         message=f"round {outcome.round + 1}/{spec.rounds}: aggregated from "
                                 f"{', '.join(outcome.accepted) or 'no device'}",
                         devices=figures, sparsity=summary.sparsity, accepted=list(outcome.accepted),
                         missing=list(outcome.missing))
        return summary, event

    def close(self) -> None:
        close_job_on(self.members, CLOSE, self.job_id)
        self.pool.shutdown(wait=False, cancel_futures=True)
