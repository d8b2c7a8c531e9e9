"""Quantised frozen backbone (PAC+): the decoder's linear layers in bitsandbytes NF4 or int8.

ALGORITHMS.md section 3. Only the frozen backbone is quantised: embeddings, the final norm and
the LM head stay in float32 (the LM head is tied to the embeddings in small Llamas), and the
side chain and its optimiser stay float32. bitsandbytes runs these layers on the CPU (slower per
token than float32 here, but a quarter of the weight memory for NF4).

What is not here: loading the model (training.model_store.load_torch, which hands each layer to
`quantize_layer` as it arrives where the loader reads layer by layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import HearthError
from core.memory import return_freed_memory
from training.job_defaults import QUANT_MODES
from training.offline_bitsandbytes import import_bitsandbytes


def quantize_backbone(model: Any, mode: str) -> int:
    """Replace every nn.Linear inside the decoder layers with its bitsandbytes version, in place.
    Returns the number of layers replaced (layers already quantised, e.g. while loading, count
    nothing). The float32 weights are freed as they go."""
    check_mode(mode)
    if mode == "none":
        return 0
    replaced = sum(quantize_layer(layer, mode) for layer in model.model.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    return_freed_memory()  # the float32 weights just replaced
    return replaced


def check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise HearthError(f"--quant must be one of {', '.join(QUANT_MODES)} (got {mode})")


def quantize_layer(layer: nn.Module, mode: str) -> int:
    """Quantise one decoder layer's nn.Linear modules in place; the number replaced. Called by
    loaders that fill a model layer by layer, so the whole float32 model never exists at once."""
    bnb = import_bitsandbytes()   # never the Hub's kernels: see training/offline_bitsandbytes.py

    replaced = 0
    for parent in list(layer.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            setattr(parent, child_name, _quantized(bnb, child, mode))
            replaced += 1
    return replaced


def _quantized(bnb: Any, linear: nn.Linear, mode: str) -> nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.data.float()
    if mode == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                              compute_dtype=torch.float32, quant_type="nf4")
        # Always bitsandbytes' dequantise-and-multiply in float32, as in training mode. In eval
        # mode on AVX512-BF16 CPUs it would repack the weights for a bf16 kernel instead: other
        # numerics, and +30-50 MB at a PAC job's peak (measured; docs/training.md).
        q.support_avx512bf16_for_cpu = False
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.float(), requires_grad=False)
    return q.to("cpu")  # the move to a device is when bitsandbytes quantises


def weight_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (quantised storage counted as stored)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    return total
