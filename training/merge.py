"""Plain merged weights for any model reference: LoRA adapters folded into their (pruned) base.

`merged_model(ref)` returns a transformers model whose weights are what the exported file will
hold. Parallel adapters (PAC) run beside the backbone on their own inputs and cannot be folded
into its matrices: such models are refused with a message that points to the torch engine.
It does not write files (see training.export_gguf and training.pruning.write_hf_folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import HearthError
from training.model_store import ModelRef, load_torch, resolve_base

UNMERGEABLE = ("pac",)


def can_merge(ref: ModelRef) -> bool:
    return not (ref.personal is not None and ref.personal.format in UNMERGEABLE)


def merged_model(ref: ModelRef, dtype: str = "float32") -> tuple[Any, Any]:
    """A transformers model with every adapter merged in, and its tokenizer."""
    personal = ref.personal
    if personal is not None and personal.format in UNMERGEABLE:
        raise HearthError(
            f"model {personal.name} has parallel adapters ({personal.format}), which cannot be merged "
            "into the weights: it cannot be exported to GGUF; chat with it through the torch engine"
        )
    if personal is not None and personal.format == "peft":
        return merge_lora(load_torch(resolve_base(personal), dtype), Path(ref.path))
    if personal is not None and personal.format not in ("hf", "gguf"):
        raise HearthError(f"model {personal.name}: unknown format '{personal.format}' in its manifest")
    return load_torch(ref, dtype)


def merge_lora(base: tuple[Any, Any], adapter_dir: Path) -> tuple[Any, Any]:
    """Fold the PEFT LoRA adapter saved in `adapter_dir` into `base` = (model, tokenizer)."""
    from training.lora import load_adapter, merge_adapter

    model, tokenizer = base
    merged = merge_adapter(load_adapter(model, adapter_dir))
    merged.eval()
    return merged, tokenizer
