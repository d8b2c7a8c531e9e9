"""Activation cache (PAC): the frozen backbone's tap outputs, computed once, read every later epoch.

ALGORITHMS.md section 2. For every training sample the cache holds the side chain's inputs (the
running means of tapped layers, then h_i for each tapped layer, the last being h_L;
`parallel_adapters.chain_inputs`) at the sample's trained positions only (the chain is per token,
so the other positions never influence the loss), and the target token of each such position.

Layout: `<cache_dir>/activations/<key>/` with `meta.json` and one folder per shard
(`shard-00000/`: `acts.npy` [tokens, inputs, d] float16/int8/float32, `scale.npy` for int8 (one
float32 per row), `targets.npy`, `offsets.npy` [samples + 1]). Each shard folder appears by one
rename once complete, so a crash mid-epoch-1 resumes at the last complete shard. Arrays are read
memory-mapped, so the cache can be far larger than memory.

The key is a hash of the backbone (file identity + quantisation), the tokenizer, the tokenised
data and the chain's inputs (taps and running means): change any and a new cache is built.

What is not here: when to fill or read it (trainer.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_dir, atomic_write_text
from core.errors import HearthError

DTYPES = ("float16", "int8", "float32")


@dataclass(frozen=True)
class CacheKey:
    backbone: str       # identity of the backbone weights and how they are loaded (quantisation)
    tokenizer: str
    data: str           # training.data.examples_fingerprint
    taps: tuple[int, ...]
    dtype: str
    means: tuple[int, ...] = ()   # taps whose running mean is an input too (SideChainConfig.means)
    mean_decay: float = 1.0

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(str(len(tokenizer)).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    return digest.hexdigest()[:24]


class ActivationCache:
    """One cache folder. `write_shard` during epoch 1, `sample` afterwards."""

    def __init__(self, root: Path, key: CacheKey, n_samples: int, shard_size: int, n_inputs: int, hidden: int):
        if key.dtype not in DTYPES:
            raise HearthError(f"activation cache dtype must be one of {', '.join(DTYPES)} (got {key.dtype})")
        self.key = key
        self.folder = Path(root) / key.digest()
        self.n_samples = n_samples
        self.shard_size = shard_size
        self.n_inputs = n_inputs
        self.hidden = hidden
        self._open: dict[int, tuple] = {}
        meta = {"key": asdict(self.key), "n_samples": n_samples, "shard_size": shard_size,
                "n_inputs": n_inputs, "hidden": hidden}
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            try:
                existing = json.loads(meta_path.read_text("utf-8"))
            except ValueError:
                existing = None
            if existing != json.loads(json.dumps(meta)):
                # Same key but a different layout: start again rather than mix two layouts.
                shutil.rmtree(self.folder, ignore_errors=True)
        if not meta_path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta_path, json.dumps(meta, indent=2))

    def delete(self) -> None:
        """Remove the cache from disk (a finished job's: hidden states of the family's text, and
        gigabytes for a large notes folder, kept for no one)."""
        self._open.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def num_shards(self) -> int:
        return (self.n_samples + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.n_samples, (shard + 1) * self.shard_size))

    def shard_dir(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}"

    def has_shard(self, shard: int) -> bool:
        return (self.shard_dir(shard) / "offsets.npy").is_file()

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.has_shard(s)]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, shard: int, acts: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """Store one shard: per sample, chain inputs [n_i, n_inputs, d] and targets [n_i], in sample order."""
        if len(acts) != len(self.shard_range(shard)):
            raise ValueError("shard written with the wrong number of samples")
        offsets = np.zeros(len(acts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.shape[0] for a in acts])
        flat = torch.cat(acts).float() if acts else torch.zeros(0, self.n_inputs, self.hidden)
        with atomic_dir(self.shard_dir(shard)) as tmp:
            if self.key.dtype == "int8":
                values, scale = quantize_rows(flat)
                np.save(tmp / "acts.npy", values.numpy())
                np.save(tmp / "scale.npy", scale.numpy())
            else:
                np.save(tmp / "acts.npy", flat.numpy().astype(self.key.dtype))
            np.save(tmp / "targets.npy", torch.cat(targets).numpy().astype(np.int64))
            np.save(tmp / "offsets.npy", offsets)  # written last: its presence marks completeness

    def _arrays(self, shard: int) -> tuple:
        if shard not in self._open:
            folder = self.shard_dir(shard)
            if not self.has_shard(shard):
                raise HearthError(f"{folder}: activation cache shard missing")
            acts = np.load(folder / "acts.npy", mmap_mode="r")
            scale = np.load(folder / "scale.npy", mmap_mode="r") if self.key.dtype == "int8" else None
            targets = np.load(folder / "targets.npy", mmap_mode="r")
            offsets = np.load(folder / "offsets.npy")
            self._open[shard] = (acts, scale, targets, offsets)
        return self._open[shard]

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chain inputs [n, n_inputs, d] float32, targets [n]) of one training sample."""
        shard = index // self.shard_size
        acts, scale, targets, offsets = self._arrays(shard)
        row = index - shard * self.shard_size
        start, end = int(offsets[row]), int(offsets[row + 1])
        values = torch.from_numpy(np.array(acts[start:end]))
        if scale is not None:
            values = values.float() * torch.from_numpy(np.array(scale[start:end]))[..., None]
        return values.float(), torch.from_numpy(np.array(targets[start:end]))

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Taps and targets of several samples, concatenated (what one adapter step consumes)."""
        parts = [self.sample(i) for i in indices]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*.npy"))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 with one scale per (token, tap) row: x ~= values * scale."""
    scale = x.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    values = torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return values, scale.float()
