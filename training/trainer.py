"""The training loop on one device: PAC (side chain, activation cache), PEFT LoRA, full fine-tuning.

`train(spec)` loads the base (optionally quantised), reads the data, and runs the global steps of
`JobSpec` in the order `job.batch_plan` fixes. It checkpoints (job.save_checkpoint) at least
every `checkpoint_every_s` seconds and at each epoch's end into `hearth_paths().jobs_dir / NAME`,
so `resume=True` after a crash or SIGKILL carries on at the step after the last checkpoint: the
final weights equal those of an uninterrupted run. The personalised model is written into
`hearth_paths().models_dir / NAME` in one rename (core.atomic.atomic_dir).

PAC with the cache: epoch 1 first fills the activation cache shard by shard (the only backbone
passes of the whole job), then every epoch's adapter steps read from it. PAC without the cache
runs the backbone forward for every batch of every epoch (the baseline that shows the cache's
worth). Neither runs a backward pass through the backbone.

What is not here: the command line (app/commands/train.py), generation (torch_engine.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_dir, atomic_write_text
from core.errors import HearthError
from core.paths import hearth_paths
from training.activation_cache import ActivationCache, CacheKey, tokenizer_fingerprint
from training.data import Example, collate, examples_fingerprint, read_sources, tokenize
from training.job import (
    Checkpoint, JobSpec, ProgressEvent, apply_gradients, batch_plan, load_checkpoint, make_optimizer,
    one_run_at_a_time, pac_gradients, save_checkpoint, scheduled_lr, set_learning_rate, steps_per_epoch,
)
from training.model_store import MANIFEST, PersonalModel, resolve

SIDE_CHAIN_WEIGHTS = "side_chain.safetensors"
SIDE_CHAIN_CONFIG = "side_chain.json"


@dataclass
class Backbone:
    """A loaded, frozen base model and what identifies it (for the cache key)."""

    model: Any
    tokenizer: Any
    identity: str


@dataclass
class TrainResult:
    spec: JobSpec
    steps: int
    losses: list[float]
    wall_s: float                      # this run's wall time (load excluded)
    epoch_s: list[float] = field(default_factory=list)
    cache_s: float = 0.0               # time spent filling the activation cache
    anchor_s: float = 0.0              # time spent on the anchor (training/anchor.py): read, or built once per base
    output: Path | None = None
    trainable_parameters: int = 0
    resumed_from: int = 0
    steps_per_epoch: int = 1
    module: Any = None                 # the trained side chain / PEFT model / full model
    anchor_losses: list[float] = field(default_factory=list)   # PAC with an anchor: its KL per step

    @property
    def final_loss(self) -> float | None:
        """Mean loss over the last epoch's steps."""
        if not self.losses:
            return None
        tail = self.losses[-self.steps_per_epoch:]
        return sum(tail) / len(tail)


def load_backbone(model: str, quant: str = "none") -> Backbone:
    """The base model for training, frozen, optionally quantised (PAC+)."""
    from core.memory import fix_mmap_threshold
    from training.model_store import load_torch
    from training.parallel_adapters import freeze
    from training.quant import check_mode, quantize_backbone, quantize_layer

    check_mode(quant)
    ref = resolve(model)
    if ref.personal is not None and ref.personal.needs_base:
        # Adapters on adapters are not a format anyone loads; a pruned model is whole weights.
        raise HearthError(f"model {model} is already personalised: train from its base ({ref.personal.base})")
    on_layer = None
    if quant != "none":
        # A quantised backbone is the choice of memory over speed; the allocator makes the same
        # one (about 15% slower steps, 19% less peak memory: core/memory.py). Set before the load.
        fix_mmap_threshold()
        on_layer = partial(quantize_layer, mode=quant)  # each layer as it loads
    net, tokenizer = load_torch(ref, on_layer=on_layer)
    freeze(net)
    quantize_backbone(net, quant)  # what the loader did not hand over layer by layer
    return Backbone(net, tokenizer, f"{ref.text}|{ref.path}|{files_stamp(ref.path)}|{quant}")


