"""Structured pruning (FedSpine): attention heads and MLP channels physically removed.

What it holds:
- importance scores per unit, from three sources: LoRA gradients (LoRAPrune-style, during
  training), calibration activations (pruning without training), or weight magnitudes (no data);
- a plan that removes the same number of units from every layer, so the result is an ordinary
  Llama config (smaller `intermediate_size`, fewer heads, explicit `head_dim`) that transformers,
  the GGUF writer and llama.cpp all load with no custom code;
- the physical removal itself (smaller matrices, not masks), also on a PEFT-wrapped model so that
  pruning and LoRA recovery can alternate.

Units. An MLP channel j is row j of gate and up and column j of down. A query head is its rows of
q and its columns of o ("query" granularity: k and v stay, and the same number of query heads
goes from every KV group so the grouping stays uniform). A KV group is its k and v rows plus all
its query heads ("group" granularity; SmolLM2-135M has only 3 groups, too coarse for 30%).

It does not train (the training job alternates `LoraImportance.update` with its own steps), save
models (see `save_pruned`) or export GGUF files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import HearthError

CHANNEL_ALIGN = 32   # llama.cpp quantises rows in blocks of 32 (Q4_1, Q8_0): keep the MLP width a multiple


@dataclass
class UnitScores:
    """Importance per unit: `heads` [layers, query heads] and `channels` [layers, intermediate]."""

    heads: torch.Tensor
    channels: torch.Tensor
    source: str = ""      # "lora-gradient", "activations", "magnitude"


@dataclass
class PrunePlan:
    """Which units every layer keeps (sorted indices), and the ratios that this achieves."""

    keep_heads: list[list[int]]        # query heads kept, per layer
    keep_kv: list[list[int]]           # KV groups kept, per layer
    keep_channels: list[list[int]]     # MLP channels kept, per layer
    head_ratio: float                  # fraction of query heads removed
    channel_ratio: float               # fraction of MLP channels removed
    granularity: str = "query"
    details: dict[str, Any] = field(default_factory=dict)


def _layers(model: Any) -> list[Any]:
    base = model
    # A PEFT wrapper keeps the transformers model two levels down.
    while not hasattr(base, "layers"):
        for name in ("base_model", "model"):
            if hasattr(base, name):
                base = getattr(base, name)
                break
        else:
            raise HearthError("pruning: not a Llama-style model (no decoder layers found)")
    return list(base.layers)


def _config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in ("llama", "mistral", "qwen2"):
        raise HearthError("pruning: only Llama-architecture models can be pruned")
    return config


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _weight(linear: Any) -> torch.Tensor:
    """The frozen weight of a plain or LoRA-wrapped linear layer."""
    return getattr(linear, "base_layer", linear).weight


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    # Per layer, so that every layer's units compete on the same scale.
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-12)


# --- importance ------------------------------------------------------------------------------

def magnitude_importance(model: Any) -> UnitScores:
    """Data-free importance: the weight norms a unit owns (a fallback when there is no data)."""
    config = _config(model)
    d = _head_dim(config)
    heads, channels = [], []
    with torch.no_grad():
        for layer in _layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            q = _weight(attn.q_proj).float().view(-1, d, config.hidden_size)
            o = _weight(attn.o_proj).float().view(config.hidden_size, -1, d)
            heads.append(q.norm(dim=(1, 2)) * o.norm(dim=(0, 2)))
            gate_up = _weight(mlp.gate_proj).float().norm(dim=1) * _weight(mlp.up_proj).float().norm(dim=1)
            channels.append(gate_up * _weight(mlp.down_proj).float().norm(dim=0))
    return UnitScores(_normalise(torch.stack(heads)), _normalise(torch.stack(channels)), "magnitude")


def activation_importance(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> UnitScores:
    """Importance from calibration activations, for pruning without training.

    A unit scores the size of what it writes back to the residual stream, summed over tokens: a
    channel |activation| times the norm of its down column, a query head the norm of its attention
    output times the norm of its o columns. Padding tokens (attention_mask 0) do not count.
    """
    config = _config(model)
    d = _head_dim(config)
    layers = _layers(model)
    n = len(layers)
    heads = torch.zeros(n, config.num_attention_heads)
    channels = torch.zeros(n, config.intermediate_size)
    mask_box: list[torch.Tensor | None] = [None]
    hooks = []

    def on_down(index: int):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            m = mask_box[0]
            if m is not None:
                x = x * m.unsqueeze(-1)
            col_norm = _weight(module).float().norm(dim=0)
            channels[index] += x.abs().sum(dim=(0, 1)) * col_norm
        return hook

    def on_o(index: int):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            w = _weight(module).float()
            h = x.shape[-1] // d
            # |x_h| · ||W_o[:, h]|| (Wanda-style): a bound on the head's share of the output that
            # needs no per-head matrix products.
            token_norms = x.view(*x.shape[:-1], h, d).norm(dim=-1)
            m = mask_box[0]
            if m is not None:
                token_norms = token_norms * m.unsqueeze(-1)
            heads[index] += token_norms.sum(dim=(0, 1)) * w.view(w.shape[0], h, d).norm(dim=(0, 2))
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                mask_box[0] = mask.float() if mask is not None else None
                # The decoder stack only: the LM head's logits are not needed and cost 40% of the work.
                backbone = getattr(model, "model", model)
                backbone(input_ids=batch["input_ids"], attention_mask=mask)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise HearthError("pruning: the calibration data gave no batches")
    return UnitScores(_normalise(heads), _normalise(channels), "activations")


class LoraImportance:
    """LoRAPrune-style importance from the LoRA gradients the training step already has.

    For a LoRA layer W' = W + s·B·A the gradient of the merged weight is estimated as
    G = s·(dL/dB · A + B · dL/dA); an element scores |G ⊙ W'|, summed over the unit's rows and
    columns, normalised per layer and smoothed over iterations (EMA, 0.9 old). Only modules that
    carry LoRA contribute; LoRA on q/o (heads) and on gate/up/down (channels) is needed.
    Call `update(model)` after `loss.backward()` and before the optimiser zeroes the gradients.
    """

    def __init__(self, beta: float = 0.9):
        self.beta = beta
        self.scores: UnitScores | None = None
        self.updates = 0

    def update(self, model: Any) -> UnitScores:
        config = _config(model)
        d = _head_dim(config)
        heads, channels = [], []
        for layer in _layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            h = torch.zeros(_weight(attn.q_proj).shape[0] // d)
            q = _lora_score(attn.q_proj)
            if q is not None:
                h += q.view(-1, d, q.shape[1]).sum(dim=(1, 2))
            o = _lora_score(attn.o_proj)
            if o is not None:
                h += o.view(o.shape[0], -1, d).sum(dim=(0, 2))
            c = torch.zeros(_weight(mlp.gate_proj).shape[0])
            for name, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
                s = _lora_score(getattr(mlp, name))
                if s is not None:
                    c += s.sum(dim=dim)
            heads.append(h)
            channels.append(c)
        new = UnitScores(_normalise(torch.stack(heads)), _normalise(torch.stack(channels)), "lora-gradient")
        if float(new.heads.sum()) == 0 and float(new.channels.sum()) == 0:
            raise HearthError("pruning: no LoRA gradients found (call update after backward, with LoRA on q/o/MLP)")
        if self.scores is None or self.scores.heads.shape != new.heads.shape or self.scores.channels.shape != new.channels.shape:
            self.scores = new   # first step, or shapes changed by a pruning step: start afresh
        else:
            self.scores = UnitScores(
                self.beta * self.scores.heads + (1 - self.beta) * new.heads,
                self.beta * self.scores.channels + (1 - self.beta) * new.channels,
                "lora-gradient",
            )
        self.updates += 1
        return self.scores


def _lora_score(linear: Any) -> torch.Tensor | None:
    """|G ⊙ W'| for one LoRA-wrapped linear layer (default adapter), or None without LoRA grads."""
    lora_a = getattr(linear, "lora_A", None)
    lora_b = getattr(linear, "lora_B", None)
    if not lora_a or not lora_b:
        return None
    name = next(iter(lora_a.keys()))
    a, b = lora_a[name].weight, lora_b[name].weight
    if a.grad is None or b.grad is None:
        return None
    scale = float(linear.scaling[name])
    with torch.no_grad():
        a_, b_ = a.float(), b.float()
        grad = scale * (b.grad.float() @ a_ + b_ @ a.grad.float())
        merged = _weight(linear).float() + scale * (b_ @ a_)
        return (grad * merged).abs()


