"""What a training job is, independent of the device that runs it.

- `JobSpec`: everything that decides the result (data, method, model, epochs, seed, global batch);
  two runs with equal specs produce the same adapter, on one device or pooled across several.
- `batch_plan`: the global batches of an epoch, fixed by seed and epoch (not by the device).
- Step functions a remote worker can call: `pac_gradients` (adapter gradients from cached
  activations), `weighted` / `fold` (a device's share of a step's gradients, and their sum in a
  fixed order), `apply_gradients` (clip + optimiser step, after any averaging across devices).
- Checkpoints: one format, `checkpoint.safetensors` (trainable tensors + optimiser state) and
  `checkpoint.json` (spec, step, losses), each written atomically, the JSON last.
- `ProgressEvent`: what the trainer reports (the CLI prints it as a bar or as JSON lines).
- `one_run_at_a_time`: the job's lock around a runner (single-device, pooled, federated).

What is not here: the loop (trainer.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_path, atomic_write_text
from core.errors import HearthError
from core.locks import job_lock
from training.job_defaults import DEFAULT_EPOCHS, DEFAULT_LR, QUANT_MODES, spec_sources  # noqa: F401 - DEFAULT_EPOCHS: job.py's readers

METHODS = ("pac", "lora", "full")
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


@dataclass
class JobSpec:
    name: str
    data: list[str]                      # the sources, learnt together (training.data.read_sources)
    model: str = "smollm2-135m"
    method: str = "pac"
    epochs: int = 3
    quant: str = "none"
    lr: float | None = None              # None: DEFAULT_LR[method]
    batch_size: int = 4                  # the global batch (summed over devices)
    seed: int = 0
    max_length: int = 512
    # PAC
    tap_every: int = 3
    reduction: int = 8
    cache: bool = True
    cache_dtype: str = "float16"
    cache_shard_size: int = 64
    # Weight of the KL pull towards the base model on general chats (training/anchor.py); 0: none.
    # Without it the household set's facts came back as answers to general questions (general
    # recall 27/40 -> 8-13/40; with it 24-25/40, household recall as before: docs/training.md).
    anchor: float = 0.3
    # LoRA
    lora_rank: int = 16
    lora_targets: list[str] | str = "all-linear"
    # Stop after this many steps (the benchmark's truncated full fine-tuning); None: all epochs.
    max_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.data, list) or not self.data or not all(isinstance(p, str) for p in self.data):
            raise HearthError(f"data must be a list of one or more paths (got {self.data!r})")
        if self.method not in METHODS:
            raise HearthError(f"--method must be one of pac, lora (got {self.method})")
        if self.quant not in QUANT_MODES:
            raise HearthError(f"--quant must be one of {', '.join(QUANT_MODES)} (got {self.quant})")
        if self.epochs < 1:
            raise HearthError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise HearthError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.quant != "none" and self.method == "full":
            raise HearthError("full fine-tuning cannot train a quantised backbone")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        try:
            sources = spec_sources(data)
        except ValueError as exc:
            raise HearthError(f"job spec: {exc}") from None
        return cls(**{**data, "data": sources})


@dataclass
class ProgressEvent:
    phase: str                 # "load", "cache", "train", "save", "done"
    step: int = 0              # optimiser steps done
    total_steps: int = 0
    epoch: int = 0             # 1-based epoch the step belongs to
    loss: float | None = None  # mean loss of the last step
    samples_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, "")})


def one_run_at_a_time(run: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a job runner whose first argument is its spec: the run holds `core.locks.job_lock`.
    A fresh start deletes the job's folder, so a second run of one name (the app and `hearth
    train`, or two windows) would destroy the first one's checkpoint under it."""
    @functools.wraps(run)
    def locked(spec: Any, *args: Any, **kwargs: Any) -> Any:
        with job_lock(spec.name):
            return run(spec, *args, **kwargs)
    return locked


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return (n_samples + batch_size - 1) // batch_size