def files_stamp(path: Path | None) -> str:
    """What changes when the weights at `path` (a file, or a model folder) change: a base pruned
    again under the same name keeps its path. Keys the caches built from a backbone's outputs
    (an activation cache a resumed job reads, the anchor every job of that base reads)."""
    if path is None:
        return ""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamps = []
    for file in files:
        info = file.stat()
        stamps.append(f"{file.name}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("|".join(stamps).encode()).hexdigest()[:16]


@one_run_at_a_time
def train(spec: JobSpec, resume: bool = False, on_event: Callable[[ProgressEvent], None] | None = None,
          backbone: Backbone | None = None, save: bool = True, checkpoint_every_s: float = 30.0) -> TrainResult:
    """Run (or resume) one job. `backbone` may be passed in to share a loaded model."""
    emit = on_event or (lambda event: None)
    job_dir = hearth_paths().jobs_dir / spec.name
    checkpoint = load_checkpoint(job_dir) if resume else None
    if checkpoint is not None and checkpoint.spec != spec:
        raise HearthError(f"{job_dir}: the interrupted job was started with other settings; "
                          "run again without --resume to start over")
    if not resume:
        shutil.rmtree(job_dir, ignore_errors=True)

    conversations = read_sources(spec.data)  # every line of every source checked before any work
    emit(ProgressEvent("load", message=f"loading {spec.model}"))
    if backbone is None:
        backbone = load_backbone(spec.model, spec.quant)
    examples = tokenize(conversations, backbone.tokenizer, spec.max_length)
    run = _Run(spec, backbone, examples, job_dir, emit, checkpoint_every_s)
    result = run.execute(checkpoint)
    if save:
        result.output = run.save_output(result)
        shutil.rmtree(job_dir, ignore_errors=True)
        if run.cache is not None:
            run.cache.delete()     # an interrupted job keeps it, to resume without epoch 1
    emit(ProgressEvent("done", result.steps, result.steps, spec.epochs, result.final_loss,
                       message=str(result.output or "")))
    return result


class _Run:
    """One execution of a job: the trainable module, its optimiser, and the step loop."""

    def __init__(self, spec: JobSpec, backbone: Backbone, examples: list[Example], job_dir: Path,
                 emit: Callable[[ProgressEvent], None], checkpoint_every_s: float):
        self.spec, self.backbone, self.examples = spec, backbone, examples
        self.job_dir, self.emit, self.checkpoint_every_s = job_dir, emit, checkpoint_every_s
        self.pad_id = backbone.tokenizer.pad_token_id or 0
        self.cache: ActivationCache | None = None
        self.anchor: Any = None
        self.anchor_losses: list[float] = []
        torch.manual_seed(spec.seed)
        self.module = self._build_module()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, spec)

    def _build_module(self) -> Any:
        spec, model = self.spec, self.backbone.model
        if spec.method == "pac":
            from training.parallel_adapters import SideChain, SideChainConfig

            self.chain_config = SideChainConfig.for_backbone(model, spec.tap_every, spec.reduction)
            return SideChain(self.chain_config)   # calibrated in `execute` (a new job) or restored
        if spec.method == "lora":
            from training.lora import LoraSettings, build_lora_model

            return build_lora_model(model, LoraSettings(rank=spec.lora_rank, targets=spec.lora_targets))
        for p in model.parameters():   # full fine-tuning: every weight trains
            p.requires_grad_(True)
        return model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps and a pooled replica is sent: the trainable weights, and for
        PAC the side chain's input statistics (buffers)."""
        state = {k: p.detach() for k, p in self.module.named_parameters() if p.requires_grad}
        if self.spec.method == "pac":
            state.update({k: b.detach() for k, b in self.module.named_buffers()})
        return state

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def _restore(self, checkpoint: Checkpoint) -> None:
        params = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        missing = set(self.trainable_state()) - set(checkpoint.weights)
        if missing:
            raise HearthError(f"{self.job_dir}: checkpoint lacks {sorted(missing)[0]}; start again without --resume")
        with torch.no_grad():
            for name, value in checkpoint.weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(checkpoint.optimizer)

    def execute(self, checkpoint: Checkpoint | None) -> TrainResult:
        spec = self.spec
        per_epoch = steps_per_epoch(len(self.examples), spec.batch_size)
        total = per_epoch * spec.epochs
        if spec.max_steps is not None:
            total = min(total, spec.max_steps)
        step, losses = 0, []
        if checkpoint is not None:
            self._restore(checkpoint)
            step, losses = checkpoint.step, list(checkpoint.losses)
        result = TrainResult(spec, total, losses, 0.0, resumed_from=step, steps_per_epoch=per_epoch,
                             trainable_parameters=self.trainable_parameters)
        started = time.perf_counter()
        if spec.method == "pac" and spec.cache and step < total:
            result.cache_s = self._fill_cache()
        if spec.method == "pac" and checkpoint is None:
            self.calibrate_chain()
        if step < total:
            result.anchor_s = self.build_anchor()
        epoch_started, last_checkpoint, done_here = time.perf_counter(), time.perf_counter(), 0
        while step < total:
            epoch = step // per_epoch
            batch = batch_plan(len(self.examples), spec.batch_size, spec.seed, epoch)[step % per_epoch]
            losses.append(self._step(batch, scheduled_lr(spec.learning_rate, step, per_epoch * spec.epochs), step))
            step += 1
            done_here += len(batch)
            end_of_epoch = step % per_epoch == 0 or step == total
            if end_of_epoch:
                result.epoch_s.append(time.perf_counter() - epoch_started
                                      + (result.cache_s if len(result.epoch_s) == 0 and epoch == 0 else 0.0))
                epoch_started = time.perf_counter()
            if end_of_epoch or time.perf_counter() - last_checkpoint >= self.checkpoint_every_s:
                save_checkpoint(self.job_dir, Checkpoint(spec, step, self.trainable_state(),
                                                         self.optimizer.state_dict(), losses))
                last_checkpoint = time.perf_counter()
            elapsed = time.perf_counter() - started
            rate = done_here / elapsed if elapsed > 0 else None
            remaining = (total - step) * spec.batch_size
            self.emit(ProgressEvent("train", step, total, epoch + 1, losses[-1], rate,
                                    remaining / rate if rate else None))
        result.wall_s = time.perf_counter() - started
        result.module = self.module
        result.anchor_losses = self.anchor_losses
        return result

    # --- PAC -------------------------------------------------------------------------------

    def _fill_cache(self) -> float:
        """Epoch 1's backbone passes: fill every missing shard (resumes at the first missing one)."""
        spec, model = self.spec, self.backbone.model
        key = CacheKey(self.backbone.identity, tokenizer_fingerprint(self.backbone.tokenizer),
                       examples_fingerprint(self.examples), tuple(self.chain_config.taps), spec.cache_dtype,
                       tuple(self.chain_config.means), self.chain_config.mean_decay)
        self.cache = ActivationCache(hearth_paths().activation_cache_dir, key, len(self.examples),
                                     spec.cache_shard_size, self.chain_config.n_inputs, self.chain_config.hidden_size)
        started = time.perf_counter()
        missing = self.cache.missing_shards()
        for n, shard in enumerate(missing):
            fill_shard(self.cache, shard, model, self.chain_config, self.examples, spec.batch_size, self.pad_id)
            self.emit(ProgressEvent("cache", message=f"activation cache shard {n + 1}/{len(missing)}"))
        return time.perf_counter() - started

    def calibrate_chain(self) -> None:
        """PAC, a new job: the side chain's input statistics from the first samples of epoch 1's
        order, read from the activation cache when there is one, else from a backbone pass over
        them (a resumed job's checkpoint carries the statistics)."""
        first = calibration_samples(len(self.examples), self.spec)
        if not first:
            return
        if self.cache is not None:
            taps = self.cache.batch(first)[0]
        else:
            taps = torch.cat([taps_at_labels(self.backbone.model, self.chain_config, self.examples, chunk, self.pad_id)[0]
                              for chunk in length_chunks(self.examples, first, self.spec.batch_size)])
        self.module.calibrate(taps)

    def build_anchor(self) -> float:
        """The job's anchor (training/anchor.py), if it has one: read from the cache, or built and kept;
        the seconds that took."""
        if self.spec.method != "pac" or self.spec.anchor <= 0:
            return 0.0
        from training.anchor import job_anchor

        started = time.perf_counter()
        self.anchor = job_anchor(self.backbone, self.chain_config, self.spec.batch_size)
        return time.perf_counter() - started

    def anchor_pull(self, step: int) -> dict[str, torch.Tensor]:
        """The anchor's gradient at `step` on this side chain, weighted: a term of the step's sum
        (added here; pooled jobs add it to the devices' parts)."""
        from training.anchor import anchor_gradients

        kl, pull = anchor_gradients(self.backbone.model, self.module, self.anchor,
                                    self.anchor.positions(self.spec.seed, step))
        self.anchor_losses.append(kl)
        return {name: self.spec.anchor * grad for name, grad in pull.items()}

    def _step(self, indices: list[int], lr: float, step: int) -> float:
        spec = self.spec
        if spec.method == "pac":
            if self.cache is not None:
                taps, targets = self.cache.batch(indices)
            else:
                taps, targets = taps_at_labels(self.backbone.model, self.chain_config, self.examples, indices,
                                               self.pad_id)
            loss, grads = pac_gradients(self.backbone.model, self.module, taps, targets)
            if self.anchor is not None:
                pull = self.anchor_pull(step)
                grads = {name: grad + pull[name] for name, grad in grads.items()}
            apply_gradients(self.module, self.optimizer, grads, spec.max_grad_norm, lr)
            return loss
        from training.lora import lora_step

        batch = collate([self.examples[i] for i in indices], self.pad_id)
        set_learning_rate(self.optimizer, lr)
        return lora_step(self.module, self.optimizer, batch, spec.max_grad_norm)

    # --- output ----------------------------------------------------------------------------

    def save_output(self, result: TrainResult) -> Path:
        """The personalised model folder, written in one rename."""
        spec = self.spec
        if spec.method == "full":
            raise HearthError("full fine-tuning is a benchmark baseline; it is not saved as a model")
        target = hearth_paths().models_dir / spec.name
        with atomic_dir(target) as tmp:
            if spec.method == "pac":
                save_side_chain(self.module, tmp)
                fmt = "pac"
            else:
                from training.lora import save_adapter

                save_adapter(self.module, tmp)
                fmt = "peft"
            base = resolve(spec.model).personal   # a pruned base: this model is as pruned as it
            manifest = PersonalModel(
                name=spec.name, base=spec.model, method=spec.method, format=fmt,
                pruning_ratio=base.pruning_ratio if base is not None else 0.0,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                parameters=sum(p.numel() for p in self.backbone.model.parameters()),
                details={"quant": spec.quant, "epochs": spec.epochs, "final_loss": result.final_loss,
                         "trainable_parameters": result.trainable_parameters, "samples": len(self.examples),
                         "data": [os.path.basename(p) for p in spec.data], "lr": spec.learning_rate,
                         "spec": spec.to_dict()},
            )
            atomic_write_text(tmp / MANIFEST, manifest.to_json())
        return target


