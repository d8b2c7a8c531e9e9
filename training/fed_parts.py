"""Federated job parts (FedSpine, ALGORITHMS.md sections 5-7): what a device does in a round.

A federated job has one coordinator (training/federated.py) and several devices, each holding
its own data (`hearth worker --data PATH`) that never leaves it. A device serves:

- `fed.info`  how many conversations its local data holds (a count, never text).
- `fed.open`  load the job's base model (a file or a folder of files: the coordinator's, sent
              with the mesh's chunked file transfer, or the same catalog model found here with the
              same SHA-256s) and tokenise the local data with its tokenizer; answers `need_files`
              (names) when this device lacks some of the model's files.
- `fed.round` with the round's pruning ratio, LoRA rank r, keep-mask and the global LoRA state
              (unpruned coordinates): its first r slots in float32 (`a.`, `b.`), the rest as int8
              with a float32 scale per slot (`frozen8_a.`, `frozen8_b.`, `frozen8_a_scale.`,
              `frozen8_b_scale.`; none from a coordinator before 2026-12-06, and a device
              before then ignores them and trains the state cut to r slots):
              prune a copy of the base model by the mask, merge the frozen slots into its
              weights, train LoRA at rank r on the local data for the round's steps while
              gathering LoRAPrune-style importance from the LoRA gradients, and answer the r
              trained slots (unpruned coordinates), the mask applied, loss before/after,
              importance, timings.
- `fed.close` forget the job.

Pruning here is physical (training/pruning.apply_pruning on a copy of the base model), not a
mask: a device prunes to train faster and in less memory, which a mask would not give it, and the
physically pruned model is exactly the one the family model becomes. Alternation (ALGORITHMS.md
section 5): each round is a pruning step (the coordinator's consensus mask at this device's ratio)
followed by LoRA recovery steps whose gradients score the units for the next round's mask.

This module sends and receives nothing itself: mesh/job_parts.py calls it for requests from paired
devices. Only tensors and plain fields cross: no text of the local data, no pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.digest import file_sha256
from core.errors import HearthError
from training.open_jobs import OpenJobs
from training.part_fields import FED_CLOSE as CLOSE
from training.part_fields import FED_INFO as INFO
from training.part_fields import FED_OPEN as OPEN
from training.part_fields import FED_ROUND as ROUND
from training.part_fields import LocalData

MAX_JOBS = 2                 # open jobs per device (a coordinator that crashed leaves one behind)
# FedSpine's units are query heads and MLP channels; LoRA sits on the modules that own them.
LORA_TARGETS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA alpha = 2 x rank: the scale (alpha / rank) is the same at every rank, so B·A means the
# same thing whichever rank a device trains and the heterogeneous ranks can be averaged.
LORA_SCALE = 2.0


@dataclass
class FedSpec:
    """Everything that decides a federated job's result (sent to every device as JSON)."""

    name: str
    model: str
    rounds: int = 8
    target_sparsity: float = 0.3       # fraction of heads and MLP channels removed at the end
    local_steps: int = 10              # LoRA steps per device per round
    batch_size: int = 4
    lr: float = 1e-3
    max_length: int = 256
    seed: int = 0
    quorum: float = 1.0                # fraction of a round's devices whose reports close it early
    deadline_s: float | None = None    # a round closes this long after it opens (None: when all answered)

    def validate(self) -> None:
        if self.rounds < 1:
            raise HearthError(f"--rounds must be at least 1 (got {self.rounds})")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise HearthError(f"--sparsity must be at least 0 and below 1 (got {self.target_sparsity})")
        if self.local_steps < 1:
            raise HearthError(f"--local-steps must be at least 1 (got {self.local_steps})")
        if self.batch_size < 1:
            raise HearthError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not 0.0 < self.quorum <= 1.0:
            raise HearthError(f"--quorum must be above 0 and at most 1 (got {self.quorum})")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise HearthError(f"--deadline must be positive (got {self.deadline_s})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FedSpec":
        spec = cls(**json.loads(text))
        spec.validate()
        return spec


@dataclass
class ModelFile:
    """One file of the base model: what the coordinator offers and a device checks."""

    name: str
    sha256: str
    path: Path | None = None           # on the coordinator only

    def to_field(self) -> list[str]:
        return [self.name, self.sha256]


def model_files(path: Path) -> list[ModelFile]:
    """The files that make up a model: one GGUF file, or the plain files of a model folder."""
    path = Path(path)
    if path.is_file():
        return [ModelFile(path.name, file_sha256(path), path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.name == "config.json" for p in files):
        raise HearthError(f"{path}: not a model folder (no config.json)")
    return [ModelFile(p.name, file_sha256(p), p) for p in files]


# --- what crosses the link --------------------------------------------------------------------

@dataclass
class RoundOrder:
    """The coordinator's order for one device in one round."""

    round: int
    ratio: float
    rank: int
    steps: int
    keep_heads: torch.Tensor           # bool [layers, heads], unpruned coordinates
    keep_channels: torch.Tensor        # bool [layers, channels]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]   # module -> (A [R, in], B [out, R]), R >= rank

    def to_request(self, job: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """The slots to train in float32; those beyond `rank` (frozen) as int8 with a float32
        scale per slot (`frozen8_a.`, `frozen8_a_scale.`, ...: keys a device that read them as
        float16 `frozen_a.` ignores, rather than misreading int8 as values)."""
        from training.fedspine import quantise_slots

        fields = {"job": job, "round": self.round, "ratio": float(self.ratio), "rank": self.rank, "steps": self.steps}
        tensors = {"keep.heads": self.keep_heads.contiguous(), "keep.channels": self.keep_channels.contiguous()}
        for name, (a, b) in self.lora.items():
            tensors[f"a.{name}"] = a[:self.rank].float().contiguous()
            tensors[f"b.{name}"] = b[:, :self.rank].float().contiguous()
            if a.shape[0] > self.rank:
                for key, (values, scale) in (("a", quantise_slots(a[self.rank:], 1)),
                                             ("b", quantise_slots(b[:, self.rank:], 0))):
                    tensors[f"frozen8_{key}.{name}"] = values.contiguous()
                    tensors[f"frozen8_{key}_scale.{name}"] = scale.contiguous()
        return fields, tensors

    @classmethod
    def from_request(cls, fields: dict, tensors: dict | None) -> "RoundOrder":
        tensors = tensors or {}
        try:
            heads, channels = tensors["keep.heads"], tensors["keep.channels"]
        except KeyError:
            raise ValueError("fed.round: tensors keep.heads and keep.channels are required") from None
        if heads.dtype != torch.bool or channels.dtype != torch.bool or heads.dim() != 2 or channels.dim() != 2:
            raise ValueError("fed.round: keep masks must be 2-d bool tensors")
        lora = _factors_from(tensors, "fed.round")
        frozen = _frozen_from(tensors)
        if set(frozen) - set(lora):
            raise ValueError("fed.round: frozen LoRA slots of a module that has none to train")
        for name, (fa, fb) in frozen.items():
            a, b = lora[name]
            if fa.shape[1] != a.shape[1] or fb.shape[0] != b.shape[0]:
                raise ValueError(f"fed.round: frozen LoRA slots of {name[:60]!r} do not fit")
            lora[name] = (torch.cat([a, fa]), torch.cat([b, fb], dim=1))
        return cls(int(fields["round"]), float(fields.get("ratio", 0.0)), int(fields["rank"]), int(fields["steps"]),
                   heads, channels, lora)


@dataclass
class RoundReport:
    """What a device answers for one round (all tensors in unpruned coordinates)."""

    round: int
    samples: int                       # local examples it trained on
    steps: int
    loss_before: float                 # on its first batch, before the round's steps
    loss_after: float                  # the same batch after them
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    keep_heads: torch.Tensor
    keep_channels: torch.Tensor
    importance_heads: torch.Tensor     # LoRA-gradient importance; zero where pruned
    importance_channels: torch.Tensor
    prune_s: float = 0.0               # copying and pruning the base model, wrapping LoRA
    train_s: float = 0.0
    parameters: int = 0                # of the pruned model it trained

    def to_reply(self) -> tuple[dict, dict[str, torch.Tensor]]:
        fields = {"round": self.round, "samples": self.samples, "steps": self.steps,
                  "loss_before": self.loss_before, "loss_after": self.loss_after,
                  "prune_s": self.prune_s, "train_s": self.train_s, "parameters": self.parameters}
        tensors = {"keep.heads": self.keep_heads.contiguous(), "keep.channels": self.keep_channels.contiguous(),
                   "imp.heads": self.importance_heads.float().contiguous(),
                   "imp.channels": self.importance_channels.float().contiguous()}
        for name, (a, b) in self.lora.items():
            tensors[f"a.{name}"] = a.contiguous()
            tensors[f"b.{name}"] = b.contiguous()
        return fields, tensors

    @classmethod
    def from_reply(cls, fields: dict, tensors: dict | None) -> "RoundReport":
        tensors = tensors or {}
        try:
            return cls(int(fields["round"]), int(fields["samples"]), int(fields["steps"]),
                       float(fields["loss_before"]), float(fields["loss_after"]), _factors_from(tensors, "fed.round reply"),
                       tensors["keep.heads"].bool(), tensors["keep.channels"].bool(),
                       tensors["imp.heads"].float(), tensors["imp.channels"].float(),
                       float(fields.get("prune_s", 0.0)), float(fields.get("train_s", 0.0)),
                       int(fields.get("parameters", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"fed.round reply: incomplete ({exc})") from None


def _factors_from(tensors: dict, where: str, prefixes: tuple[str, str] = ("a.", "b."),
                  cast: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for key, a in tensors.items():
        if key.startswith(prefixes[0]):
            name = key[len(prefixes[0]):]
            b = tensors.get(f"{prefixes[1]}{name}")
            if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{where}: LoRA factors of {name[:60]!r} are missing or do not fit")
            out[name] = (a.float(), b.float()) if cast else (a, b)
    return out


def _frozen_from(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen slots of a round order, dequantised: int8 values and a float32 scale per slot."""
    from training.fedspine import dequantise_slots

    out = {}
    for name, (a, b) in _factors_from(tensors, "fed.round", ("frozen8_a.", "frozen8_b."), cast=False).items():
        a_scale, b_scale = tensors.get(f"frozen8_a_scale.{name}"), tensors.get(f"frozen8_b_scale.{name}")
        if (a.dtype != torch.int8 or b.dtype != torch.int8 or a_scale is None or b_scale is None
                or a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32
                or tuple(a_scale.shape) != (a.shape[0], 1) or tuple(b_scale.shape) != (1, b.shape[1])):
            raise ValueError(f"fed.round: frozen LoRA slots of {name[:60]!r} need int8 values and a scale per slot")
        out[name] = (dequantise_slots(a, a_scale), dequantise_slots(b, b_scale))
    return out


# --- the model's units ------------------------------------------------------------------------

def lora_module_name(layer: int, proj: str) -> str:
    return f"{layer}.{proj}"


def unit_layout(config: Any) -> Any:
    """FedSpine's view of a Llama config: which LoRA rows/columns belong to which head/channel."""
    from training.fedspine import ModuleUnits, UnitLayout

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    modules = {}
    for layer in range(config.num_hidden_layers):
        modules[lora_module_name(layer, "q_proj")] = ModuleUnits(layer, "heads", "rows", head_dim)
        modules[lora_module_name(layer, "o_proj")] = ModuleUnits(layer, "heads", "cols", head_dim)
        modules[lora_module_name(layer, "gate_proj")] = ModuleUnits(layer, "channels", "rows", 1)
        modules[lora_module_name(layer, "up_proj")] = ModuleUnits(layer, "channels", "rows", 1)
        modules[lora_module_name(layer, "down_proj")] = ModuleUnits(layer, "channels", "cols", 1)
    return UnitLayout(config.num_hidden_layers, config.num_attention_heads, config.intermediate_size, modules)


def module_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA module of an unpruned model."""
    from training.pruning import _layers

    shapes = {}
    for i, layer in enumerate(_layers(model)):
        for proj in LORA_TARGETS:
            parent = layer.self_attn if proj in ("q_proj", "o_proj") else layer.mlp
            out_f, in_f = getattr(parent, proj).weight.shape
            shapes[lora_module_name(i, proj)] = (int(in_f), int(out_f))
    return shapes


def mask_to_plan(keep_heads: torch.Tensor, keep_channels: torch.Tensor, kv_groups: int) -> Any:
    """A pruning.PrunePlan from a keep-mask; every KV group must keep as many query heads as every
    other (the grouping must stay uniform for the pruned model to be an ordinary Llama)."""
    from training.pruning import PrunePlan

    layers, heads = keep_heads.shape
    per_group = heads // kv_groups
    keep_h, keep_kv, keep_c = [], [], []
    for layer in range(layers):
        counts = keep_heads[layer].view(kv_groups, per_group).sum(dim=1).tolist()
        if len(set(counts)) != 1 or counts[0] < 1:
            raise ValueError(f"fed.round: keep mask of layer {layer} keeps {counts} query heads per KV group; "
                             "each group must keep the same number (at least one)")
        keep_h.append(torch.nonzero(keep_heads[layer]).flatten().tolist())
        keep_kv.append(list(range(kv_groups)))
        keep_c.append(torch.nonzero(keep_channels[layer]).flatten().tolist())
    if len({len(k) for k in keep_h}) != 1 or len({len(k) for k in keep_c}) != 1 or not keep_c[0]:
        raise ValueError("fed.round: every layer must keep the same number of heads and of channels")
    return PrunePlan(keep_h, keep_kv, keep_c, head_ratio=1 - len(keep_h[0]) / heads,
                     channel_ratio=1 - len(keep_c[0]) / keep_channels.shape[1])


# --- one job on this device -------------------------------------------------------------------

class FedJob:
    """A job's base model, the local examples tokenised for it, and its rounds."""

    def __init__(self, spec: FedSpec, model: Any, tokenizer: Any, examples: list[Any]):
        self.spec, self.model, self.tokenizer, self.examples = spec, model, tokenizer, examples
        for p in model.parameters():
            p.requires_grad_(False)   # read-only here: every round's model shares these weights
        self.layout = unit_layout(model.config)
        self.shapes = module_shapes(model)
        self.kv_groups = int(model.config.num_key_value_heads)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lock = threading.Lock()

    def _batches(self, round_index: int, steps: int) -> list[list[int]]:
        """The round's batches: a seeded walk through the local examples (the same on a rerun)."""
        n = len(self.examples)
        generator = torch.Generator().manual_seed(self.spec.seed * 100_003 + round_index)
        order: list[int] = []
        while len(order) < steps * self.spec.batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        size = min(self.spec.batch_size, n)
        return [order[i * size:(i + 1) * size] for i in range(steps)]

    def run_round(self, order: RoundOrder) -> RoundReport:
        from training.data import collate
        from training.fedspine import KeepMask, module_masks
        from training.lora import LoraSettings, build_lora_model, sliced_lora_loss, trainable_parameters
        from training.pruning import LoraImportance, apply_pruning

        layers, heads, channels = self.layout.layers, self.layout.heads, self.layout.channels
        if tuple(order.keep_heads.shape) != (layers, heads) or tuple(order.keep_channels.shape) != (layers, channels):
            raise ValueError("fed.round: the keep mask does not match this model's heads and channels")
        if set(order.lora) != set(self.shapes):
            raise ValueError("fed.round: the LoRA modules do not match this model")
        rank = min(order.rank, *(a.shape[0] for a, _ in order.lora.values()))
        if rank < 1 or order.steps < 1 or order.steps > 10_000:
            raise ValueError("fed.round: rank and steps must be positive")
        for name, (a, b) in order.lora.items():
            in_f, out_f = self.shapes[name]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise ValueError(f"fed.round: LoRA factors of {name} do not fit this model")
        plan = mask_to_plan(order.keep_heads, order.keep_channels, self.kv_groups)
        rows, cols = module_masks(self.layout, KeepMask(order.keep_heads, order.keep_channels))

        started = time.perf_counter()
        torch.manual_seed(self.spec.seed * 7919 + order.round)
        # Pruning step (FedSpine): a copy of the base model without the units the mask drops. The
        # copy shares the base's (frozen, never written) weights: pruning replaces the matrices
        # it cuts with new, smaller ones, so the rest (embedding and LM head, norms) need no
        # second copy. That halves a round's extra memory on a phone.
        model = copy.deepcopy(self.model, memo={id(p): p for p in self.model.parameters()})
        apply_pruning(model, plan)
        self._merge_frozen(model, order.lora, rank, rows, cols)
        model = build_lora_model(model, LoraSettings(rank=rank, alpha=LORA_SCALE * rank, targets=list(LORA_TARGETS)))
        modules = self._lora_modules(model)
        with torch.no_grad():
            for name, (a, b) in order.lora.items():
                a, b = a[:rank], b[:, :rank]
                a = a[:, cols[name]] if name in cols else a
                b = b[rows[name]] if name in rows else b
                lora_a, lora_b = modules[name]
                lora_a.weight.copy_(a)
                lora_b.weight.copy_(b)
        params = trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=self.spec.lr, weight_decay=0.0)
        prune_s = time.perf_counter() - started

        started = time.perf_counter()
        batches = [collate([self.examples[i] for i in batch], self.pad_id) for batch in self._batches(order.round, order.steps)]
        model.eval()   # no dropout; gradients still flow into the LoRA factors
        # The LM head runs a slice of positions at a time: a phone's round is then bound by the
        # body's activations, not by full-vocabulary logits (training/lora.py).
        with torch.no_grad():
            loss_before = sliced_lora_loss(model, batches[0])
        importance = LoraImportance()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            sliced_lora_loss(model, batch, backward=True)
            importance.update(model)   # LoRAPrune-style: from the gradients this step already has
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        with torch.no_grad():
            loss_after = sliced_lora_loss(model, batches[0])
        train_s = time.perf_counter() - started

        # Back to unpruned coordinates: pruned rows/columns are zero (the coordinator ignores them).
        factors = {}
        for name, (lora_a, lora_b) in modules.items():
            in_f, out_f = self.shapes[name]
            a = torch.zeros(rank, in_f)
            b = torch.zeros(out_f, rank)
            if name in cols:
                a[:, cols[name]] = lora_a.weight.detach().float()
            else:
                a.copy_(lora_a.weight.detach().float())
            if name in rows:
                b[rows[name]] = lora_b.weight.detach().float()
            else:
                b.copy_(lora_b.weight.detach().float())
            factors[name] = (a, b)
        scores = importance.scores
        imp_heads, imp_channels = torch.zeros(layers, heads), torch.zeros(layers, channels)
        if scores is not None:
            imp_heads[order.keep_heads] = scores.heads.float().flatten()
            imp_channels[order.keep_channels] = scores.channels.float().flatten()
        parameters = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        return RoundReport(order.round, len(self.examples), order.steps, loss_before, loss_after, factors,
                           order.keep_heads.clone(), order.keep_channels.clone(), imp_heads, imp_channels,
                           prune_s, train_s, parameters)

    @staticmethod
    def _merge_frozen(model: Any, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                      rows: dict[str, torch.Tensor], cols: dict[str, torch.Tensor]) -> None:
        """Add the slots beyond `rank` (frozen this round) to the pruned copy's weights: the
        device trains the global model, not the global model cut to `rank` slots. Each merged
        weight is a new tensor: an unpruned matrix of the copy is the base model's own."""
        for name, linear in FedJob._target_linears(model).items():
            a, b = lora[name]
            if a.shape[0] <= rank:
                continue
            a, b = a[rank:], b[:, rank:]
            a = a[:, cols[name]] if name in cols else a
            b = b[rows[name]] if name in rows else b
            weight = linear.weight
            merged = weight.detach().float() + LORA_SCALE * (b @ a)
            linear.weight = torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False)

    @staticmethod
    def _target_linears(model: Any) -> dict[str, Any]:
        from training.pruning import _layers

        out = {}
        for i, layer in enumerate(_layers(model)):
            for proj in LORA_TARGETS:
                parent = layer.self_attn if proj in ("q_proj", "o_proj") else layer.mlp
                out[lora_module_name(i, proj)] = getattr(parent, proj)
        return out

    @staticmethod
    def _lora_modules(model: Any) -> dict[str, tuple[Any, Any]]:
        return {name: (linear.lora_A["default"], linear.lora_B["default"])
                for name, linear in FedJob._target_linears(model).items()}


# --- the jobs a device serves ------------------------------------------------------------------

@dataclass
class FedJobs:
    """Every federated job open on this device; `handle` answers one request.

    `data` is this device's local data (never sent anywhere); `received_file(sha256, name)` says
    where a model file the coordinator sent would be (the mesh's file receiver decides).
    """

    data: LocalData = field(default_factory=LocalData)
    received_file: Any = None                      # Callable[[str, str], Path] | None
    local_model: Any = None                        # (model, tokenizer) already loaded here
    jobs: OpenJobs = field(default_factory=lambda: OpenJobs(MAX_JOBS, "federated job"))
    _models: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def handle(self, owner: str, type: str, fields: dict, tensors: dict | None) -> tuple[dict, dict | None]:
        try:
            return self._handle(owner, type, fields, tensors)
        except HearthError as exc:      # the mesh answers ValueError's message to the coordinator
            raise ValueError(str(exc)) from None

    def _handle(self, owner: str, type: str, fields: dict, tensors: dict | None) -> tuple[dict, dict | None]:
        if type == INFO:
            return {"examples": self.data.conversations, "sources": len(self.data.paths)}, None
        if type == OPEN:
            return self._open(owner, fields), None
        job = self.jobs.get(owner, fields["job"])
        if type == CLOSE:
            self.jobs.close(fields["job"])
            return {"closed": True}, None
        if type == ROUND:
            order = RoundOrder.from_request(fields, tensors)
            with job.lock:
                return job.run_round(order).to_reply()
        raise ValueError(f"unknown job part {type!r}")

    def _open(self, owner: str, fields: dict) -> dict:
        from training.data import read_sources, tokenize

        try:
            spec = FedSpec.from_json(fields["spec"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"fed.open: bad job spec ({exc})") from None
        files = fields["files"]
        if not files or not all(isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in files):
            raise ValueError("fed.open: field 'files' must be a list of [name, sha256] pairs")
        if not self.data.paths:
            raise ValueError("this device holds no local data (start it with `hearth worker --data PATH`)")
        loaded = self.local_model or self._model(spec, [ModelFile(n, s) for n, s in files])
        if isinstance(loaded, list):
            return {"need_files": loaded}
        model, tokenizer = loaded
        conversations = read_sources(self.data.paths)
        examples = tokenize(conversations, tokenizer, spec.max_length)
        self.jobs.make_room(fields["job"])
        self.jobs.put(owner, fields["job"], FedJob(spec, model, tokenizer, examples))
        return {"opened": True, "examples": len(examples)}

    def _model(self, spec: FedSpec, files: list[ModelFile]) -> tuple[Any, Any] | list[str]:
        """The base model if every file is here (this device's own catalog copy with the same
        SHA-256s, or copies the coordinator sent); otherwise the names of the missing files."""
        from training.model_store import load_torch, resolve

        key = json.dumps([f.to_field() for f in files])
        if key in self._models:
            return self._models[key]
        path = self._catalog_copy(spec.model, files)
        if path is None:
            found, missing = {}, []
            for f in files:
                candidate = Path(self.received_file(f.sha256, f.name)) if self.received_file else None
                if candidate is not None and candidate.is_file():
                    found[f.name] = candidate
                else:
                    missing.append(f.name)
            if missing:
                return missing
            path = found[files[0].name] if len(files) == 1 else _assemble(found, key)
        model, tokenizer = load_torch(resolve(str(path)))
        for p in model.parameters():
            p.requires_grad_(False)
        self._models = {key: (model, tokenizer)}   # one base model in memory at a time
        return model, tokenizer

    @staticmethod
    def _catalog_copy(model: str, files: list[ModelFile]) -> Path | None:
        from training.catalog import find_entry
        from training.model_store import resolve

        if find_entry(model) is None:          # a path names the coordinator's own files
            return None
        try:
            ref = resolve(model)
        except HearthError:
            return None
        if ref.path is None:
            return None
        try:
            here = model_files(ref.path)
        except (HearthError, OSError):
            return None
        return ref.path if [(f.name, f.sha256) for f in here] == [(f.name, f.sha256) for f in files] else None


def _assemble(found: dict[str, Path], key: str) -> Path:
    """A model folder of links to the files received one by one (each under its own SHA-256)."""
    from core.paths import hearth_paths

    folder = hearth_paths().cache_dir / "federated-models" / hashlib.sha256(key.encode()).hexdigest()[:32]
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        link = folder / name
        if link.is_symlink() or link.exists():
            if link.resolve() == path.resolve():
                continue
            link.unlink()
        os.symlink(path, link)
    return folder