def batch_plan(n_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of `epoch` (0-based): a seeded permutation, cut into batch_size pieces."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_samples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_samples, batch_size)]


# --- device-independent steps ----------------------------------------------------------------

# Labelled positions per slice of the LM head's loss. The logits are the largest tensors of an
# adapter step (positions x 49,152 floats for SmolLM2, and the same again for their softmax and
# gradient); a backward per slice keeps them small and of one size, which also keeps the C heap
# from fragmenting. Measured with an NF4 backbone (docs/training.md): peak 776 -> 710 MB at 32.
# Each slice reads the LM head's weights twice (forward and backward), so fewer slices are
# faster: one thread, SmolLM2's head, 2.06 ms per position at 32, 1.40 at 64, 1.35 at 128. 64
# since quantised jobs fix the allocator's mmap threshold (core/memory.py), which returns these
# blocks on free: a benchmark batch (about 36 positions) is one slice, adapter epochs 2.5 -> 1.7 s,
# and the NF4 peak moved by 12 MB (705 -> 717 MB; docs/training.md, 2026-12-04 afternoon).
LOSS_SLICE = 64


def pac_gradients(backbone: Any, chain: Any, taps: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and adapter gradients for one batch of cached activations (no backbone involved
    beyond its frozen final norm and LM head). A worker returns these; the gradients of several
    workers are averaged, weighted by `len(targets)`, before `apply_gradients`.

    The chain is per token, so the mean loss over all positions is the sum over slices of each
    slice's mean weighted by its share of the positions: the gradients are the whole batch's
    (up to float summation order)."""
    from training.parallel_adapters import chain_loss

    chain.zero_grad(set_to_none=True)
    count, loss_sum = len(targets), 0.0
    for begin in range(0, count, LOSS_SLICE):
        end = min(begin + LOSS_SLICE, count)
        loss = chain_loss(backbone, chain, taps[begin:end], targets[begin:end]) * ((end - begin) / count)
        loss.backward()
        loss_sum += float(loss.detach())
    grads = {name: p.grad.detach().clone() for name, p in chain.named_parameters() if p.grad is not None}
    return loss_sum, grads


def scheduled_lr(peak: float, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based) of a job of `total_steps`: cosine decay from
    `peak` towards zero. Why (docs/training.md, "Learning-rate schedule"): with a constant rate
    the side chain ends its last epoch still jumping around, and which questions it gets right
    depends on the seed; decaying lets it settle (CLINC150 subset, 4 seeds: 62% -> 76%).
    A function of the step alone, so a resumed job and every pooled replica use the same rate."""
    if total_steps <= 1:
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_learning_rate(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(params: Any, spec: JobSpec) -> torch.optim.Optimizer:
    """The job's optimiser: the coordinator's and every pooled replica's are the same."""
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def weighted(grads: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """A device's contribution to a step: its mean gradients times its share of the step's
    target tokens (`tokens / total`, the same Python float wherever it is computed)."""
    return {name: grad * share for name, grad in grads.items()}


def fold(terms: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The sum of `terms` added in the order given. Pooled replicas rebuild the coordinator's sum
    from its running total and the later terms: the same additions in the same order give the
    same bits on every device."""
    total = {name: value.clone() for name, value in terms[0].items()}
    for term in terms[1:]:
        if term.keys() != total.keys():
            raise ValueError("gradient terms name different parameters")
        for name, value in term.items():
            total[name] += value
    return total


def apply_gradients(module: Any, optimizer: Any, grads: dict[str, torch.Tensor], max_grad_norm: float,
                    lr: float) -> None:
    """Set the (possibly averaged) gradients, clip, and take one optimiser step at rate `lr`."""
    params = dict(module.named_parameters())
    for name, grad in grads.items():
        params[name].grad = grad
    trainable = [p for p in params.values() if p.requires_grad and p.grad is not None]
    if max_grad_norm:
        # The norm in float64, summed in parameter order: replicas with other thread counts
        # (whose float32 reductions split differently) still clip by the same factor.
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in trainable))
        scale = max_grad_norm / (norm + 1e-6)
        if scale < 1.0:
            for p in trainable:
                p.grad.mul_(scale)
    set_learning_rate(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def weights_digest(module: Any) -> str:
    """SHA-256 of a module's parameters (names and float bits, in name order). Pooled replicas
    report it after each step: equal digests mean bit-equal side chains."""
    digest = hashlib.sha256()
    for name, value in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- checkpoints -----------------------------------------------------------------------------

@dataclass
class Checkpoint:
    spec: JobSpec
    step: int                                  # optimiser steps completed
    weights: dict[str, torch.Tensor]           # trainable tensors by name
    optimizer: dict[str, Any]                  # torch optimiser state_dict
    losses: list[float] = field(default_factory=list)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Tensors first, then the JSON that names their step: a crash between the two leaves the
    previous JSON, which then disagrees with the tensors' step and is caught on load."""
    from safetensors.torch import save_file

    tensors = {f"w.{k}": v.detach().contiguous().cpu() for k, v in checkpoint.weights.items()}
    opt_state, opt_meta = optimizer_to_tensors(checkpoint.optimizer)
    tensors.update(opt_state)
    with atomic_path(Path(folder) / CHECKPOINT_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(checkpoint.step)})
    meta = {"spec": checkpoint.spec.to_dict(), "step": checkpoint.step, "losses": checkpoint.losses,
            "optimizer": opt_meta}
    atomic_write_text(Path(folder) / CHECKPOINT_JSON, json.dumps(meta))


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The last checkpoint in `folder`, or None if there is none."""
    from safetensors import safe_open

    folder = Path(folder)
    meta_path, tensor_path = folder / CHECKPOINT_JSON, folder / CHECKPOINT_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        with safe_open(str(tensor_path), "pt") as f:
            if int(f.metadata().get("step", -1)) != meta["step"]:
                raise ValueError("tensors and JSON are from different steps")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, KeyError) as exc:
        raise HearthError(f"{folder}: unreadable checkpoint ({exc}); start again without --resume") from None
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
    optimizer = optimizer_from_tensors(tensors, meta["optimizer"])
    return Checkpoint(JobSpec.from_dict(meta["spec"]), meta["step"], weights, optimizer, meta["losses"])


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state_dict as tensors `o.<param index>.<key>` and JSON-ready rest (checkpoints,
    and the state a pooled replica is given); `optimizer_from_tensors` undoes it."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state.get("state", {}).items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"o.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state.get("param_groups", []), "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("o."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