# --- the plan --------------------------------------------------------------------------------

def plan_pruning(
    model: Any,
    scores: UnitScores,
    ratio: float,
    granularity: str = "query",
    channel_align: int = CHANNEL_ALIGN,
) -> PrunePlan:
    """Remove about `ratio` of the heads and of the MLP channels, the same count in every layer.

    Counts are rounded to what the shapes allow (whole query heads per KV group, MLP width a
    multiple of `channel_align`); the plan records the ratios really achieved.
    """
    if not 0.0 <= ratio < 1.0:
        raise HearthError(f"pruning ratio must be at least 0 and below 1, got {ratio}")
    if granularity not in ("query", "group"):
        raise HearthError(f"pruning granularity must be 'query' or 'group', got {granularity!r}")
    config = _config(model)
    heads_now = scores.heads.shape[1]
    kv = config.num_key_value_heads
    per_group = heads_now // kv
    width = scores.channels.shape[1]

    keep_heads, keep_kv, keep_channels = [], [], []
    if granularity == "query":
        drop = _closest_count(per_group, ratio, keep_at_least=1)
        for row in scores.heads:
            kept = []
            for g in range(kv):
                group = row[g * per_group:(g + 1) * per_group]
                best = torch.argsort(group, descending=True)[: per_group - drop]
                kept += sorted(g * per_group + int(i) for i in best)
            keep_heads.append(kept)
            keep_kv.append(list(range(kv)))
        head_ratio = drop / per_group
    else:
        drop = _closest_count(kv, ratio, keep_at_least=1)
        for row in scores.heads:
            group_scores = row.view(kv, per_group).sum(dim=1)
            groups = sorted(int(i) for i in torch.argsort(group_scores, descending=True)[: kv - drop])
            keep_kv.append(groups)
            keep_heads.append([g * per_group + j for g in groups for j in range(per_group)])
        head_ratio = drop / kv

    target_keep = width * (1.0 - ratio)
    options = range(channel_align, width + 1, channel_align) if width >= channel_align else [width]
    keep_width = min(options, key=lambda k: (abs(k - target_keep), -k))
    for row in scores.channels:
        best = torch.argsort(row, descending=True)[:keep_width]
        keep_channels.append(sorted(int(i) for i in best))
    return PrunePlan(
        keep_heads, keep_kv, keep_channels,
        head_ratio=head_ratio,
        channel_ratio=1.0 - keep_width / width,
        granularity=granularity,
        details={"requested_ratio": ratio, "importance": scores.source},
    )


