"""Parallel adapters (PAC): a trainable side chain beside a frozen decoder-only backbone.

ALGORITHMS.md section 1. The backbone runs without gradients; forward hooks copy the output hidden
state h_i of each tapped layer i. The chain's inputs are, for each tap, a running mean of h_i
over the sequence so far, weighted towards the latest tokens (the `means` inputs, first), and h_i
at the position itself (last, so that the final input is h_L). Starting at a_0 = 0, for each
input x_k in order it adds
    a_k = a_prev + Up_k(act(Down_k(z_k + a_prev))),   z_k = (x_k - mean_k) / std_k
with Up_k initialised to zero. The model's logits are LMHead(FinalNorm(h_L + rms(h_L) * a_last)),
using the backbone's own final norm and LM head (frozen). With Up at zero this is exactly the base
model.

Why standardised inputs and a scaled output (docs/training.md, "Input statistics"): a small
model's hidden states have a few channels hundreds of times larger than the rest, so a per-token
norm squeezes the informative channels to nothing; and the last hidden state's scale (RMS about
33 in SmolLM2-135M) dwarfs what zero-initialised Up layers add in a few dozen steps. mean_k and
std_k are fixed per channel, measured once on the job's own first samples (`calibrate`), and
saved with the chain.

Why running means (docs/training.md, "Running means"): the chain has no attention, so at an
answer's first token it saw only the backbone's state at that one position, and learned the
training questions rather than what they ask; the mean of each tapped layer over every token so
far, weighted towards the latest tokens, summarises the question for one sum per tap (CLINC150
subset: 70% -> 94%). It keeps the chain per token: a position's inputs are still a fixed function of the frozen
backbone's states up to it, so the activation cache stores just the labelled positions, and the
loss is computed on just those; in generation the running sums are carried with the KV cache
(`ChainPast`).

What is not here: the training loop (trainer.py), caching (activation_cache.py), generation
(torch_engine.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import HearthError
from training.data import IGNORE, Batch


# Per token back, the weight of a state in a running mean: 0.9 weighs about the last ten tokens
# most, so at an answer's first token the mean is mostly the question (docs/training.md, "Running
# means": CLINC150 subset 88% with the plain mean, 94% with this).
MEAN_DECAY = 0.9


@dataclass
class SideChainConfig:
    hidden_size: int
    num_layers: int
    taps: list[int]          # 0-based decoder layers, ascending; the last is num_layers - 1
    bottleneck: int
    # How the chain reads its taps. Chains saved before input statistics existed lack the field
    # and are refused by `from_dict` (their weights expect per-token RMS-normalised inputs).
    inputs: str = "standardised"
    # Taps whose running mean over the sequence is an input too (a subset of `taps`), weighted
    # by `mean_decay` per token back. Chains saved before running means existed lack the fields:
    # none, and they work as they did.
    means: list[int] = field(default_factory=list)
    mean_decay: float = MEAN_DECAY

    def __post_init__(self) -> None:
        if not 0.0 < self.mean_decay <= 1.0:
            raise HearthError(f"side chain: mean_decay must be in (0, 1] (got {self.mean_decay})")
        if not set(self.means) <= set(self.taps):
            raise HearthError(f"side chain: running means of layers {sorted(set(self.means) - set(self.taps))} "
                              "that are not tapped")

    @property
    def n_inputs(self) -> int:
        """Inputs per position: one per running mean, then one per tap."""
        return len(self.means) + len(self.taps)

    @classmethod
    def for_backbone(cls, backbone: Any, every: int = 3, reduction: int = 8) -> "SideChainConfig":
        """Taps every `every`-th layer and the last; bottleneck = hidden size / `reduction`."""
        config = backbone.config
        layers = int(config.num_hidden_layers)
        d = int(config.hidden_size)
        if every < 1 or reduction < 1:
            raise HearthError("side chain: tap spacing and reduction must be at least 1")
        taps = default_taps(layers, every)
        return cls(d, layers, taps, max(1, d // reduction), means=list(taps))

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
        d, b, n = config.hidden_size, config.bottleneck, config.n_inputs
        self.downs = nn.ModuleList(nn.Linear(d, b) for _ in range(n))
        self.ups = nn.ModuleList(nn.Linear(b, d) for _ in range(n))
        self.act = nn.GELU()
        # Per input and channel; buffers, not trained. Identity until `calibrate`.
        self.register_buffer("input_mean", torch.zeros(n, d))
        self.register_buffer("input_std", torch.ones(n, d))
        for up in self.ups:
            # Zero Up: the untrained chain adds nothing, so step 0 is the pretrained model.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    @torch.no_grad()
    def calibrate(self, taps: torch.Tensor) -> None:
        """Set each input's per-channel mean and standard deviation from `taps` [N, n_inputs, d].

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
        """`taps` [..., n_inputs, d] (float; `chain_inputs`) -> the delta for h_L [..., d]."""
        a = torch.zeros_like(taps[..., 0, :])
        for k in range(self.config.n_inputs):
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


