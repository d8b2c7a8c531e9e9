"""Parallel adapters (PAC): a trainable side chain beside a frozen decoder-only backbone.

ALGORITHMS.md section 1. The backbone runs without gradients; forward hooks copy the output hidden
state h_i of each tapped layer i. The side chain starts at a_0 = 0 and for each tap in order adds
    a_i = a_prev + Up_i(act(Down_i(z_i + a_prev))),   z_i = (h_i - mean_i) / std_i
with Up_i initialised to zero. The model's logits are LMHead(FinalNorm(h_L + rms(h_L) * a_last)),
using the backbone's own final norm and LM head (frozen). With Up at zero this is exactly the base
model.

Why standardised inputs and a scaled output (docs/training.md, "Input statistics"): a small
model's hidden states have a few channels hundreds of times larger than the rest, so a per-token
norm squeezes the informative channels to nothing; and the last hidden state's scale (RMS about
33 in SmolLM2-135M) dwarfs what zero-initialised Up layers add in a few dozen steps. mean_i and
std_i are fixed per channel, measured once on the job's own first samples (`calibrate`), and
saved with the chain.

The chain is per token (no attention), so only the positions whose next token carries a label
matter for training: the activation cache stores just those, and the loss is computed on just
those. A side chain with attention would have to cache every position (see activation_cache.py).

What is not here: the training loop (trainer.py), caching (activation_cache.py), generation
(torch_engine.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from core.errors import HearthError
from training.data import IGNORE, Batch


@dataclass
class SideChainConfig:
    hidden_size: int
    num_layers: int
    taps: list[int]          # 0-based decoder layers, ascending; the last is num_layers - 1
    bottleneck: int
    # How the chain reads its taps. Chains saved before input statistics existed lack the field
    # and are refused by `from_dict` (their weights expect per-token RMS-normalised inputs).
    inputs: str = "standardised"

    @classmethod
    def for_backbone(cls, backbone: Any, every: int = 3, reduction: int = 8) -> "SideChainConfig":
        """Taps every `every`-th layer and the last; bottleneck = hidden size / `reduction`."""
        config = backbone.config
        layers = int(config.num_hidden_layers)
        d = int(config.hidden_size)
        if every < 1 or reduction < 1:
            raise HearthError("side chain: tap spacing and reduction must be at least 1")
        return cls(d, layers, default_taps(layers, every), max(1, d // reduction))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SideChainConfig":
        if data.get("inputs") != "standardised":
            raise HearthError("this side chain was trained by an earlier Hearth (per-token normalised inputs); "
                              "train the model again")
        return cls(**data)


def default_taps(num_layers: int, every: int) -> list[int]:
    taps = list(range(every - 1, num_layers, every))
    if not taps or taps[-1] != num_layers - 1:
        taps.append(num_layers - 1)
    return taps


class SideChain(nn.Module):
    """The trainable part: Down + Up per tap, and each tap's fixed input statistics."""

    def __init__(self, config: SideChainConfig):
        super().__init__()
        self.config = config
        d, b, n = config.hidden_size, config.bottleneck, len(config.taps)
        self.downs = nn.ModuleList(nn.Linear(d, b) for _ in config.taps)
        self.ups = nn.ModuleList(nn.Linear(b, d) for _ in config.taps)
        self.act = nn.GELU()
        # Per tap and channel; buffers, not trained. Identity until `calibrate`.
        self.register_buffer("input_mean", torch.zeros(n, d))
        self.register_buffer("input_std", torch.ones(n, d))
        for up in self.ups:
            # Zero Up: the untrained chain adds nothing, so step 0 is the pretrained model.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    @torch.no_grad()
    def calibrate(self, taps: torch.Tensor) -> None:
        """Set each tap's per-channel mean and standard deviation from `taps` [N, n_taps, d].

        A channel that hardly varies gets a floor of 1% of its tap's median deviation, so that
        an unusual token cannot blow it up by dividing by almost zero."""
        taps = taps.float()
        if taps.shape[0] < 2:
            raise HearthError("side chain: at least two labelled positions are needed to calibrate")
        std = taps.std(dim=0)
        floor = 0.01 * std.median(dim=-1, keepdim=True).values
        self.input_mean.copy_(taps.mean(dim=0))
        self.input_std.copy_(std + floor)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """`taps` [..., n_taps, d] (float) -> the delta for h_L [..., d]."""
        a = torch.zeros_like(taps[..., 0, :])
        for k in range(len(self.config.taps)):
            z = (taps[..., k, :] - self.input_mean[k]) / self.input_std[k]
            a = a + self.ups[k](self.act(self.downs[k](z + a)))
        # In units of h_L's own per-token scale, so that Up's small early weights already matter.
        last = taps[..., -1, :]
        return a * last.square().mean(dim=-1, keepdim=True).sqrt()


# exp(-87.3) is float32's smallest normal number; see `chain_loss`.
SOFTMAX_RANGE = 80.0


def freeze(backbone: Any) -> None:
    """Backbone, embeddings and LM head are frozen; dropout off (the cache depends on it)."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)


def decoder_layers(backbone: Any) -> Any:
    try:
        return backbone.model.layers
    except AttributeError:
        raise HearthError(f"{type(backbone).__name__}: not a decoder-only model with .model.layers") from None


@contextlib.contextmanager
def record_taps(backbone: Any, taps: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks that keep the output hidden state of each tapped layer (detached)."""
    seen: dict[int, torch.Tensor] = {}
    layers = decoder_layers(backbone)
    handles = []
    for i in taps:
        def hook(_module, _inputs, output, i=i):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[i] = hidden.detach()
        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def backbone_taps(backbone: Any, config: SideChainConfig, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                  use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """Run the frozen backbone (decoder only, no LM head, no gradients).

    Returns taps [B, T, n_taps, d] in float32 and the KV cache (when `use_cache`)."""
    with torch.no_grad(), record_taps(backbone, config.taps) as seen:
        out = backbone.model(input_ids=input_ids, attention_mask=attention_mask,
                             past_key_values=past_key_values, use_cache=use_cache)
    stacked = torch.stack([seen[i].float() for i in config.taps], dim=-2)
    return stacked, (out.past_key_values if use_cache else None)


def head_logits(backbone: Any, chain: SideChain, taps: torch.Tensor) -> torch.Tensor:
    """LMHead(FinalNorm(h_L + rms(h_L) * a_last)); gradients flow into the chain only."""
    a = chain(taps)
    hidden = taps[..., -1, :] + a
    norm = backbone.model.norm
    lm_head = backbone.get_output_embeddings()
    dtype = lm_head.weight.dtype
    return lm_head(norm(hidden.to(dtype))).float()


def labelled_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets): each position whose next token carries a label, and that label."""
    next_labels = batch.labels[:, 1:]
    rows, cols = torch.nonzero(next_labels != IGNORE, as_tuple=True)
    return rows, cols, next_labels[rows, cols]


def chain_loss(backbone: Any, chain: SideChain, taps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the targets given taps [N, n_taps, d] at their positions."""
    return floored_cross_entropy(head_logits(backbone, chain, taps), targets)


def floored_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with logits more than SOFTMAX_RANGE below their row's largest raised to that:
    their probability (below 2e-35) changes nothing, but left alone, exp() turns them into
    subnormal floats, which the CPU computes several times slower. A confident side chain spreads
    its logits that far: adapter steps went from 0.068 to 0.18 s in later epochs (docs/training.md).
    The target's own logit is never floored, so a badly wrong answer keeps its full loss and
    gradient."""
    floor = logits.detach().amax(dim=-1, keepdim=True) - SOFTMAX_RANGE
    column = targets.unsqueeze(-1)
    floored = torch.maximum(logits, floor).scatter(-1, column, logits.gather(-1, column))
    return nn.functional.cross_entropy(floored, targets)


def full_logits(backbone: Any, chain: SideChain, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at every position (for tests and evaluation)."""
    taps, _ = backbone_taps(backbone, chain.config, input_ids, attention_mask)
    return head_logits(backbone, chain, taps)
