"""Pooled training (PAC, ALGORITHMS.md section 4): one PAC job across this device and paired ones.

The coordinator (this module) keeps the only copy of the side chain and its optimiser. It
1. opens the job on every device (a device that lacks the base model is sent the GGUF first),
   measures each one (`pac.profile`: forward and adapter seconds per sample, memory; a timed
   payload for the link) and asks the planner (training/planner.py) for a plan, which the caller
   shows before anything else happens (devices, shares, predicted step time, who gets the data);
2. gives each device the samples it owns (token ids; each sample placed by its estimated cost,
   `assign_owners`, so a device's work follows its measured speed; a device with no share
   receives nothing), and nothing else of the job's data;
3. runs the global steps of `job.batch_plan` in order. In epoch 1 a step first hands its
   backbone passes out in pieces to whichever device is free (`pac.fill`, `_fill`), and a
   sample belongs to the device that cached it; after epoch 1 a few samples' cache entries move
   from the devices that were slower at their adapter steps to the faster (`rebalance`). Each
   step sends every device its owned samples of the batch; the device answers loss and
   gradients (`job.pac_gradients`) computed with its replica of the side chain, running the
   backbone only for samples it has not cached yet, so epoch 1 fills each device's activation
   cache and epochs 2.. are adapter-only data parallelism. The gradients are averaged weighted
   by target tokens (the loss is a mean over tokens, so this is exactly the full batch's
   gradient), added in a fixed order (this device first; the anchor's pull, training/anchor.py,
   computed here, last), and applied once here
   (`job.apply_gradients`). Each device is sent the sum (`pac.apply`)
   and takes the same optimiser step, so its replica stays equal to this side chain bit for bit;
   the device whose part is the last still on its way is instead sent the others' contributions
   at once (the running total of the devices before it and each later one) and rebuilds the same
   sum itself, so its upload and that download overlap (worker_parts.py says why). A device whose
   replica is not at the step (the first step, a resume, a rejoin) is sent the whole state with
   its part.

Hybrid parallelism: devices that hold the backbone are data-parallel replicas. Devices that
cannot form the planner's pipelines: in epoch 1 the coordinator passes each pipeline's samples
stage to stage (`pac.stage`: token ids into the first stage, activations and the taps so far
onwards, relayed through the coordinator), and the last stage caches them; from then on that
device trains from its cache like any replica. A pipeline that loses a stage hands its samples
to the replicas.

Faults: a device whose request fails (killed, unplugged, asleep: the transport closes a
connection after three silent heartbeats) is marked gone; its samples go to the others (their
token ids are sent then), and the same step is computed again. A step is applied only once all
its parts arrived, so none is lost or applied twice. A gone device is offered its samples back at
the next epoch if `rejoin` can reach it. Checkpoints are the single-device trainer's, so a
restarted coordinator resumes with `resume=True` (`hearth train --devices ... --resume`).

Peers are anything with `request(type, fields, tensors, data, timeout) -> reply` (reply.fields,
reply.tensors) and `send_file(path, name) -> str`: mesh.client.PeerClient is one. This module
opens no socket itself.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.digest import file_sha256
from core.errors import HearthError
from core.paths import hearth_paths
from training.job import (
    Checkpoint, JobSpec, ProgressEvent, apply_gradients, batch_plan, fold, load_checkpoint, one_run_at_a_time,
    save_checkpoint, scheduled_lr, steps_per_epoch, weighted, weights_digest,
)
from training.local_peer import LocalPeer, MemberLost, close_job_on
from training.planner import DeviceProfile, ModelSpec, Plan, make_plan
from training.worker_parts import (
    APPLY, CACHE_IN, CACHE_OUT, CLOSE, FILL, OPEN, PROFILE, SAMPLES, SINK, STAGE, STEP, PartProfile, StepResult,
    WorkerJobs, pack_examples, state_to_tensors,
)

LINK_PROBE_BYTES = 1 << 20
LOCAL_BANDWIDTH = 1e12        # this device's own share crosses no link


class Peer(Protocol):
    def request(self, type: str, fields: dict | None = None, tensors: dict | None = None,
                data: bytes | None = None, timeout: float = 30.0) -> Any: ...

    def send_file(self, path: Path, name: str | None = None) -> str: ...


@dataclass
class JobDevice:
    """A device for the job: a paired peer, or `peer=None` for this device itself."""

    name: str
    peer: Peer | None = None


@dataclass
class DeviceFigures:
    """Per-device figures of a progress event (the app's train screen)."""

    name: str
    state: str                  # "training", "idle" (no share), "gone"
    share: int                  # samples of the last step
    samples_per_s: float | None
    owned: int                  # samples whose token ids (and cache) this device holds
    busy_s: float = 0.0         # seconds its parts took so far, from request to answer


@dataclass
class PooledEvent(ProgressEvent):
    devices: list[DeviceFigures] = field(default_factory=list)
    # On the "done" event only: measured seconds per step and payload bytes per step by epoch,
    # and the plan's predicted seconds per step (epoch 1, later epochs).
    epoch_step_s: list[float] | None = None
    bytes_per_step: list[float] | None = None
    predicted_step_s: list[float] | None = None


@dataclass
class PooledResult:
    result: Any                                  # training.trainer.TrainResult
    plan: Plan
    epoch_step_s: list[float]                    # measured mean step time of each epoch
    bytes_per_step: list[float]                  # mean payload bytes sent + received per step, by epoch
    lost: list[str] = field(default_factory=list)
    rejoined: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)   # devices that were sent the job's data
    resynced: list[str] = field(default_factory=list)    # devices whose replica differed and was resent

    def prediction_error(self) -> dict[str, float]:
        """|predicted - measured| / measured for epoch 1 and for the later epochs."""
        out = {}
        if self.epoch_step_s:
            out["epoch1"] = abs(self.plan.epoch1_step_s - self.epoch_step_s[0]) / self.epoch_step_s[0]
        if len(self.epoch_step_s) > 1:
            later = sum(self.epoch_step_s[1:]) / len(self.epoch_step_s[1:])
            out["later"] = abs(self.plan.later_step_s - later) / later
        return out