def taps_at_labels(model: Any, chain_config: Any, examples: list[Example], indices: list[int], pad_id: int,
                   per_sample: bool = False):
    """Backbone forward (no gradients) on these samples; the taps and targets at their labelled
    positions, concatenated in sample order (or as per-sample lists)."""
    from training.parallel_adapters import backbone_taps, labelled_positions

    batch = collate([examples[i] for i in indices], pad_id)
    taps, _ = backbone_taps(model, chain_config, batch.input_ids, batch.attention_mask)
    rows, cols, targets = labelled_positions(batch)
    selected = taps[rows, cols]
    if not per_sample:
        return selected, targets
    counts = torch.bincount(rows, minlength=len(indices)).tolist()
    return list(torch.split(selected, counts)), list(torch.split(targets, counts))


# Padded tokens of one epoch-1 backbone pass at most. Larger passes gain nothing on a CPU and
# pad more: the 128 Dolly samples of `hearth bench mesh` (39-512 tokens) took 87 s in two passes
# of up to 128 samples (27,358 padded tokens), 48 s in passes of 4,096 tokens, 39 s of 2,048,
# 37 s of 1,024 (14,805) and 40 s of 512 (SmolLM2-135M, one thread).
PASS_TOKENS = 1024


def length_chunks(examples: list[Example], indices: list[int], batch_size: int) -> list[list[int]]:
    """`indices` cut into the backbone passes of epoch 1: sorted by length, so each pass pads its
    samples to about their own length (one long answer no longer pads a whole batch), and each
    pass at most `batch_size` samples of average length (an ordinary batch's memory) and at most
    `PASS_TOKENS` in padded tokens, at least one sample."""
    lengths = {i: len(examples[i].input_ids) for i in indices}
    if not lengths:
        return []
    budget = min(batch_size * sum(lengths.values()) / len(lengths), PASS_TOKENS)
    chunks: list[list[int]] = [[]]
    for i in sorted(indices, key=lambda i: (lengths[i], i)):
        if chunks[-1] and (len(chunks[-1]) + 1) * lengths[i] > budget:   # sorted: i is the longest
            chunks.append([])
        chunks[-1].append(i)
    return chunks


