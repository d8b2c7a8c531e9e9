"""LoRA through PEFT: the baseline the PAC side chain is measured against, and the mergeable path.

What is here (and reused by pruning, federated rounds and GGUF export):
- `LoraSettings` + `build_lora_model(base, settings)`: a PEFT LoRA model on a frozen base;
- `lora_loss` / `lora_step`: one training step on a padded `Batch` (loss on labelled tokens);
- `sliced_lora_loss`: the same loss (and, asked, its gradients) with the LM head run a slice of
  labelled positions at a time, for devices where the full-vocabulary logits are the peak;
- `adapter_state` / `load_adapter_state`: the adapter's tensors by name (to average or ship);
- `save_adapter` / `load_adapter`: a folder that `PeftModel.from_pretrained` loads;
- `merge_adapter`: the base model with the LoRA deltas folded into its weights.

What is not here: the training loop, checkpoints and resume (training/trainer.py), data loading
(training/data.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import HearthError
from training.data import Batch
from training.offline_bitsandbytes import import_bitsandbytes

# peft asks every model `is_gradient_checkpointing`, which the pinned transformers deprecates with
# a FutureWarning on each LoRA job and each adapter loaded for chat: theirs to change, not the
# user's to read.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# "all-linear" is PEFT's shorthand for every linear layer of the decoder except the LM head.
ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float | None = None            # None: 2 x rank
    dropout: float = 0.0
    targets: list[str] | str = ALL_LINEAR  # e.g. ["q_proj", "v_proj"]
    # Rank per module name pattern (FedSpine trains ranks that differ between layers).
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return f"r={self.rank} on {targets}"


def build_lora_model(base: Any, settings: LoraSettings) -> Any:
    """Wrap `base` (a transformers causal LM) in a PEFT LoRA model; only the adapters train."""
    import_bitsandbytes()   # before peft, which imports it: see training/offline_bitsandbytes.py
    from peft import LoraConfig, get_peft_model

    if settings.rank < 1:
        raise HearthError(f"LoRA rank must be at least 1 (got {settings.rank})")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.rank,
        lora_dropout=settings.dropout,
        target_modules=settings.targets,
        rank_pattern=dict(settings.rank_pattern),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(base, config)


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_loss(model: Any, batch: Batch) -> Any:
    """Mean next-token cross-entropy over the batch's labelled tokens."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


def sliced_lora_loss(model: Any, batch: Batch, backward: bool = False) -> float:
    """`lora_loss`'s value, with the full-vocabulary logits never made for the whole batch.

    The body runs once; its last hidden state is detached, and the LM head and cross-entropy run
    over LOSS_SLICE labelled positions at a time (PAC's slice, training/job.py), each slice's backward adding into the detached
    state's gradient; one backward then carries that through the body. The gradients are the
    whole loss's (up to summation order). Why: on SmolLM2 (49,152 tokens of vocabulary) the
    logits of 2 x 256 positions and their softmax and gradients are ~400 MB of a federated round's
    peak. `backward=False` only measures (call it under torch.no_grad())."""
    from torch import nn

    from training.job import LOSS_SLICE
    from training.parallel_adapters import labelled_positions

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, cols, targets = labelled_positions(batch)
    count = len(targets)
    if count == 0:
        raise HearthError("a batch with no labelled tokens has no loss")
    state = hidden.detach().requires_grad_(backward)
    total = 0.0
    for begin in range(0, count, LOSS_SLICE):
        end = min(begin + LOSS_SLICE, count)
        logits = causal.lm_head(state[rows[begin:end], cols[begin:end]]).float()
        loss = nn.functional.cross_entropy(logits, targets[begin:end], reduction="sum") / count
        if backward:
            loss.backward()
        total += float(loss.detach())
    if backward:
        hidden.backward(state.grad)
    return total


def lora_step(model: Any, optimizer: Any, batch: Batch, max_grad_norm: float = 1.0) -> float:
    """Forward, backward through the backbone (what LoRA cannot avoid), optimiser step."""
    import torch

    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = lora_loss(model, batch)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def adapter_state(model: Any) -> dict[str, Any]:
    """The LoRA tensors by PEFT name (detached copies), e.g. to average across devices."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise HearthError(f"adapter tensors do not fit this model (unexpected: {unexpected[0]})")


def save_adapter(model: Any, folder: Path) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `folder` (make it atomic by
    passing a folder from core.atomic.atomic_dir)."""
    model.save_pretrained(str(folder), safe_serialization=True)


def load_adapter(base: Any, folder: Path, trainable: bool = False) -> Any:
    """A PeftModel: `base` with the adapter saved in `folder`."""
    import_bitsandbytes()
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise HearthError(f"{folder}: no adapter_config.json (not a LoRA adapter folder)")
    return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)


def merge_adapter(model: Any) -> Any:
    """The base transformers model with the LoRA deltas added into its weights (PEFT wrapper gone)."""
    return model.merge_and_unload()
