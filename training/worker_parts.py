"""Job parts (PAC, ALGORITHMS.md section 4): what a device does for a pooled training job.

A pooled job has one coordinator (training/pooled.py) and several devices; each device, the
coordinator's own included, runs the parts it is handed through `WorkerJobs.handle(owner, type,
fields, tensors) -> (fields, tensors)`:

- `pac.open`   load the job's frozen backbone (from a file the coordinator sent, or the same
               catalog model found here with the same SHA-256) and build an empty side chain;
               answers `need_model` when this device lacks the base model.
- `pac.profile` measure this device on synthetic token ids (no job data needed): backbone forward
               seconds per sample, adapter step seconds per sample, memory free.
- `pac.sink`   swallow a payload (the coordinator times it to measure the link).
- `pac.samples` receive token ids of the samples this device owns (the only job data it gets).
- `pac.stage`  pipeline stage (a device too small for the whole backbone): run decoder layers
               first..last on token ids (first stage) or on the previous stage's activations; the
               last stage stores the taps in its activation cache.
- `pac.fill`   backbone passes for the given samples into the activation cache (epoch 1: the
               coordinator hands the step's samples out in pieces to whichever device is free).
- `pac.step`   for each given sample, the activation cache entry (backbone forward on first
               use: epoch 1, or a sample re-assigned from a device that left), then loss and
               adapter gradients (`job.pac_gradients`) over this device's part of the global
               batch, computed with this device's replica of the side chain. A step may carry
               the coordinator's whole state (weights and optimiser moments) to (re)start the
               replica: the first step, after a resume, for a device that rejoins.
- `pac.apply`  the step's summed gradients, or, when this device's part is the last one still on
               its way, the others' contributions: the coordinator's running total of the
               devices before this one (in the step's fixed order) and each later one's; the
               replica adds its own in between (`job.fold`: the coordinator's exact sum). Then it
               takes the optimiser step the coordinator takes, and answers its weights' digest
               (`job.weights_digest`), which the coordinator checks against its own.
- `pac.cache_out` / `pac.cache_in`  hand activation cache entries of some samples over, from
               one device to another through the coordinator (who rebalances the later epochs by
               each device's measured adapter speed); float16 entries travel as float16, exactly.
- `pac.close`  forget the job.

Why replicas: only gradients cross the link. The coordinator sends a device the others'
contributions as soon as they are in, often while that device is still computing, so on a
full-duplex link a step costs one transfer each way at the same time, not weights out and
gradients back one after the other. Every replica applies the same float32 sum with the same
optimiser, so it holds the coordinator's weights bit for bit; a device that leaves loses nothing
the coordinator needs, and a step redone on other devices gives the same gradients. The cache
rounds activations to `spec.cache_dtype` exactly as the single-device activation cache does, so
pooled and single-device runs see the same numbers.

This module sends and receives nothing itself: mesh/job_parts.py calls it for requests from
paired devices, and the coordinator calls it directly for its own share. Only PAC is pooled.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.digest import file_sha256
from core.errors import HearthError
from training.data import Example
from training.job import (
    JobSpec, apply_gradients, fold, make_optimizer, optimizer_from_tensors, optimizer_to_tensors, pac_gradients,
    weighted, weights_digest,
)

from training.open_jobs import OpenJobs
from training.part_fields import PAC_APPLY as APPLY
from training.part_fields import PAC_CACHE_IN as CACHE_IN
from training.part_fields import PAC_CACHE_OUT as CACHE_OUT
from training.part_fields import PAC_CLOSE as CLOSE
from training.part_fields import PAC_FILL as FILL
from training.part_fields import PAC_OPEN as OPEN
from training.part_fields import PAC_PROFILE as PROFILE
from training.part_fields import PAC_SAMPLES as SAMPLES
from training.part_fields import PAC_SINK as SINK
from training.part_fields import PAC_STAGE as STAGE
from training.part_fields import PAC_STEP as STEP

MAX_JOBS = 4                 # open jobs per device (a coordinator that crashed leaves one behind)
APPLY_WAIT_S = 600.0         # how long `pac.apply` waits for this device's own part of the step
# Positions of the profile's adapter step: a real part's cost per position is reached from a
# few hundred on (measured: 3.3 ms at 72, 2.3-2.5 ms from 288 to 2,304, SmolLM2-135M, 1 thread).
ADAPTER_PROFILE_POSITIONS = 256
# The tap hooks sit on the shared backbone module: two forwards at once would mix their taps.
_FORWARD_LOCK = threading.Lock()


# --- what crosses the link --------------------------------------------------------------------

def pack_examples(examples: dict[int, Example]) -> dict[str, torch.Tensor]:
    """Token ids and labels of several samples as three flat tensors (no text, no pickle)."""
    order = sorted(examples)
    ids = [t for i in order for t in examples[i].input_ids]
    labels = [t for i in order for t in examples[i].labels]
    return {
        "index": torch.tensor(order, dtype=torch.long),
        "length": torch.tensor([len(examples[i].input_ids) for i in order], dtype=torch.long),
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def unpack_examples(tensors: dict[str, Any] | None) -> dict[int, Example]:
    tensors = tensors or {}
    try:
        index, length = tensors["index"].tolist(), tensors["length"].tolist()
        ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    except (KeyError, AttributeError):
        raise ValueError("pac.samples: tensors index, length, input_ids and labels are required") from None
    if len(index) != len(length) or sum(length) != len(ids) or len(ids) != len(labels) or min(length, default=1) < 2:
        raise ValueError("pac.samples: lengths do not match the token tensors")
    out, start = {}, 0
    for i, n in zip(index, length):
        out[int(i)] = Example(ids[start:start + n], labels[start:start + n], f"sample {i}")
        start += n
    return out


def weights_to_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"w.{k}": v.detach().contiguous() for k, v in weights.items()}


def state_to_tensors(weights: dict[str, torch.Tensor], optimizer: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """The coordinator's whole training state for a replica: (fields, tensors)."""
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
    tensors = weights_to_tensors(weights)
    tensors.update(opt_tensors)
    return {"sync": True, "optimizer": json.dumps(opt_meta)}, tensors


@dataclass
class StepResult:
    """One device's part of one global step: its loss and gradients over `tokens` targets."""

    loss: float
    tokens: int
    samples: int
    grads: dict[str, torch.Tensor]
    forward_s: float = 0.0        # backbone passes for samples not yet cached (epoch 1)
    adapter_s: float = 0.0

    def to_reply(self) -> tuple[dict, dict[str, torch.Tensor]]:
        fields = {"loss": self.loss, "tokens": self.tokens, "samples": self.samples,
                  "forward_s": self.forward_s, "adapter_s": self.adapter_s}
        return fields, {f"g.{k}": v.contiguous() for k, v in self.grads.items()}

    @classmethod
    def from_reply(cls, fields: dict, tensors: dict | None) -> "StepResult":
        grads = {k[2:]: v for k, v in (tensors or {}).items() if k.startswith("g.")}
        return cls(float(fields["loss"]), int(fields["tokens"]), int(fields["samples"]), grads,
                   float(fields.get("forward_s", 0.0)), float(fields.get("adapter_s", 0.0)))


@dataclass
class PartProfile:
    """What `pac.profile` measures on a device."""

    forward_s: float               # backbone forward seconds per sample
    adapter_s: float               # adapter forward + backward seconds per sample
    memory_bytes: int              # memory available now
    threads: int

    def to_fields(self) -> dict:
        return {"forward_s": self.forward_s, "adapter_s": self.adapter_s, "memory_bytes": self.memory_bytes,
                "threads": self.threads}

    @classmethod
    def from_fields(cls, fields: dict) -> "PartProfile":
        return cls(float(fields["forward_s"]), float(fields["adapter_s"]), int(fields["memory_bytes"]),
                   int(fields.get("threads", 1)))