def _closest_count(total: int, ratio: float, keep_at_least: int) -> int:
    """How many of `total` units to drop so the dropped fraction is closest to `ratio` (ties: fewer)."""
    best = min(range(total - keep_at_least + 1), key=lambda k: (round(abs(k / total - ratio), 9), k))
    return best


# --- physical removal ------------------------------------------------------------------------

def apply_pruning(model: Any, plan: PrunePlan) -> None:
    """Cut the planned units out of `model` in place (a transformers Llama, optionally PEFT-wrapped).

    LoRA factors are cut along with their base weights (B rows for q/k/v/gate/up, A columns for
    o/down), so LoRA recovery continues on the smaller model.
    """
    config = _config(model)
    d = _head_dim(config)
    layers = _layers(model)
    if len(plan.keep_heads) != len(layers):
        raise HearthError(f"pruning plan is for {len(plan.keep_heads)} layers, the model has {len(layers)}")
    for layer, heads, groups, chans in zip(layers, plan.keep_heads, plan.keep_kv, plan.keep_channels):
        attn, mlp = layer.self_attn, layer.mlp
        q_rows = _expand(heads, d)
        kv_rows = _expand(groups, d)
        _cut(attn.q_proj, rows=q_rows)
        _cut(attn.k_proj, rows=kv_rows)
        _cut(attn.v_proj, rows=kv_rows)
        _cut(attn.o_proj, cols=q_rows)
        attn.num_key_value_groups = len(heads) // len(groups)
        idx = torch.tensor(chans)
        _cut(mlp.gate_proj, rows=idx)
        _cut(mlp.up_proj, rows=idx)
        _cut(mlp.down_proj, cols=idx)
    config.head_dim = d   # explicit: hidden_size / heads no longer gives it
    config.num_attention_heads = len(plan.keep_heads[0])
    config.num_key_value_heads = len(plan.keep_kv[0])
    config.intermediate_size = len(plan.keep_channels[0])
    for layer in layers:
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = config.intermediate_size


def _expand(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + i for u in units for i in range(size)], dtype=torch.long)