@dataclass
class _Member:
    name: str
    peer: Any
    local: bool
    state: str = "training"
    speed: float = 1.0                    # samples per second in epoch 1 (from the plan)
    sent: set[int] = field(default_factory=set)       # samples whose token ids it holds
    first_owned: set[int] = field(default_factory=set)
    last_share: int = 0
    in_pipeline: bool = False
    cached: set[int] = field(default_factory=set)     # samples whose activation cache entry it holds
    samples: int = 0
    busy_s: float = 0.0
    version: int | None = None            # steps its side chain replica has applied (None: none)
    adapter_s: float = 0.0                # epoch 1: adapter seconds over `trained` target tokens
    trained: int = 0
    bandwidth: float = LOCAL_BANDWIDTH    # bytes per second to it (the plan's measurement)


def _tensor_bytes(tensors: dict | None) -> int:
    return sum(t.numel() * t.element_size() for t in (tensors or {}).values())


def assign_owners(costs: list[tuple[float, float]], weights: dict[str, float], later_epochs: int = 0) -> dict[int, str]:
    """Each sample to one device, so that the job's predicted time is shortest.

    `costs[i]`: sample i's seconds in epoch 1 and in each later epoch on a device of weight 1
    (a device of weight w takes 1/w of that). An epoch lasts as long as its busiest device. The
    costliest samples go first, each where it lengthens the job least (then where its device's
    load stays lowest, then by name). Samples differ: a long answer costs several short ones."""
    names = sorted(name for name, w in weights.items() if w > 0)
    if not names:
        raise HearthError("pooled training: no device can take a share of the samples")
    first, later = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)

    def job_s(to: str, cost: tuple[float, float]) -> float:
        epoch1 = max((first[n] + (cost[0] if n == to else 0.0)) / weights[n] for n in names)
        rest = max((later[n] + (cost[1] if n == to else 0.0)) / weights[n] for n in names)
        return epoch1 + later_epochs * rest

    owners = {}
    for i in sorted(range(len(costs)), key=lambda i: (-(costs[i][0] + later_epochs * costs[i][1]), i)):
        cost = costs[i]
        name = min(names, key=lambda n: (job_s(n, cost), (first[n] + cost[0]) / weights[n], n))
        owners[i] = name
        first[name] += cost[0]
        later[name] += cost[1]
    return dict(sorted(owners.items()))


def rebalance(tokens: dict[int, int], owners: dict[int, str], rates: dict[str, float], epochs: int,
              move_s: Callable[[int, str, str], float]) -> dict[int, str]:
    """New owners for some samples, so the later epochs' adapter work ends at the same time.

    `tokens[i]`: sample i's trained tokens; `owners[i]`: the device caching it; `rates[name]`: a
    device's measured adapter seconds per trained token; `epochs`: how many epochs the placement
    serves; `move_s(i, src, dst)`: seconds to carry i's cache entry over. One sample at a time
    leaves the busiest device for the one where it shortens the epoch most, while what the
    `epochs` gain is more than the move costs, and by at least half a percent (the rates are
    measurements: a smaller gain is noise). Returns {sample: new owner} for the moved ones."""
    names = sorted(rates)
    owned: dict[str, dict[int, list[int]]] = {n: {} for n in names}   # device -> token count -> samples
    loads = dict.fromkeys(names, 0.0)
    for i, name in owners.items():
        if name in rates:
            owned[name].setdefault(tokens[i], []).append(i)
            loads[name] += rates[name] * tokens[i]
    moved: dict[int, str] = {}
    for _ in range(len(owners)):
        src = max(names, key=lambda n: (loads[n], n))
        now = loads[src]
        best: tuple[float, float, int, str] | None = None
        for dst in names:
            if dst == src:
                continue
            others = max([loads[n] for n in names if n not in (src, dst)], default=0.0)
            for count, samples in owned[src].items():
                i = min(samples)
                after = max(loads[src] - rates[src] * count, loads[dst] + rates[dst] * count, others)
                gain = (now - after) * epochs - move_s(i, src, dst)
                if now - after >= 0.005 * now and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, after, i, dst)
        if best is None:
            break
        _, _, i, dst = best
        count = tokens[i]
        owned[src][count].remove(i)
        if not owned[src][count]:
            del owned[src][count]
        owned[dst].setdefault(count, []).append(i)
        loads[src] -= rates[src] * count
        loads[dst] += rates[dst] * count
        moved[i] = dst
    return {i: dst for i, dst in moved.items() if dst != owners[i]}


