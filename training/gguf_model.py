"""GGUF files into transformers models (weights dequantised), for training and the torch engine.

Plain Llama-architecture files (stories260K, SmolLM2, Llama 2, TinyLlama) are read here (the file
with training/gguf_file.py, the weights dequantised by the `gguf` package) into a
`LlamaForCausalLM`: about three times faster than transformers' conversion on SmolLM2-135M, same
logits. Their tokenizer:
- a SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`) is built here from the file's
  own `tokenizer.ggml.*` fields with the `tokenizers` library; transformers' conversion fails on
  some of these (stories260K: an IndexError, and a pad id of 4294967295);
- a GPT-2-style BPE vocabulary (SmolLM2) comes from transformers' GGUF support.
Other architectures go through transformers' GGUF support entirely.

It does not write GGUF files (export does) and does not check that a file is complete
(`training.model_store.check_gguf` does, before any reader sees it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from core.errors import HearthError

# llama.cpp's token types (llama_token_type in llama.h).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor names of one Llama block -> transformers parameter names.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def load_gguf_model(path: Path, torch_dtype: Any, on_layer: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """A transformers causal LM (eval mode not set) and its tokenizer from a GGUF file.
    `on_layer` sees each decoder layer as it is filled, where this module reads the file itself."""
    from training.gguf_file import GGUFFile

    reader = GGUFFile(path)   # load_torch has checked the file (model_store.check_gguf)
    if not is_plain_llama(reader):
        return _load_with_transformers(path, torch_dtype)
    # The tokenizer first: transformers' GGUF tokenizer reading holds ~150 MB for a moment
    # (SmolLM2), which then does not add to the weights' peak.
    tokenizer = cached_tokenizer(path, reader)
    return read_llama_model(reader, torch_dtype, on_layer), tokenizer


def cached_tokenizer(path: Path, reader: Any) -> Any:
    """The file's tokenizer, read back from Hearth's cache when it was built before.

    Building it is slow: transformers converts SmolLM2's 49,152 tokens and 48,900 merges in about
    5 s, which every chat with a personalised model and every training job paid; reading the
    saved one takes about 1 s in a fresh process (docs/models.md). The entry is keyed by the
    file's path, size and modification time, so a changed file gets a new one; a damaged entry
    is built again."""
    import hashlib

    from transformers import AutoTokenizer

    from core.paths import hearth_paths

    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    folder = hearth_paths().cache_dir / "tokenizers" / hashlib.sha256(identity.encode()).hexdigest()[:24]
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - a damaged entry: build it again below
            pass
    tokenizer = _build_tokenizer(path, reader)
    _save_tokenizer(tokenizer, folder)
    return tokenizer


def _build_tokenizer(path: Path, reader: Any) -> Any:
    if _field(reader, "tokenizer.ggml.model") == "llama":
        return read_llama_tokenizer(reader)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Written beside `folder` and renamed into place: a reader never sees half an entry. A cache
    that cannot be written only costs the next load its seconds."""
    import os
    import shutil

    staging = folder.with_name(f".{folder.name}.{os.getpid()}.part")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)      # a damaged entry, or one just written
        os.rename(staging, folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_plain_llama(reader: Any) -> bool:
    """True when every tensor of the file has a place in a LlamaForCausalLM (no rope scaling
    tensors, no other architecture): the files this module reads itself."""
    return _field(reader, "general.architecture") == "llama" and all(
        _hf_name(t.name) is not None for t in reader.tensors
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _token_id(reader: Any, key: str, vocab_size: int) -> int | None:
    """A special token id, or None when the file leaves it unset (llama.cpp writes 2**32 - 1)."""
    value = _field(reader, key)
    if value is None or not 0 <= int(value) < vocab_size:
        return None
    return int(value)


def read_llama_tokenizer(reader: Any) -> Any:
    """The SentencePiece-style vocabulary of a GGUF as a transformers fast tokenizer.

    llama.cpp's tokenizer for these files starts from single characters and repeatedly merges the
    adjacent pair whose concatenation is in the vocabulary with the highest score; a character not
    in the vocabulary becomes its UTF-8 bytes (`<0xNN>` tokens). A BPE model whose merges are
    ranked by the merged token's score, with byte fallback, does the same.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    scores: list[float] = list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}

    # Pieces that take part in merges: normal and user-defined tokens.
    mergeable = {t for t, kind in zip(tokens, types) if kind in (_NORMAL, _USER_DEFINED)}
    merges = []
    for merged in mergeable:
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[vocab[merged]], vocab[left], vocab[right], left, right))
    merges.sort()  # highest score first, as llama.cpp picks them

    unk_id = _token_id(reader, "tokenizer.ggml.unknown_token_id", len(tokens))
    bos_id = _token_id(reader, "tokenizer.ggml.bos_token_id", len(tokens))
    eos_id = _token_id(reader, "tokenizer.ggml.eos_token_id", len(tokens))
    pad_id = _token_id(reader, "tokenizer.ggml.padding_token_id", len(tokens))
    unk = tokens[unk_id] if unk_id is not None else None

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                              byte_fallback=True, fuse_unk=True))
    # llama.cpp prepends a space (when the file says so; the default for this vocabulary) and
    # writes every space as U+2581.
    steps = []
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN)
    ])
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types) if kind == _USER_DEFINED
    ])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True)) and bos_id is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos = [tokens[bos_id]] if add_bos else []
        eos = [tokens[eos_id]] if add_eos else []
        specials = [(tokens[i], i) for i in {bos_id, eos_id} if i is not None]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(bos + ["$A"] + eos),
            pair=" ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos),
            special_tokens=specials,
        )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        unk_token=unk,
        pad_token=tokens[pad_id] if pad_id is not None else None,
        clean_up_tokenization_spaces=False,
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def _llama_config(reader: Any) -> Any:
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        value = _field(reader, key)
        if value is None:
            raise HearthError(f"GGUF has no {key} (not a complete llama model file)")
        return value

    heads = int(need("llama.attention.head_count"))
    hidden = int(need("llama.embedding_length"))
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    head_dim = hidden // heads
    rope_dims = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise HearthError(f"GGUF rotates {rope_dims} of {head_dim} head dimensions (partial rope is not supported)")
    return LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_token_id(reader, "tokenizer.ggml.bos_token_id", n_vocab),
        eos_token_id=_token_id(reader, "tokenizer.ggml.eos_token_id", n_vocab),
        pad_token_id=_token_id(reader, "tokenizer.ggml.padding_token_id", n_vocab),
    )


def _unpermute(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's reordering of Q/K rows.

    llama.cpp rotates adjacent pairs of a head's dimensions (rope "normal" mode); transformers
    rotates the first half against the second. The converter to GGUF interleaves each head's rows
    (halves -> pairs); this puts them back.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.weight"
    return None


# Values dequantised at a time: gguf's numpy dequantisers make several temporary arrays the size
# of their input; for a whole embedding (SmolLM2: 28M values) they added ~50 MB to an NF4 load's
# peak (892 -> 846 MB).
_DEQUANTIZE_VALUES = 1 << 20


def _dequantized(tensor: Any) -> Any:
    """One GGUF tensor as a float32 array of its own (not a view of the file), in torch's
    dimension order, dequantised a few rows at a time into the result."""
    import numpy as np
    from gguf.quants import dequantize

    # GGUF lists dimensions fastest-first; numpy and torch want them the other way round.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    out = np.empty(shape, dtype=np.float32)
    rows_out = out.reshape(-1, shape[-1])
    data = tensor.data.reshape(rows_out.shape[0], -1)  # one row of the file's blocks per output row
    step = max(1, _DEQUANTIZE_VALUES // shape[-1])
    try:
        for start in range(0, rows_out.shape[0], step):
            chunk = dequantize(data[start:start + step], tensor.tensor_type)
            rows_out[start:start + step] = chunk.reshape(-1, shape[-1])
    except NotImplementedError:
        raise HearthError(
            f"GGUF tensor {tensor.name}: {tensor.tensor_type.name} weights cannot be dequantised"
        ) from None
    return out


def read_llama_model(reader: Any, torch_dtype: Any, on_layer: Callable[[Any], Any] | None = None) -> Any:
    """The weights of a llama-architecture GGUF, dequantised, in a LlamaForCausalLM.

    The model is filled one decoder layer at a time; `on_layer(layer)` is called on each as soon
    as its weights are in, so a quantised load (training.quant.quantize_layer) never holds more
    than one layer in float32: SmolLM2-135M's NF4 load peaks ~400 MB lower than float32-then-quantise.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = _llama_config(reader)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layers = model.model.layers
    wanted = [set(layer.state_dict()) for layer in layers]
    pending: dict[int, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    done = [False] * len(layers)
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise HearthError(f"GGUF tensor {tensor.name} is not part of a plain llama model (unsupported)")
        values = _dequantized(tensor)
        if tensor.name.endswith("attn_q.weight"):
            values = _unpermute(values, config.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            values = _unpermute(values, config.num_key_value_heads)
        values = torch.from_numpy(values).to(torch_dtype)
        if not name.startswith("model.layers."):
            top[name] = values
            continue
        index_text, key = name[len("model.layers."):].split(".", 1)
        index = int(index_text)
        if index >= len(layers) or done[index]:
            raise HearthError(f"GGUF tensor {tensor.name} does not fit the file's {len(layers)} layers")
        state = pending.setdefault(index, {})
        state[key] = values
        if set(state) == wanted[index]:
            layers[index].load_state_dict(pending.pop(index), assign=True)
            done[index] = True
            if on_layer is not None:
                on_layer(layers[index])

    if config.tie_word_embeddings and "model.embed_tokens.weight" in top:
        top["lm_head.weight"] = top["model.embed_tokens.weight"]
    missing = [f"model.layers.{i}.{key}" for i in range(len(layers)) if not done[i]
               for key in sorted(wanted[i] - set(pending.get(i, {})))]
    missing += sorted({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} - set(top))
    if missing:
        raise HearthError(f"GGUF lacks tensor for {missing[0]} (incomplete llama model)")
    model.load_state_dict(top, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers such as the rotary inverse frequencies were made on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model