def _cut(linear: Any, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    base = getattr(linear, "base_layer", linear)
    with torch.no_grad():
        w = base.weight
        if rows is not None:
            w = w[rows]
            if base.bias is not None:
                base.bias = torch.nn.Parameter(base.bias[rows].clone(), requires_grad=base.bias.requires_grad)
        if cols is not None:
            w = w[:, cols]
        base.weight = torch.nn.Parameter(w.clone().contiguous(), requires_grad=base.weight.requires_grad)
        base.out_features, base.in_features = base.weight.shape
        # LoRA factors of this layer: B maps into the output rows, A reads the input columns.
        for lora_b in (getattr(linear, "lora_B", None) or {}).values():
            if rows is not None:
                _replace_weight(lora_b, lora_b.weight[rows])
        for lora_a in (getattr(linear, "lora_A", None) or {}).values():
            if cols is not None:
                _replace_weight(lora_a, lora_a.weight[:, cols])
        if hasattr(linear, "out_features") and linear is not base:
            linear.out_features, linear.in_features = base.out_features, base.in_features


def _replace_weight(linear: Any, weight: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(weight.clone().contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def prune(model: Any, scores: UnitScores, ratio: float, granularity: str = "query") -> PrunePlan:
    """Plan and apply in one step; returns the plan (with the achieved ratios)."""
    plan = plan_pruning(model, scores, ratio, granularity)
    apply_pruning(model, plan)
    return plan


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def write_hf_folder(model: Any, tokenizer: Any, folder: Path, dtype: str = "float16") -> None:
    """Plain safetensors + config.json + tokenizer files: `from_pretrained` needs no custom code.

    float16 by default: the source is a 4-bit GGUF, so half precision loses nothing that matters
    and an f16 GGUF export then holds exactly these weights. `model` is converted in place.
    """
    model = model.to(getattr(torch, dtype))
    # A model loaded from a GGUF file holds plain dequantised weights; transformers still marks it
    # as "quantised with gguf" and would refuse to save it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.tie_word_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))
    from training.model_store import quiet_transformers

    quiet_transformers()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text("utf-8"))
    if config.get("head_dim") is None:
        raise HearthError(f"{config_path}: pruned config lacks head_dim")


# --- one call for the command line ------------------------------------------------------------

@dataclass
class PruneResult:
    name: str
    folder: Path
    plan: PrunePlan
    parameters_before: int
    parameters_after: int


CALIBRATION_EXAMPLES = 32   # enough for stable activation statistics, a few seconds on a laptop


def calibration_batches(paths: Sequence[Path], tokenizer: Any, examples: int = CALIBRATION_EXAMPLES,
                        batch_size: int = 4, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Padded batches of `examples` samples taken from each source in turn (training.data): the
    first ones alone would be the first source's (a large notes folder would leave out the
    taught chats given after it)."""
    from training.data import collate, read_each_source, tokenize

    sources, refusal = [], None
    for chats in read_each_source(paths):
        try:
            sources.append(tokenize(chats, tokenizer, max_length))
        except HearthError as exc:
            # Calibration reads shorter windows than training: a source of long chats can have
            # nothing to learn in its first `max_length` tokens and still train; the others calibrate.
            refusal = exc
    samples = [source[i] for i in range(max(map(len, sources), default=0)) for source in sources
               if i < len(source)][:examples]
    if not samples:
        raise refusal or HearthError(f"{', '.join(str(p) for p in paths)}: no calibration samples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [vars(collate(samples[i:i + batch_size], pad)) for i in range(0, len(samples), batch_size)]


def prune_to_store(model_text: str, ratio: float, name: str, data: Sequence[Path] = (),
                   granularity: str = "query") -> PruneResult:
    """Prune a model and save it as a personalised model (format "hf") named `name`.

    Importance comes from calibration activations over `data` (its sources), or from weight
    magnitudes when no data is given. The folder is written atomically; an existing model of that name is replaced.
    """
    from datetime import datetime, timezone

    from core.atomic import atomic_dir, atomic_write_text
    from core.paths import hearth_paths
    from training.merge import merged_model
    from training.model_store import MANIFEST, PersonalModel, check_model_name, resolve

    if not 0.0 <= ratio < 1.0:
        raise HearthError(f"--ratio must be at least 0 and below 1, got {ratio}")
    check_model_name(name)
    ref = resolve(model_text)
    model, tokenizer = merged_model(ref)
    before = parameter_count(model)
    if data:
        scores = activation_importance(model, calibration_batches(data, tokenizer))
    else:
        scores = magnitude_importance(model)
    plan = prune(model, scores, ratio, granularity)
    after = parameter_count(model)
    folder = hearth_paths().models_dir / name
    manifest = PersonalModel(
        name=name,
        base=ref.personal.base if ref.personal else model_text,
        method="pruned",
        format="hf",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pruning_ratio=ratio,
        parameters=after,
        details={
            "pruned_from": model_text,
            "head_ratio": round(plan.head_ratio, 4),
            "channel_ratio": round(plan.channel_ratio, 4),
            "parameters_removed": round(1.0 - after / before, 4),
            "granularity": granularity,
            "importance": scores.source,
            "attention_heads": model.config.num_attention_heads,
            "intermediate_size": model.config.intermediate_size,
        },
    )
    with atomic_dir(folder) as tmp:
        write_hf_folder(model, tokenizer, tmp)
        atomic_write_text(tmp / MANIFEST, manifest.to_json() + "\n")
    return PruneResult(name, folder, plan, before, after)
