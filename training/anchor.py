"""Keep what the base model knows: a PAC job's pull towards the frozen base on general chats.

Trained on a household's facts alone, a side chain also fires on general questions ("Who wrote
Romeo and Juliet?" -> "Your dog is called Biscuit."). The anchor adds to each adapter step the KL
divergence from the base model's next-token distribution to the personalised one, at the answer
positions of a few dozen general chats of our own (`assets/train/general_anchor.jsonl`, none of
them a question of the general evaluation set, `assets/eval/general_questions.jsonl`).

PAC's base is its backbone with the side chain off, so a step needs no backbone work for it (only
the chain and the LM head on its positions): the anchor's chain inputs and the base's distribution
there are computed once per base (one backbone pass over the chats, 615 positions in SmolLM2's
tokens, about 4 s) and kept on disk (`job_anchor`), as the activation cache keeps a job's own
data. The base's distribution is kept as its `TOP_K` most likely tokens plus one bucket for all
the rest, and the KL is taken over those K + 1 outcomes: exact for that partition, zero (with zero
gradient) when the chain leaves the base as it is. Each step draws `POSITIONS` anchor positions,
fixed by seed and step, so a resumed job draws the same ones.

Why, measured (docs/training.md, "What personalisation costs in general knowledge"): after the
household set's 25 epochs, SmolLM2-135M answered 8-13 of 40 general questions it answered 27 of
before; anchored, 24-25, with the same household recall (15-17 of 20), and the job 1.75-1.9x as
long. Fewer epochs did not help (5 epochs: 5 of 40).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_bytes
from core.paths import hearth_paths
from training.activation_cache import CacheKey, tokenizer_fingerprint
from training.data import examples_fingerprint, read_conversations, tokenize

ANCHOR_CHATS = "train/general_anchor.jsonl"   # inside the `assets` package
TOP_K = 32          # the base's most likely tokens kept per position (the rest is one bucket)
POSITIONS = 32      # anchor positions per adapter step (16, 32 and 64 kept as much; fewer cost less)
HEAD_ROWS = 16      # positions per LM head pass while the base's distribution is taken
# Anchors kept on disk, the most recently used (14 MB each for SmolLM2): a household has a few
# bases (the bundled one, its pruned copies, a downloaded one); a base pruned again or deleted
# leaves its anchor behind, and nothing else would ever remove it.
KEPT_ANCHORS = 4


@dataclass
class Anchor:
    """The anchor positions' chain inputs and the base's distribution at each of them."""

    taps: torch.Tensor       # [N, n_inputs, d] float16, as the activation cache keeps them
    top_ids: torch.Tensor    # [N, K] long: the base's K most likely next tokens
    top_logp: torch.Tensor   # [N, K] float32: their log-probabilities
    rest_logp: torch.Tensor  # [N] float32: log of the probability of every other token

    def __len__(self) -> int:
        return len(self.top_ids)

    def positions(self, seed: int, step: int) -> torch.Tensor:
        """The positions step `step` uses: a function of seed and step only."""
        generator = torch.Generator().manual_seed(seed * 100_003 + 7_919 * (step + 1))
        return torch.randperm(len(self), generator=generator)[:POSITIONS]


def anchor_examples(tokenizer: Any, max_length: int = 512) -> list:
    with resources.as_file(resources.files("assets").joinpath(ANCHOR_CHATS)) as path:
        return tokenize(read_conversations(path), tokenizer, max_length)


def job_anchor(backbone: Any, chain_config: Any, batch_size: int = 4) -> Anchor | None:
    """The anchor of a job on `backbone` (a trainer.Backbone): kept on disk per base and side
    chain layout, so only the first job of a base pays for its backbone pass (a family retrains
    after every few taught answers). None for a model without a chat template (it is trained on
    notes, and would never be asked a chat question)."""
    tokenizer = backbone.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    examples = anchor_examples(tokenizer)
    path = anchor_path(backbone.identity, tokenizer, chain_config, examples)
    anchor = load_anchor(path, chain_config)
    if anchor is None:
        anchor = build_anchor(backbone.model, tokenizer, chain_config, examples, batch_size)
        save_anchor(anchor, path)
        forget_old_anchors(path.parent, keep=KEPT_ANCHORS)
    else:
        try:
            os.utime(path)   # recently used: the last to be forgotten
        except OSError:
            pass             # another job forgot it just now: it is read already
    return anchor


def forget_old_anchors(folder: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` most recently used anchors in `folder`; returns those removed.
    A job that was about to read one removed here builds it again (load_anchor: None)."""
    used = {}
    for path in folder.glob("*.safetensors"):
        try:
            used[path] = path.stat().st_mtime
        except OSError:
            continue         # removed meanwhile by another job
    removed = sorted(used, key=used.get, reverse=True)[keep:]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def anchor_path(identity: str, tokenizer: Any, chain_config: Any, examples: list) -> Path:
    """Where the anchor of this base (its weights' identity, trainer.load_backbone), tokenizer,
    chain inputs and anchor chats is kept: keyed as an activation cache is."""
    key = CacheKey(identity, tokenizer_fingerprint(tokenizer), examples_fingerprint(examples),
                   tuple(chain_config.taps), "float16", tuple(chain_config.means), chain_config.mean_decay)
    return hearth_paths().cache_dir / "anchors" / f"{key.digest()}-top{TOP_K}.safetensors"