def model_spec_for(backbone: Any, chain_parameters: int, tokens: int, taps: int) -> ModelSpec:
    """The planner's view of the loaded backbone: its real parameter bytes per layer."""
    from training.parallel_adapters import decoder_layers

    model = backbone.model
    layer_bytes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = int(model.config.hidden_size)
    return ModelSpec(
        layer_bytes=layer_bytes,
        activation_bytes=tokens * hidden * 4 * (1 + taps),
        embedding_bytes=total - sum(layer_bytes),
        adapter_bytes=chain_parameters * 4,
        working_bytes=64 << 20,
        layer_flops=[1.0] * len(layer_bytes),
    )


@one_run_at_a_time
def train_pooled(spec: JobSpec, devices: list[JobDevice], *, resume: bool = False,
                 on_event: Callable[[ProgressEvent], None] | None = None,
                 on_plan: Callable[[Plan], bool | None] | None = None,
                 rejoin: Callable[[str], Peer | None] | None = None,
                 backbone: Any = None, save: bool = True, checkpoint_every_s: float = 30.0,
                 step_timeout_s: float = 600.0) -> PooledResult:
    """Run (or resume) `spec` across `devices`; `on_plan` sees the plan first (False cancels)."""
    from training.data import read_sources, tokenize
    from training.model_store import resolve
    from training.trainer import _Run, load_backbone

    emit = on_event or (lambda event: None)
    if spec.method != "pac" or not spec.cache:
        raise HearthError("pooled training runs PAC jobs with the activation cache (--method pac, no --no-cache)")
    if not devices:
        raise HearthError("pooled training: no devices")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise HearthError(f"pooled training: device names must be unique (got {names})")
    job_dir = hearth_paths().jobs_dir / spec.name
    checkpoint = load_checkpoint(job_dir) if resume else None
    if checkpoint is not None and checkpoint.spec != spec:
        raise HearthError(f"{job_dir}: the interrupted job was started with other settings; "
                          "run again without --resume to start over")
    if not resume:
        shutil.rmtree(job_dir, ignore_errors=True)
    ref = resolve(spec.model)
    if ref.path is None or not ref.path.is_file():
        raise HearthError(f"model {spec.model}: pooled training sends the base model as one GGUF file; "
                          "this one is not a single file here")
    conversations = read_sources(spec.data)
    emit(ProgressEvent("load", message=f"loading {spec.model}"))
    if backbone is None:
        backbone = load_backbone(spec.model, spec.quant)
    examples = tokenize(conversations, backbone.tokenizer, spec.max_length)
    run = _Run(spec, backbone, examples, job_dir, emit, checkpoint_every_s)
    job = _PooledJob(spec, run, devices, ref.path, emit, step_timeout_s, rejoin)
    try:
        plan = job.prepare()
        if on_plan is not None and on_plan(plan) is False:
            raise HearthError("pooled training cancelled before it started")
        outcome = job.execute(checkpoint)
    finally:
        job.close()
    if save:
        outcome.result.output = run.save_output(outcome.result)
        shutil.rmtree(job_dir, ignore_errors=True)
    emit(PooledEvent("done", outcome.result.steps, outcome.result.steps, spec.epochs, outcome.result.final_loss,
                     message=str(outcome.result.output or ""), devices=job.figures(),
                     epoch_step_s=[round(x, 6) for x in outcome.epoch_step_s],
                     bytes_per_step=[round(x) for x in outcome.bytes_per_step],
                     predicted_step_s=[round(plan.epoch1_step_s, 6), round(plan.later_step_s, 6)]))
    return outcome


# The anchor's term among a step's contributions (a device name never has parentheses).
ANCHOR_TERM = "(anchor)"