@dataclass
class ChainPast:
    """What generation carries from one call to the next: the backbone's KV cache, and per row
    the decayed sums of the `means` taps' states and of their weights (`chain_inputs`)."""
    kv: Any
    sums: torch.Tensor | None      # [B, len(means), d] float32
    weights: torch.Tensor | None   # [B, 1, 1]


def chain_inputs(config: SideChainConfig, states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 past: ChainPast | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chain's inputs [B, T, n_inputs, d] from the tapped states [B, T, n_taps, d] (float32)
    of T new positions: for each `means` tap, the exponentially weighted mean of its states over
    the real (unmasked) tokens up to each position, then the states themselves. With decay g per
    token: S = g S + h, W = g W + 1, mean = S / W (both bounded, so any length is safe; g = 1
    would be the plain mean). Carries on from the sums in `past`, and returns them after the
    last position for the next call. A position before any real token (left padding) gets zero."""
    if not config.means:
        return states, None, None
    batch, length = states.shape[:2]
    which = [config.taps.index(i) for i in config.means]
    values = states[:, :, which]
    if past is not None and past.sums is not None:
        sums, weights = past.sums, past.weights
    else:
        sums, weights = torch.zeros_like(values[:, 0]), torch.zeros(batch, 1, 1)
    real = (torch.ones(batch, length) if attention_mask is None
            else attention_mask[:, -length:].to(torch.float32))[:, :, None, None]
    decay = config.mean_decay
    means = []
    # One position at a time: T small steps are cheaper than a [T, T] weight matrix per row,
    # and a padded position must leave the sums as they were.
    for t in range(length):
        keep = real[:, t]
        sums = torch.where(keep > 0, decay * sums + values[:, t], sums)
        weights = torch.where(keep > 0, decay * weights + 1.0, weights)
        means.append(sums / weights.clamp(min=1.0))
    return torch.cat([torch.stack(means, dim=1), states], dim=-2), sums, weights


def backbone_taps(backbone: Any, config: SideChainConfig, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, past: ChainPast | None = None,
                  use_cache: bool = False) -> tuple[torch.Tensor, ChainPast | None]:
    """Run the frozen backbone (decoder only, no LM head, no gradients) on `input_ids`, after
    what `past` holds.

    Returns the chain's inputs [B, T, n_inputs, d] in float32 (`chain_inputs`) and, when
    `use_cache`, the `ChainPast` to pass with the next tokens."""
    with torch.no_grad(), record_taps(backbone, config.taps) as seen:
        out = backbone.model(input_ids=input_ids, attention_mask=attention_mask,
                             cache=past.kv if past is not None else None, use_cache=use_cache)
    states = torch.stack([seen[i].float() for i in config.taps], dim=-2)
    inputs, sums, weights = chain_inputs(config, states, attention_mask, past)
    return inputs, (ChainPast(out.cache, sums, weights) if use_cache else None)


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
    """Mean cross-entropy of the targets given chain inputs [N, n_inputs, d] at their positions."""
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