# Samples whose labelled positions give a new side chain its input statistics: the first of
# epoch 1's batch order. On the CLINC150 subset of `hearth bench training`, the first 8, 16 or 32
# samples gave the same accuracy as all 80 (docs/training.md).
CALIBRATION_SAMPLES = 16


def calibration_samples(n_samples: int, spec: Any) -> list[int]:
    """The samples a new side chain is calibrated on; the same wherever the job runs."""
    order = [i for batch in batch_plan(n_samples, spec.batch_size, spec.seed, 0) for i in batch]
    return order[:CALIBRATION_SAMPLES]


def fill_shard(cache: ActivationCache, shard: int, model: Any, chain_config: Any, examples: list[Example],
               batch_size: int, pad_id: int) -> None:
    """Epoch 1's work for one shard of samples: backbone forward, then one atomic shard write.
    A mesh worker given a shard index runs exactly this."""
    indices = list(cache.shard_range(shard))
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for chunk in length_chunks(examples, indices, batch_size):
        part, part_targets = taps_at_labels(model, chain_config, examples, chunk, pad_id, per_sample=True)
        found.update(zip(chunk, zip(part, part_targets)))
    cache.write_shard(shard, [found[i][0] for i in indices], [found[i][1] for i in indices])


def save_side_chain(chain: Any, folder: Path) -> None:
    import json

    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in chain.state_dict().items()}, str(folder / SIDE_CHAIN_WEIGHTS))
    (folder / SIDE_CHAIN_CONFIG).write_text(json.dumps(chain.config.to_dict(), indent=2), "utf-8")


def load_side_chain(folder: Path) -> Any:
    import json

    from safetensors.torch import load_file

    from training.parallel_adapters import SideChain, SideChainConfig

    try:
        config = SideChainConfig.from_dict(json.loads((folder / SIDE_CHAIN_CONFIG).read_text("utf-8")))
        chain = SideChain(config)
        chain.load_state_dict(load_file(str(folder / SIDE_CHAIN_WEIGHTS)))
    except (HearthError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise HearthError(f"{folder}: cannot load the side chain ({str(exc).splitlines()[0][:160]})") from None
    chain.eval()
    return chain