# --- one job on this device -------------------------------------------------------------------

def as_cached(taps: torch.Tensor, dtype: str) -> torch.Tensor:
    """The values the activation cache would give back for `taps` (its storage rounding)."""
    from training.activation_cache import quantize_rows

    if dtype == "float16":
        return taps.to(torch.float16).float()
    if dtype == "int8":
        values, scale = quantize_rows(taps)
        return values.float() * scale[..., None]
    return taps.float()


class WorkerJob:
    """A job's backbone, side chain, the samples this device owns and their activation cache."""

    def __init__(self, spec: JobSpec, backbone: Any):
        from training.parallel_adapters import SideChain, SideChainConfig

        if spec.method != "pac":
            raise HearthError(f"pooled training runs PAC jobs only (got --method {spec.method})")
        self.spec, self.backbone = spec, backbone
        self.config = SideChainConfig.for_backbone(backbone.model, spec.tap_every, spec.reduction)
        self.chain = SideChain(self.config)
        self.pad_id = backbone.tokenizer.pad_token_id or 0
        self.examples: dict[int, Example] = {}
        # activation cache (PAC), in memory for the job's life: sample -> (taps, targets)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()
        # The replica: the optimiser, the steps it has applied (None: not yet given the
        # coordinator's state), and this device's contribution to the step in progress.
        self.optimizer = make_optimizer(self.chain.parameters(), spec)
        self.version: int | None = None
        self.pending: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self.changed = threading.Condition(self.lock)

    def add_samples(self, examples: dict[int, Example]) -> int:
        for index, example in examples.items():
            if self.examples.get(index) != example:
                self.cache.pop(index, None)
            self.examples[index] = example
        return len(self.examples)

    def fill_cache(self, indices: list[int]) -> float:
        """Backbone forward for the samples not cached yet, in passes of about `batch_size`
        samples' tokens, shortest first (epoch 1)."""
        from training.trainer import length_chunks, taps_at_labels

        todo = [i for i in indices if i not in self.cache]
        missing = [i for i in todo if i not in self.examples]
        if missing:
            raise ValueError(f"pac.step: samples {missing[:5]} were never sent to this device")
        started = time.perf_counter()
        for chunk in length_chunks(self.examples, todo, self.spec.batch_size):
            with _FORWARD_LOCK:
                taps, targets = taps_at_labels(self.backbone.model, self.config, self.examples, chunk, self.pad_id,
                                               per_sample=True)
            for i, t, y in zip(chunk, taps, targets):
                self.cache[i] = (as_cached(t, self.spec.cache_dtype).contiguous(), y.contiguous())
        return time.perf_counter() - started

    def cache_out(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cache entries of `indices` as flat tensors (sample numbers, positions per sample,
        taps, targets); the entries stay here too. float16 entries go as float16: exact."""
        with self.lock:
            missing = [i for i in indices if i not in self.cache]
            if missing or not indices:
                raise ValueError(f"pac.cache_out: samples {missing[:5]} are not cached on this device")
            taps = torch.cat([self.cache[i][0] for i in indices])
            return {"index": torch.tensor(indices, dtype=torch.long),
                    "count": torch.tensor([len(self.cache[i][1]) for i in indices], dtype=torch.long),
                    "taps": taps.half() if self.spec.cache_dtype == "float16" else taps,
                    "targets": torch.cat([self.cache[i][1] for i in indices])}

    def cache_in(self, tensors: dict[str, Any]) -> int:
        """Store entries another device's `cache_out` gave, for samples this device was sent."""
        try:
            index, count = tensors["index"].tolist(), tensors["count"].tolist()
            taps, targets = tensors["taps"].float(), tensors["targets"].long()
        except (KeyError, AttributeError):
            raise ValueError("pac.cache_in: tensors index, count, taps and targets are required") from None
        shape = (self.config.n_inputs, self.config.hidden_size)
        if (len(index) != len(count) or min(count, default=0) < 1 or sum(count) != len(targets)
                or tuple(taps.shape) != (len(targets), *shape)):
            raise ValueError("pac.cache_in: the entries' sizes do not match")
        with self.lock:
            for i, n in zip(index, count):
                example = self.examples.get(i)
                if example is None or example.trained_tokens != n:
                    raise ValueError(f"pac.cache_in: sample {i} was not sent here, or has other targets")
            for i, t, y in zip(index, torch.split(taps, count), torch.split(targets, count)):
                self.cache[i] = (t.contiguous(), y.contiguous())
        return len(index)

    def step(self, step: int, attempt: int, indices: list[int], total_tokens: int,
             state: tuple[dict[str, torch.Tensor], dict] | None = None) -> StepResult:
        """This device's part of global step `step` (the `attempt`-th try of it): loss and mean
        gradients over `indices`; its contribution (share `tokens / total_tokens`) waits for
        `apply`. `state` (weights, optimiser state_dict) restarts the replica at `step`."""
        with self.lock:
            forward_s = self.fill_cache(indices)
            if state is not None:
                self._load_state(*state)
                self.version = step
            if self.version != step:
                raise ValueError(f"pac.step: this device's side chain is at step {self.version}, not {step}")
            started = time.perf_counter()
            taps = torch.cat([self.cache[i][0] for i in indices])
            targets = torch.cat([self.cache[i][1] for i in indices])
            if not 0 < targets.numel() <= total_tokens:
                raise ValueError(f"pac.step: {targets.numel()} target tokens here, {total_tokens} in the whole step")
            loss, grads = pac_gradients(self.backbone.model, self.chain, taps, targets)
            self.pending = ((step, attempt), weighted(grads, targets.numel() / total_tokens))
            self.changed.notify_all()
            return StepResult(loss, int(targets.numel()), len(indices), grads, forward_s,
                              time.perf_counter() - started)

    def apply(self, step: int, attempt: int, lr: float, before: dict[str, torch.Tensor] | None,
              after: list[dict[str, torch.Tensor]], total: dict[str, torch.Tensor] | None = None,
              wait_s: float = APPLY_WAIT_S) -> str:
        """Take step `step`'s optimiser step, at the coordinator's rate `lr` for it (the job's
        schedule), with the step's `total` when the coordinator had
        every part, else with `before` (the devices ahead of this one, summed) + this device's
        own contribution + each of `after`, added in that order. Returns the replica's
        `weights_digest`, which the coordinator compares with its own."""
        with self.changed:
            names = {name for name, _ in self.chain.named_parameters()}
            terms = [total] if total else ([before] if before else []) + after
            if any(set(term) != names for term in terms):
                raise ValueError("pac.apply: the contributions do not match this job's side chain")
            if total is None:
                if not self.changed.wait_for(lambda: self.pending is not None and self.pending[0] == (step, attempt),
                                             wait_s):
                    raise ValueError(f"pac.apply: no part of step {step} (try {attempt}) was computed here")
                terms = ([before] if before else []) + [self.pending[1]] + after
            if self.version != step:
                raise ValueError(f"pac.apply: this device's side chain is at step {self.version}, not {step}")
            apply_gradients(self.chain, self.optimizer, fold(terms), self.spec.max_grad_norm, lr)
            self.version, self.pending = step + 1, None
            return weights_digest(self.chain)

    def _load_state(self, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        # The weights and the input statistics (buffers), which the coordinator measured.
        params = {**dict(self.chain.named_parameters()), **dict(self.chain.named_buffers())}
        if set(weights) != set(params):
            raise ValueError("pac.step: the weights do not match this job's side chain")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        # Copies: the coordinator's own device gets the very tensors its optimiser keeps, and
        # load_state_dict would share them.
        state = {"state": {index: {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}
                           for index, values in optimizer_state.get("state", {}).items()},
                 "param_groups": optimizer_state.get("param_groups", [])}
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"pac.step: bad optimiser state ({exc})") from None
        self.pending = None

    def stage(self, first: int, last: int, indices: list[int] | None, tensors: dict[str, torch.Tensor],
              cache: bool) -> dict[str, torch.Tensor]:
        """Pipeline stage (PAC, ALGORITHMS.md section 4): decoder layers first..last (0-based,
        inclusive) for a microbatch. The first stage starts from its samples' token ids; a later
        one from the `hidden` state the previous stage produced. The tapped layers' outputs travel
        on with it (`taps`), so that the cache holder (`cache=True`, the last stage) can store
        the chain's inputs (`chain_inputs`) of its samples at their labelled positions. Returns
        hidden, taps and mask."""
        from training.data import collate
        from training.parallel_adapters import chain_inputs, decoder_layers, labelled_positions, record_taps

        layers = decoder_layers(self.backbone.model)
        if not 0 <= first <= last < len(layers):
            raise ValueError(f"pac.stage: layers {first}-{last} are not in this model")
        taps_here = [i for i in self.config.taps if first <= i <= last]
        batch = None
        if first == 0:
            if not indices or any(i not in self.examples for i in indices):
                raise ValueError("pac.stage: the first stage needs samples it was sent")
            batch = collate([self.examples[i] for i in indices], self.pad_id)
            mask = batch.attention_mask
        else:
            try:
                hidden, mask = tensors["hidden"].float(), tensors["mask"].long()
            except KeyError:
                raise ValueError("pac.stage: a later stage needs tensors hidden and mask") from None
        with _FORWARD_LOCK, torch.no_grad():
            inner = self.backbone.model.model
            whole = inner.layers
            # The model runs just this stage's layers: the rest are left out of its layer list.
            inner.layers = torch.nn.ModuleList(list(whole)[first:last + 1])
            try:
                with record_taps(self.backbone.model, [i - first for i in taps_here] + [last - first]) as seen:
                    if batch is not None:
                        inner(input_ids=batch.input_ids, attention_mask=mask, use_cache=False)
                    else:
                        inner(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
            finally:
                inner.layers = whole
        out_hidden = seen[last - first].float()
        new_taps = [seen[i - first].float() for i in taps_here]
        carried = tensors.get("taps") if first > 0 else None
        parts = ([carried] if carried is not None and carried.numel() else []) + \
            ([torch.stack(new_taps, dim=-2)] if new_taps else [])
        taps = torch.cat(parts, dim=-2) if parts else None
        if not cache:
            out = {"hidden": out_hidden.contiguous(), "mask": mask.contiguous()}
            if taps is not None:         # none yet before the first tapped layer
                out["taps"] = taps.contiguous()
            return out
        if last != len(layers) - 1 or taps is None or taps.shape[-2] != len(self.config.taps):
            raise ValueError("pac.stage: only the last stage, with every tap, can fill the cache")
        if not indices or any(i not in self.examples for i in indices):
            raise ValueError("pac.stage: the cache holder needs the samples it caches")
        labelled = collate([self.examples[i] for i in indices], self.pad_id)
        if labelled.input_ids.shape != mask.shape:
            raise ValueError("pac.stage: the activations do not match these samples")
        rows, cols, targets = labelled_positions(labelled)
        inputs, _, _ = chain_inputs(self.config, taps, mask)
        selected = as_cached(inputs[rows, cols], self.spec.cache_dtype)
        counts = torch.bincount(rows, minlength=len(indices)).tolist()
        with self.lock:
            for i, t, y in zip(indices, torch.split(selected, counts), torch.split(targets, counts)):
                self.cache[i] = (t.contiguous(), y.contiguous())
        return {}

    def profile(self, tokens: int, trained: int | None = None, samples: int = 2, repeats: int = 3) -> PartProfile:
        """Time a forward on random token ids of a typical (padded) sample's length, and an
        adapter step, given per sample as `trained` positions (the ones that carry a label); the
        median of `repeats` after one untimed round (first calls allocate), so a moment's
        contention neither inflates nor hides the speed. The plan splits the samples by these
        figures: on two equal devices measured one after the other without the warm-up, they
        differed by up to 11%. The adapter step is timed on `ADAPTER_PROFILE_POSITIONS`
        positions, as large as a real part's cost per position: on two samples' 72 positions it
        cost 38% more per position than on 256 or more (measured when the LM head's loss ran in
        slices of 32), and the later steps were predicted 30-38% slow."""
        from training.parallel_adapters import backbone_taps

        vocab = int(self.backbone.model.config.vocab_size)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (samples, max(2, tokens)), generator=generator)
        forwards, adapters = [], []
        for _ in range(repeats + 1):
            with _FORWARD_LOCK:
                started = time.perf_counter()
                taps, _ = backbone_taps(self.backbone.model, self.config, ids)
                forwards.append((time.perf_counter() - started) / samples)
            flat = taps.reshape(-1, taps.shape[-2], taps.shape[-1])
            targets = ids.reshape(-1)
            repeats_needed = -(-ADAPTER_PROFILE_POSITIONS // len(targets))
            flat, targets = flat.repeat(repeats_needed, 1, 1), targets.repeat(repeats_needed)
            started = time.perf_counter()
            pac_gradients(self.backbone.model, self.chain, flat[:ADAPTER_PROFILE_POSITIONS],
                          targets[:ADAPTER_PROFILE_POSITIONS])
            per_position = (time.perf_counter() - started) / ADAPTER_PROFILE_POSITIONS
            adapters.append(per_position * max(1, min(trained or tokens, tokens)))
        return PartProfile(statistics.median(forwards[1:]), statistics.median(adapters[1:]), available_memory(),
                           torch.get_num_threads())


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- the jobs a device serves ------------------------------------------------------------------

@dataclass
class WorkerJobs:
    """Every pooled job open on this device, keyed by job id; `handle` answers one request.

    `received_model(sha256, name)` says where a base model the coordinator sent would be (the
    mesh's file receiver decides); `local_backbone` lets the coordinator's own device share the
    backbone it already loaded.
    """

    received_model: Any = None                     # Callable[[str, str], Path] | None
    local_backbone: Any = None
    memory_budget: int | None = None               # bytes jobs may use here (None: what is free)
    jobs: OpenJobs = field(default_factory=lambda: OpenJobs(MAX_JOBS))
    _backbones: dict[tuple[str, str], Any] = field(default_factory=dict)

    def handle(self, owner: str, type: str, fields: dict, tensors: dict | None) -> tuple[dict, dict | None]:
        if type == SINK:
            return {"bytes": sum(t.numel() * t.element_size() for t in (tensors or {}).values())}, None
        if type == OPEN:
            return self._open(owner, fields), None
        job = self.jobs.get(owner, fields["job"])
        if type == CLOSE:
            self.jobs.close(fields["job"])
            return {"closed": True}, None
        if type == PROFILE:
            trained = fields.get("trained")
            trained = trained if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0 else None
            profile = job.profile(int(fields["tokens"]), trained)
            if self.memory_budget is not None:
                profile.memory_bytes = min(profile.memory_bytes, self.memory_budget)
            return profile.to_fields(), None
        if type == SAMPLES:
            return {"samples": job.add_samples(unpack_examples(tensors))}, None
        if type == STEP:
            indices = fields.get("indices")
            if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ValueError("pac.step: field 'indices' must be a non-empty list of sample numbers")
            total = _positive_int(fields, "total_tokens")
            state = None
            if fields.get("sync"):
                try:
                    meta = json.loads(fields["optimizer"])
                except (KeyError, TypeError, ValueError):
                    raise ValueError("pac.step: a sync needs the optimiser's state as JSON in 'optimizer'") from None
                tensors = tensors or {}
                weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
                state = (weights, optimizer_from_tensors(tensors, meta))
            return job.step(fields["step"], _attempt(fields), indices, total, state).to_reply()
        if type == APPLY:
            count = fields.get("after", 0)
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 64:
                raise ValueError("pac.apply: field 'after' must be a small count")
            lr = fields.get("lr")
            if not isinstance(lr, float) or not 0.0 <= lr < 1.0:
                raise ValueError("pac.apply: field 'lr' must be the step's learning rate (a float in [0, 1))")
            tensors = tensors or {}
            before = {k[2:]: v for k, v in tensors.items() if k.startswith("p.")} or None
            total = {k[2:]: v for k, v in tensors.items() if k.startswith("t.")} or None
            after = []
            for k in range(count):
                prefix = f"a{k}."
                after.append({name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)})
            digest = job.apply(fields["step"], _attempt(fields), lr, before, after, total)
            return {"applied": fields["step"], "digest": digest}, None
        if type == FILL:
            indices = fields["indices"]
            if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ValueError("pac.fill: field 'indices' must be a non-empty list of sample numbers")
            with job.lock:
                return {"forward_s": job.fill_cache(indices), "cached": len(indices)}, None
        if type == CACHE_OUT:
            indices = fields["indices"]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ValueError("pac.cache_out: field 'indices' must be a list of sample numbers")
            return {}, job.cache_out(indices)
        if type == CACHE_IN:
            return {"cached": job.cache_in(dict(tensors or {}))}, None
        if type == STAGE:
            indices = fields.get("indices")
            if indices is not None and (not isinstance(indices, list) or not all(isinstance(i, int) for i in indices)):
                raise ValueError("pac.stage: field 'indices' must be a list of sample numbers")
            out = job.stage(fields["first"], fields["last"], indices, dict(tensors or {}), bool(fields.get("cache")))
            return {"cached": len(indices or []) if fields.get("cache") else 0}, out or None
        raise ValueError(f"unknown job part {type!r}")

    def _open(self, owner: str, fields: dict) -> dict:
        try:
            spec = JobSpec.from_dict(json.loads(fields["spec"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"pac.open: bad job spec ({exc})") from None
        backbone = self.local_backbone or self._backbone(spec, fields["model_sha256"], fields["model_name"])
        if backbone is None:
            return {"need_model": True}
        self.jobs.make_room(fields["job"])
        job = WorkerJob(spec, backbone)
        self.jobs.put(owner, fields["job"], job)
        return {"opened": True, "parameters": sum(p.numel() for p in job.chain.parameters())}

    def _backbone(self, spec: JobSpec, sha256: str, name: str) -> Any:
        """The job's backbone if this device has the same file: a catalog model of its own whose
        SHA-256 matches, or a copy the coordinator sent earlier. None: ask for the file."""
        key = (sha256, spec.quant)
        if key in self._backbones:
            return self._backbones[key]
        from training.model_store import resolve
        from training.trainer import load_backbone

        from training.catalog import find_entry

        path: Path | None = None
        if find_entry(spec.model) is not None:   # a catalog name (a path names the coordinator's own file)
            try:
                ref = resolve(spec.model)
                if ref.path is not None and ref.path.is_file() and file_sha256(ref.path) == sha256:
                    path = ref.path
            except HearthError:
                path = None
        if path is None and self.received_model is not None:
            candidate = Path(self.received_model(sha256, name))
            if candidate.is_file():
                path = candidate
        if path is None:
            return None
        backbone = load_backbone(str(path), spec.quant)
        self._backbones = {key: backbone}   # one base model in memory at a time
        return backbone


def _positive_int(fields: dict, name: str) -> int:
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"pac: field {name!r} must be a positive whole number")
    return value


def _attempt(fields: dict) -> int:
    value = fields.get("attempt", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("pac: field 'attempt' must be a whole number")
    return value