class _PooledJob:
    def __init__(self, spec: JobSpec, run: Any, devices: list[JobDevice], model_path: Path,
                 emit: Callable[[ProgressEvent], None], step_timeout_s: float,
                 rejoin: Callable[[str], Peer | None] | None):
        self.spec, self.run, self.model_path, self.emit = spec, run, model_path, emit
        self.step_timeout_s, self.rejoin = step_timeout_s, rejoin
        self.job_id = f"{spec.name}-{uuid.uuid4().hex[:12]}"
        self.members = [
            _Member(d.name, d.peer if d.peer is not None else LocalPeer(WorkerJobs(local_backbone=run.backbone)),
                    d.peer is None)
            for d in devices
        ]
        self.owners: dict[int, str] = {}
        self.sample_costs: list[tuple[float, float]] = []
        self.lost: list[str] = []
        self.rejoined: list[str] = []
        self.resynced: list[str] = []              # devices whose replica was found to differ
        self.bytes = 0                              # tensor payload bytes to and from other devices
        self._bytes_lock = threading.Lock()
        # A step keeps two requests per device in flight (its part, then the others' contributions).
        self.pool = ThreadPoolExecutor(max_workers=2 * len(self.members) + 2, thread_name_prefix="pooled")
        self.attempt = 0
        self.step = 0
        self.lr = spec.learning_rate   # the step's rate, sent to the replicas with its sum
        self.per_epoch = steps_per_epoch(len(run.examples), spec.batch_size)
        self._sha256: str | None = None
        self.plan: Plan | None = None
        self.pipelines: dict[str, Any] = {}        # cache holder -> its planner Unit (kind "pipeline")

    # --- talking to devices --------------------------------------------------------------------

    def _call(self, member: _Member, type: str, fields: dict, tensors: dict | None = None,
              timeout: float = 60.0) -> Any:
        try:
            reply = member.peer.request(type, fields, tensors, None, timeout)
        except Exception as exc:  # a peer's failure of any kind ends its part in the job
            if member.local:
                raise
            raise MemberLost(member, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None
        if not member.local:
            with self._bytes_lock:
                self.bytes += _tensor_bytes(tensors) + _tensor_bytes(reply.tensors)
        return reply

    def _gone(self, member: _Member, reason: str) -> None:
        if member.state == "gone":
            return
        member.state = "gone"
        self.lost.append(member.name)
        self.emit(ProgressEvent("devices", message=f"{member.name} left the job ({reason})"))
        # A pipeline missing a stage cannot fill its cache: its samples go to the replicas.
        for holder, unit in list(self.pipelines.items()):
            if member.name in unit.devices:
                del self.pipelines[holder]
                for m in self.members:
                    if m.name in unit.devices:
                        m.speed = 0.0
                        if m.state != "gone":
                            m.state = "idle"

    def _open(self, member: _Member) -> None:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.model_path)
        fields = {"job": self.job_id, "spec": json.dumps(self.spec.to_dict()), "model_sha256": self._sha256,
                  "model_name": self.model_path.name}
        reply = self._call(member, OPEN, fields, timeout=300)
        if reply.fields.get("need_model"):
            self.emit(ProgressEvent("load", message=f"sending the base model to {member.name}"))
            try:
                member.peer.send_file(self.model_path, self.model_path.name)
            except Exception as exc:
                raise MemberLost(member, f"model transfer failed: {exc}") from None
            reply = self._call(member, OPEN, fields, timeout=300)
            if reply.fields.get("need_model"):
                raise MemberLost(member, "it did not keep the base model it was sent")

    def _profile(self, member: _Member, tokens: int, trained: int) -> PartProfile:
        fields = {"job": self.job_id, "tokens": tokens, "trained": trained}
        return PartProfile.from_fields(self._call(member, PROFILE, fields, timeout=300).fields)

    def _bandwidth(self, member: _Member) -> tuple[float, float]:
        """(bytes per second, one-way latency) to `member`, from a small and a 1 MiB request."""
        if member.local:
            return LOCAL_BANDWIDTH, 0.0
        started = time.perf_counter()
        self._call(member, SINK, {})
        rtt = time.perf_counter() - started
        probe = {"x": torch.zeros(LINK_PROBE_BYTES // 4)}
        started = time.perf_counter()
        self._call(member, SINK, {}, probe)
        elapsed = max(time.perf_counter() - started - rtt, 1e-6)
        return LINK_PROBE_BYTES / elapsed, rtt / 2

    def _send_samples(self, member: _Member, indices: set[int]) -> None:
        todo = sorted(indices - member.sent)
        if not todo:
            return
        examples = {i: self.run.examples[i] for i in todo}
        self._call(member, SAMPLES, {"job": self.job_id}, pack_examples(examples), timeout=120)
        member.sent |= set(todo)

    def _active(self) -> list[_Member]:
        return [m for m in self.members if m.state != "gone"]

    # --- before the first step -----------------------------------------------------------------

    def prepare(self) -> Plan:
        """Open the job everywhere, measure, plan, and hand each device its samples."""
        examples = self.run.examples
        tokens = self._padded_length()
        trained = max(1, round(sum(e.trained_tokens for e in examples) / len(examples)))
        self._each(self._open)
        profiles: dict[str, tuple[PartProfile, float, float]] = {}
        computed: dict[str, PartProfile] = {}

        def compute(member: _Member) -> None:
            computed[member.name] = self._profile(member, tokens, trained)

        # Every device's compute at once, as the job will run them: devices that share a
        # machine (or its memory bandwidth) see that contention, and a machine whose speed
        # drifts is measured at one moment for all. The link one device at a time: the
        # probes would share this device's link.
        self._each(compute)
        for member in self._active():
            try:
                bandwidth, latency = self._bandwidth(member)
                profiles[member.name] = (computed[member.name], bandwidth, latency)
            except MemberLost as lost:
                self._gone(lost.member, lost.reason)
        active = self._active()
        if not active:
            raise HearthError("pooled training: no device could open the job")
        chain_parameters = sum(p.numel() for p in self.run.module.parameters())
        model = model_spec_for(self.run.backbone, chain_parameters, tokens, len(self.run.chain_config.taps))
        own_link = min([profiles[m.name][1] for m in active if not m.local] or [LOCAL_BANDWIDTH])
        planner_devices = []
        for m in active:
            profile, bandwidth, latency = profiles[m.name]
            m.bandwidth = bandwidth
            if m.local:
                bandwidth = own_link      # the coordinator's sends cross its own link
            planner_devices.append(DeviceProfile(
                m.name, [profile.forward_s / model.layers] * model.layers, profile.adapter_s,
                profile.memory_bytes, bandwidth, latency))
        plan = make_plan(planner_devices, model, self.spec.batch_size)
        self.plan = plan
        working = {u.cache_holder: u for u in plan.units if u.share > 0}
        self.pipelines = {holder: u for holder, u in working.items() if u.kind == "pipeline"}
        in_units = {n for u in working.values() for n in u.devices}
        for m in active:
            unit = working.get(m.name)
            m.speed = 1.0 / max(unit.seconds_per_sample, 1e-9) if unit is not None else 0.0
            m.in_pipeline = any(m.name in u.devices for u in self.pipelines.values())
            if m.name not in in_units:
                m.state = "idle"
        self.sample_costs = self._sample_costs(profiles, tokens, trained)
        self.owners = assign_owners(self.sample_costs, {m.name: m.speed for m in active}, self.spec.epochs - 1)
        for m in active:
            m.first_owned = {i for i, name in self.owners.items() if name == m.name}
        by_name = {m.name: m for m in active}
        # A pipeline's first stage reads the token ids too; its later stages see only activations.
        needs = {m.name: set(m.first_owned) for m in active}
        for holder, unit in self.pipelines.items():
            needs[unit.stages[0].device] |= by_name[holder].first_owned
        self._each(lambda m: self._send_samples(m, needs[m.name]), only=[m for m in active if needs[m.name]])
        return plan

    def _sample_costs(self, profiles: dict[str, tuple[PartProfile, float, float]], tokens: int,
                      trained: int) -> list[tuple[float, float]]:
        """Each sample's (epoch 1, later epoch) seconds by this device's measurement (another's if
        it has none): the backbone's per token of the sample, the adapters' per trained token."""
        local = [m.name for m in self.members if m.local and m.name in profiles]
        profile = profiles[(local or sorted(profiles))[0]][0]
        per_token, per_trained = profile.forward_s / tokens, profile.adapter_s / trained
        return [(len(e.input_ids) * per_token + e.trained_tokens * per_trained, e.trained_tokens * per_trained)
                for e in self.run.examples]

    def _padded_length(self) -> int:
        """Tokens per sample a forward really computes: a device's part of an epoch-1 batch (half
        of it, here) goes through the backbone in passes of similar lengths, each padded to its
        longest (`trainer.length_chunks`)."""
        from training.trainer import length_chunks

        examples = self.run.examples
        padded, count = 0, 0
        for batch in batch_plan(len(examples), self.spec.batch_size, self.spec.seed, 0):
            for part in (batch[: (len(batch) + 1) // 2], batch[(len(batch) + 1) // 2:]):
                for chunk in length_chunks(examples, part, self.spec.batch_size):
                    padded += len(chunk) * max(len(examples[i].input_ids) for i in chunk)
                    count += len(chunk)
        return max(2, round(padded / count))

    def _each(self, fn: Callable[[_Member], None], only: list[_Member] | None = None) -> None:
        """Run `fn` on every active member at once; a member that fails is marked gone."""
        members = only if only is not None else self._active()
        futures = [(m, self.pool.submit(fn, m)) for m in members]
        for member, future in futures:
            try:
                future.result()
            except MemberLost as lost:
                self._gone(lost.member, lost.reason)

    # --- the steps ------------------------------------------------------------------------------

    def _reassign(self) -> None:
        """Give every sample owned by a gone device to the active ones, by speed, and send them."""
        live = {m.name: m for m in self._active() if m.speed > 0}
        if not live:
            live = {m.name: m for m in self._active()}
            for m in live.values():
                m.speed = 1.0
        if not live:
            raise HearthError(f"pooled training: every device left the job ({', '.join(self.lost)})")
        orphans = sorted(i for i, name in self.owners.items() if name not in live)
        if not orphans:
            return
        taken = assign_owners([self.sample_costs[i] for i in orphans], {n: m.speed for n, m in live.items()},
                              self.spec.epochs - 1)
        for k, i in enumerate(orphans):
            self.owners[i] = taken[k]
        for m in live.values():
            m.state = "training"
        self._each(lambda m: self._send_samples(m, {i for i in orphans if self.owners[i] == m.name}),
                   only=list(live.values()))

    def _take_back(self) -> None:
        """At an epoch's start: a device that left and can be reached again gets its samples back."""
        if self.rejoin is None:
            return
        for member in [m for m in self.members if m.state == "gone" and not m.local and not m.in_pipeline]:
            try:
                peer = self.rejoin(member.name)
            except Exception:
                peer = None
            if peer is None:
                continue
            member.peer, member.state, member.sent, member.cached = peer, "training", set(), set()
            member.version = None
            try:
                self._open(member)
                self._send_samples(member, member.first_owned)
            except MemberLost as lost:
                member.state = "gone"
                self.emit(ProgressEvent("devices", message=f"{member.name} could not rejoin ({lost.reason})"))
                continue
            for i in member.first_owned:
                self.owners[i] = member.name
            self.rejoined.append(member.name)
            self.emit(ProgressEvent("devices", message=f"{member.name} rejoined the job"))

    def _rebalance(self, epochs: int) -> None:
        """After epoch 1: move a few samples' cache entries from the devices whose adapter steps
        were slower than planned to the faster ones (`rebalance`), so the `epochs` left, which
        run adapters only, are even. The plan split the samples by a short profile; epoch 1
        measured each device over its whole share. Only devices that trained all their samples
        take part (one that rejoined has no cache yet); a device that fails is marked gone, and
        the samples it held are re-assigned by the next step as usual."""
        ready = [m for m in self._active() if m.state == "training" and not m.in_pipeline and m.trained > 0
                 and all(i in m.cached for i, name in self.owners.items() if name == m.name)]
        if len(ready) < 2 or epochs < 1:
            return
        by_name = {m.name: m for m in ready}
        examples = self.run.examples
        config = self.run.chain_config
        value_bytes = 2 if self.spec.cache_dtype == "float16" else 4
        per_token = config.n_inputs * config.hidden_size * value_bytes + 8

        def move_s(i: int, src: str, dst: str) -> float:
            # Through the coordinator: in from the source, out to the destination.
            size = examples[i].trained_tokens * per_token
            return size / by_name[src].bandwidth + size / by_name[dst].bandwidth

        tokens = {i: examples[i].trained_tokens for i, name in self.owners.items() if name in by_name}
        moves = rebalance(tokens, {i: self.owners[i] for i in tokens},
                          {m.name: m.adapter_s / m.trained for m in ready}, epochs, move_s)
        pairs: dict[tuple[str, str], list[int]] = {}
        for i, dst in sorted(moves.items()):
            pairs.setdefault((self.owners[i], dst), []).append(i)
        for (src, dst), indices in pairs.items():
            source, target = by_name[src], by_name[dst]
            if source.state == "gone" or target.state == "gone":
                continue
            try:
                entries = self._call(source, CACHE_OUT, {"job": self.job_id, "indices": indices}, timeout=120).tensors
                self._send_samples(target, set(indices))
                self._call(target, CACHE_IN, {"job": self.job_id}, entries, timeout=120)
            except MemberLost as lost:
                self._gone(lost.member, lost.reason)
                continue
            for i in indices:
                self.owners[i] = dst
            target.cached |= set(indices)
            self.emit(ProgressEvent("devices", message=f"moved {len(indices)} samples' cache from {src} to {dst}: "
                                                       "the later epochs balanced by measured speed"))

    def _step_parts(self, batch: list[int]) -> tuple[float, dict[str, torch.Tensor], dict[str, str | None]]:
        """One try at the step: every device's part, and the others' contributions sent to each
        device as soon as they are all in. Returns (loss, the summed gradients, each device's
        `weights_digest` after the step); MemberLost if a
        device's part did not arrive (no device has applied anything of this try then: each
        applies only once every other part is in)."""
        self.attempt += 1
        parts: dict[str, list[int]] = {}
        for i in batch:
            parts.setdefault(self.owners[i], []).append(i)
        by_name = {m.name: m for m in self.members}
        # The fixed order of the sum: this device first (it is sent nothing), then the others.
        order = sorted(parts, key=lambda name: (not by_name[name].local, self.members.index(by_name[name])))
        # Devices with no sample in this step still take the step (they get the sum), so their
        # replica needs no resending of the whole state when they next have a part.
        receivers = order + [m.name for m in self._active() if m.name not in parts and m.version == self.step]
        tokens = {name: sum(self.run.examples[i].trained_tokens for i in parts[name]) for name in order}
        total = sum(tokens.values())
        for m in self.members:
            m.last_share = len(parts.get(m.name, []))
        contributions: dict[str, dict[str, torch.Tensor]] = {}
        # The terms of the sum in their fixed order: every device's part, then the anchor's pull.
        summands = list(order)
        if self.run.anchor is not None:
            contributions[ANCHOR_TERM] = self.run.anchor_pull(self.step)
            summands.append(ANCHOR_TERM)
        summed: dict[str, dict[str, torch.Tensor]] = {}
        applies: dict[str, Any] = {}
        digests: dict[str, str | None] = {}
        lock = threading.Lock()

        def apply_on(name: str) -> None:
            # Everything in: the sum itself. Else (this device finishes last) the others' part,
            # sent while its own is still on the way: the running total of the devices before
            # it and each later one, which it adds around its own in the same order.
            with lock:
                if len(contributions) == len(summands):
                    if "total" not in summed:
                        summed["total"] = fold([contributions[o] for o in summands])
                    tensors, after = {f"t.{k}": v for k, v in summed["total"].items()}, 0
                else:
                    j = summands.index(name)
                    tensors = {f"p.{k}": v for k, v in fold([contributions[o] for o in summands[:j]]).items()} if j else {}
                    for k, later in enumerate(summands[j + 1:]):
                        tensors.update({f"a{k}.{n}": v for n, v in contributions[later].items()})
                    after = len(summands) - j - 1
            fields = {"job": self.job_id, "step": self.step, "attempt": self.attempt, "after": after,
                      "lr": self.lr}
            reply = self._call(by_name[name], APPLY, fields, tensors or None, timeout=self.step_timeout_s)
            by_name[name].version = self.step + 1
            digests[name] = reply.fields.get("digest")

        def one(name: str) -> StepResult:
            member = by_name[name]
            started = time.perf_counter()
            if name in self.pipelines:
                self._fill_pipeline(member, [i for i in parts[name] if i not in member.cached])
            fields = {"job": self.job_id, "step": self.step, "attempt": self.attempt, "indices": parts[name],
                      "total_tokens": total}
            state = None
            if member.version != self.step:
                sync_fields, state = state_to_tensors(self.run.trainable_state(), self.run.optimizer)
                fields.update(sync_fields)
            reply = self._call(member, STEP, fields, state, timeout=self.step_timeout_s)
            member.busy_s += time.perf_counter() - started
            member.samples += len(parts[name])
            result = StepResult.from_reply(reply.fields, reply.tensors)
            if result.tokens != tokens[name]:
                raise HearthError(f"pooled training: {name} trained {result.tokens} target tokens of step "
                                  f"{self.step}, its samples have {tokens[name]}")
            member.cached |= set(parts[name])
            if self.step < self.per_epoch:      # epoch 1's adapter speed decides the rebalance
                member.adapter_s += result.adapter_s
                member.trained += result.tokens
            with lock:
                contributions[name] = weighted(result.grads, result.tokens / total)
                ready = [x for x in receivers if x not in applies and all(o in contributions for o in summands if o != x)]
                for x in ready:
                    applies[x] = self.pool.submit(apply_on, x)
            return result

        futures = [(name, self.pool.submit(one, name)) for name in order]
        results, lost = [], []
        for name, future in futures:
            try:
                results.append(future.result())
            except MemberLost as exc:
                lost.append(exc)
        with lock:
            started_applies = list(applies.values())
        for future in started_applies:
            try:
                future.result()
            except MemberLost as exc:
                lost.append(exc)
        for exc in lost:
            self._gone(exc.member, exc.reason)
        if len(contributions) < len(summands):
            raise lost[0]
        loss = sum(r.loss * r.tokens for r in results) / total
        return loss, summed.get("total") or fold([contributions[o] for o in summands]), digests

    def _fill_pipeline(self, holder: _Member, indices: list[int]) -> None:
        """Epoch 1 through a pipeline: each stage runs its layers and hands the activations
        (and the taps so far) on, through the coordinator; the last stage caches them."""
        if not indices:
            return
        unit = self.pipelines[holder.name]
        by_name = {m.name: m for m in self.members}
        tensors: dict = {}
        for k, stage in enumerate(unit.stages):
            last = k == len(unit.stages) - 1
            fields = {"job": self.job_id, "first": stage.first_layer, "last": stage.last_layer, "cache": last}
            if k == 0 or last:
                fields["indices"] = indices
            tensors = self._call(by_name[stage.device], STAGE, fields, tensors or None,
                                 timeout=self.step_timeout_s).tensors or {}
        holder.cached |= set(indices)

    def _fill(self, batch: list[int]) -> None:
        """The backbone passes of the step's samples that no device has cached yet (epoch 1, or
        samples of a device that left), handed out in pieces to whichever replica is free, the
        longest samples first and the pieces shrinking as the work runs out (each a share of
        what is left), so the devices finish together however their speed differs from the
        profile's (a device 17% slower than planned made epoch 1 wait for it). A sample belongs
        to the device that cached it. Pipelines fill their own samples at the same time."""
        replicas = [m for m in self._active() if m.state == "training" and not m.in_pipeline and m.speed > 0]
        names = {m.name for m in replicas}
        by_name = {m.name: m for m in self.members}
        todo = [i for i in batch if self.owners[i] in names and i not in by_name[self.owners[i]].cached]
        pipelines = [by_name[h] for h in self.pipelines if by_name[h].state != "gone"
                     and any(self.owners[i] == h and i not in by_name[h].cached for i in batch)]
        if not todo and not pipelines:
            return
        examples = self.run.examples
        queue = sorted(todo, key=lambda i: (-len(examples[i].input_ids), i))
        cost = {i: max(self.sample_costs[i][0] - self.sample_costs[i][1], 1e-9) for i in queue}
        left = [sum(cost.values())]
        lock = threading.Lock()

        def take() -> list[int]:
            with lock:
                piece: list[int] = []
                want = left[0] / (2 * len(replicas))
                while queue and (not piece or sum(cost[i] for i in piece) < want):
                    piece.append(queue.pop(0))
                left[0] -= sum(cost[i] for i in piece)
                return piece

        def work(member: _Member) -> None:
            if member.name in self.pipelines:
                self._fill_pipeline(member, [i for i in batch if self.owners[i] == member.name
                                             and i not in member.cached])
                return
            while piece := take():
                started = time.perf_counter()
                try:
                    self._send_samples(member, set(piece))
                    self._call(member, FILL, {"job": self.job_id, "indices": piece}, timeout=self.step_timeout_s)
                except MemberLost:
                    with lock:       # back to the front: another device takes it
                        queue[:0] = piece
                        left[0] += sum(cost[i] for i in piece)
                    raise
                member.busy_s += time.perf_counter() - started
                for i in piece:
                    self.owners[i] = member.name
                member.cached |= set(piece)

        self._each(work, only=replicas + pipelines)

    def step_once(self, batch: list[int]) -> float:
        """One global step, applied exactly once: parts are recomputed until all of them arrive."""
        while True:
            if self._orphaned(batch):         # a device left after its last part arrived
                self._reassign()
            self._fill(batch)
            if self._orphaned(batch):         # ... or while filling: its samples go elsewhere first
                continue
            try:
                loss, grads, digests = self._step_parts(batch)
                break
            except MemberLost:
                self._reassign()
        apply_gradients(self.run.module, self.run.optimizer, grads, self.spec.max_grad_norm, self.lr)
        self._check_replicas(digests)
        return loss

    def _orphaned(self, batch: list[int]) -> bool:
        gone = {m.name for m in self.members if m.state == "gone"}
        return any(self.owners[i] in gone for i in batch)

    def _check_replicas(self, digests: dict[str, str | None]) -> None:
        """Replicas equal this side chain bit for bit on devices whose float arithmetic rounds
        alike. One that does not (another CPU's vector kernels, another torch build) would drift by
        a few ulps a step; it is sent the whole state with its next part instead."""
        master = weights_digest(self.run.module)
        for member in self.members:
            digest = digests.get(member.name)
            if digest is not None and digest != master and member.version is not None:
                member.version = None
                self.resynced.append(member.name)
                self.emit(ProgressEvent("devices", message=f"{member.name}'s copy of the side chain differs from "
                                                           f"this device's after step {self.step + 1}: it is sent "
                                                           "the whole state with its next part"))

    def execute(self, checkpoint: Checkpoint | None) -> PooledResult:
        from training.trainer import TrainResult

        spec, run = self.spec, self.run
        n = len(run.examples)
        per_epoch = self.per_epoch
        total = per_epoch * spec.epochs
        if spec.max_steps is not None:
            total = min(total, spec.max_steps)
        step, losses = 0, []
        if checkpoint is not None:
            run._restore(checkpoint)
            step, losses = checkpoint.step, list(checkpoint.losses)
        result = TrainResult(spec, total, losses, 0.0, resumed_from=step, steps_per_epoch=per_epoch,
                             trainable_parameters=run.trainable_parameters)
        epoch_step_s: list[float] = []
        bytes_per_step: list[float] = []
        started = time.perf_counter()
        if checkpoint is None:
            run.calibrate_chain()   # here, on the coordinator; replicas get the statistics with the state
        if step < total:
            # Here only: the anchor's pull is one more term of each step's sum, computed on this
            # device's side chain (equal to every replica's before the step), so replicas need
            # neither the anchor chats nor the base's distribution.
            result.anchor_s = run.build_anchor()
        epoch_started, epoch_steps, epoch_bytes = time.perf_counter(), 0, self.bytes
        last_checkpoint, done_here = time.perf_counter(), 0
        while step < total:
            epoch = step // per_epoch
            if step % per_epoch == 0 and step > 0:
                self._take_back()
                if step == per_epoch:
                    self._rebalance(-(-(total - step) // per_epoch))
            self.step = step
            self.lr = scheduled_lr(spec.learning_rate, step, per_epoch * spec.epochs)
            batch = batch_plan(n, spec.batch_size, spec.seed, epoch)[step % per_epoch]
            losses.append(self.step_once(batch))
            step += 1
            epoch_steps += 1
            done_here += len(batch)
            end_of_epoch = step % per_epoch == 0 or step == total
            if end_of_epoch:
                seconds = time.perf_counter() - epoch_started
                result.epoch_s.append(seconds)
                epoch_step_s.append(seconds / epoch_steps)
                bytes_per_step.append((self.bytes - epoch_bytes) / epoch_steps)
                epoch_started, epoch_steps, epoch_bytes = time.perf_counter(), 0, self.bytes
            if end_of_epoch or time.perf_counter() - last_checkpoint >= run.checkpoint_every_s:
                save_checkpoint(run.job_dir, Checkpoint(spec, step, run.trainable_state(),
                                                        run.optimizer.state_dict(), losses))
                last_checkpoint = time.perf_counter()
            elapsed = time.perf_counter() - started
            rate = done_here / elapsed if elapsed > 0 else None
            remaining = (total - step) * spec.batch_size
            self.emit(PooledEvent("train", step, total, epoch + 1, losses[-1], rate,
                                  remaining / rate if rate else None, devices=self.figures()))
        result.wall_s = time.perf_counter() - started
        result.module = run.module
        assert self.plan is not None
        receivers = sorted({m.name for m in self.members if m.sent and not m.local})
        return PooledResult(result, self.plan, epoch_step_s, bytes_per_step, list(self.lost),
                            list(self.rejoined), receivers, list(self.resynced))

    def figures(self) -> list[DeviceFigures]:
        owned: dict[str, int] = {}
        for name in self.owners.values():
            owned[name] = owned.get(name, 0) + 1
        return [DeviceFigures(m.name, m.state, m.last_share if m.state != "gone" else 0,
                              round(m.samples / m.busy_s, 3) if m.busy_s > 0 else None, owned.get(m.name, 0),
                              round(m.busy_s, 3))
                for m in self.members]

    def close(self) -> None:
        close_job_on(self.members, CLOSE, self.job_id)
        self.pool.shutdown(wait=False, cancel_futures=True)