def load_anchor(path: Path, chain_config: Any) -> Anchor | None:
    """The anchor kept at `path`; None when there is none, or it is unreadable or of another
    shape (then it is built again and replaces it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        found = load_file(str(path))
        anchor = Anchor(found["taps"], found["top_ids"], found["top_logp"], found["rest_logp"])
    except (OSError, KeyError, SafetensorError):
        return None
    n = len(anchor.top_ids)
    shapes_fit = (anchor.taps.shape == (n, chain_config.n_inputs, chain_config.hidden_size)
                  and anchor.top_ids.shape == anchor.top_logp.shape == (n, TOP_K) and anchor.rest_logp.shape == (n,))
    return anchor if shapes_fit and n > 0 else None


def save_anchor(anchor: Anchor, path: Path) -> None:
    from safetensors.torch import save

    tensors = {"taps": anchor.taps, "top_ids": anchor.top_ids, "top_logp": anchor.top_logp,
               "rest_logp": anchor.rest_logp}
    atomic_write_bytes(path, save({name: t.contiguous() for name, t in tensors.items()}))


@torch.no_grad()
def build_anchor(backbone: Any, tokenizer: Any, chain_config: Any, examples: list, batch_size: int = 4) -> Anchor:
    """One backbone pass over the anchor chats (`examples`, tokenised): chain inputs at their
    answer positions, and the base model's (chain off) top-K log-probabilities there."""
    from training.parallel_adapters import SOFTMAX_RANGE
    from training.trainer import length_chunks, taps_at_labels

    pad_id = tokenizer.pad_token_id or 0
    everything = list(range(len(examples)))
    # Passes as large as the activation cache's (the job's batch size in samples of average
    # length): passes of 1,024 tokens, a third faster, raised an NF4 job's peak memory by 57 MB.
    parts = [taps_at_labels(backbone, chain_config, examples, chunk, pad_id)[0]
             for chunk in length_chunks(examples, everything, batch_size)]
    # Kept in float16; the base's distribution from the rounded copy, so that an untouched chain
    # sees exactly the base there (KL 0, no pull).
    taps = torch.cat(parts).to(torch.float16)
    norm, lm_head = backbone.model.norm, backbone.get_output_embeddings()
    dtype = lm_head.weight.dtype
    top_ids, top_logp, rest_logp = [], [], []
    # A few positions at a time: each holds several vocabulary-wide rows (49,152 floats for
    # SmolLM2) while its distribution is taken; 64 at a time raised the job's peak by about 50 MB.
    for begin in range(0, len(taps), HEAD_ROWS):
        logits = lm_head(norm(taps[begin:begin + HEAD_ROWS, -1].float().to(dtype))).float()
        logits = torch.maximum(logits, logits.amax(dim=-1, keepdim=True) - SOFTMAX_RANGE)
        logp = logits.log_softmax(dim=-1)
        values, ids = logp.topk(TOP_K, dim=-1)
        top_ids.append(ids)
        top_logp.append(values)
        rest_logp.append(_rest(logp, ids))
    return Anchor(taps, torch.cat(top_ids), torch.cat(top_logp), torch.cat(rest_logp))


def _rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token but `ids`, per row."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)


def anchor_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
              rest_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || model) over the base's top-K tokens and one bucket for the rest."""
    from training.parallel_adapters import SOFTMAX_RANGE

    logits = torch.maximum(logits, logits.detach().amax(dim=-1, keepdim=True) - SOFTMAX_RANGE)
    logq = logits.log_softmax(dim=-1)
    q_top = logq.gather(-1, top_ids)
    q_rest = _rest(logq, top_ids)
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()


def anchor_gradients(backbone: Any, chain: Any, anchor: Anchor, positions: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The anchor's KL at `positions` and its gradients on the chain."""
    from training.parallel_adapters import head_logits

    chain.zero_grad(set_to_none=True)
    taps = anchor.taps[positions].float()
    loss = anchor_kl(head_logits(backbone, chain, taps), anchor.top_ids[positions], anchor.top_logp[positions],
                     anchor.rest_logp[positions])
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in chain.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads
