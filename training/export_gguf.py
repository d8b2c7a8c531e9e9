"""GGUF export: a (pruned, merged) Llama model into one file llama.cpp runs.

Written with the `gguf` package: llama architecture metadata (block count, widths, head counts,
explicit key/value length so pruned heads stay 64 wide, rope, norm epsilon), the tokenizer as
`tokenizer.ggml.*` fields built from the Hugging Face tokenizer (byte-level BPE as llama.cpp's
"gpt2" model with merges; SentencePiece-style BPE as its "llama" model with scores) and the chat
template. Weights go out as F16 (or F32); smaller types are made by
llama.cpp's own quantiser (`llama_model_quantize` through llama-cpp-python) from the F16 file.

llama.cpp's llama architecture applies rope to interleaved pairs (0,1), (2,3)... while the
Hugging Face layout rotates the two halves of a head (i, i + d/2); the q and k rows of every head
are therefore reordered on the way out (`_rope_interleave`).

It does not merge adapters (training.merge does) nor choose which file chat uses.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_path
from core.errors import HearthError
from core.paths import hearth_paths

QUANTS = ("f32", "f16", "q8_0", "q4_k_m", "q4_1")
# What a family's model is exported at unless told otherwise: q8_0 keeps what training taught (as
# f16 does; q4_1 rounds it away) at half f16's bytes, and decodes about twice as fast here.
DEFAULT_QUANT = "q8_0"
_FTYPE_NAMES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


@dataclass
class ExportResult:
    path: Path
    quant: str
    bytes: int
    parameters: int
    note: str = ""     # what the quantiser had to do differently, one line for the user


def export_model(model_text: str, quant: str = DEFAULT_QUANT, output: Path | None = None) -> ExportResult:
    """Merge, write and quantise the model a user named; the file lands in the data dir or `output`."""
    from training.merge import merged_model
    from training.model_store import resolve

    if quant not in QUANTS:
        raise HearthError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    ref = resolve(model_text)
    if quant == "q4_1":
        _check_q4_1_keeps_training(ref)
    model, tokenizer = merged_model(ref)
    name = ref.display_name
    if output is None:
        if ref.kind == "personal" and ref.path is not None:
            # Beside the model: `hearth chat --model NAME` then runs it through llama.cpp.
            output = ref.path / f"{name}-{quant}.gguf"
        else:
            output = hearth_paths().exports_dir / f"{Path(name).stem}-{quant}.gguf"
    output = Path(output).expanduser()
    if output.suffix.lower() != ".gguf":
        raise HearthError(f"{output}: the output file must end in .gguf")
    pre = tokenizer_pre_name(ref)
    note = ""
    if quant in ("f16", "f32"):
        write_gguf(model, tokenizer, output, name, dtype=quant, tokenizer_pre=pre)
    else:
        with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
            f16 = Path(tmp) / "model-f16.gguf"
            write_gguf(model, tokenizer, f16, name, dtype="f16", tokenizer_pre=pre)
            del model
            note = quantize_gguf(f16, output, quant)
    params = 0  # counted from the file: what llama.cpp will hold
    from gguf import GGUFReader

    for tensor in GGUFReader(str(output)).tensors:
        params += int(np.prod([int(x) for x in tensor.shape]))
    return ExportResult(output, quant, output.stat().st_size, params, note)


def _check_q4_1_keeps_training(ref: Any) -> None:
    """Refuse a q4_1 export that would give back the base model. When the base's weights are
    q4_1 already (the bundled SmolLM2), what training changed is smaller than q4_1's steps and
    re-quantising rounds nearly all of it back to the base's values: a LoRA model trained on the
    household set kept 0 of its 20 facts at q4_1, 10 at q8_0 and f16, 9 at q4_k_m (2026-12-05).
    A model that was only pruned has nothing to lose and exports at q4_1 like its base."""
    import llama_cpp

    from training.gguf_file import GGUFFile
    from training.model_store import first_weights

    personal = ref.personal
    if personal is None or not _trained(ref):
        return
    root = first_weights(ref)   # gone: merged_model says what is missing
    if root is None or root.kind != "gguf" or root.path is None:
        return
    file_type = GGUFFile(root.path).fields.get("general.file_type")
    if file_type is not None and int(file_type.contents()) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1:
        raise HearthError(
            f"model {personal.name}: a q4_1 export would round its training away (its base "
            f"{root.display_name} is q4_1 already, and training changed its weights by less than "
            "q4_1's steps): export q8_0, or q4_k_m for a smaller file")


def _trained(ref: Any, depth: int = 0) -> bool:
    """Whether a personalised model's weights hold training: any method but "pruned", and a
    pruned model whose source was trained (`hearth prune` of a trained model merges it)."""
    from training.model_store import resolve

    if ref.personal is None:
        return False
    if ref.personal.method != "pruned":
        return True
    source = (ref.personal.details or {}).get("pruned_from")
    if not source or depth >= 4:
        return False
    try:
        return _trained(resolve(str(source)), depth + 1)
    except HearthError:
        return False     # its source has gone: nothing says it was trained


def tokenizer_pre_name(ref: Any) -> str:
    """llama.cpp's pre-tokenizer name for this model: taken from the GGUF it came from, if any.

    llama.cpp recognises a pre-tokenizer by name only; the Hugging Face tokenizer does not carry
    that name, so it is inherited from the base model's GGUF (SmolLM2's is "smollm").
    """
    from training.gguf_file import GGUFFile
    from training.model_store import first_weights

    root = first_weights(ref)
    if root is None or root.kind != "gguf" or root.path is None:
        return "default"
    field = GGUFFile(root.path).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else "default"


def write_gguf(model: Any, tokenizer: Any, path: Path, name: str, dtype: str = "f16", tokenizer_pre: str = "default") -> None:
    """Write `model` (a transformers Llama) and its tokenizer as one GGUF file, atomically."""
    import gguf

    config = model.config
    if getattr(config, "model_type", "") != "llama":
        raise HearthError(f"model {name}: GGUF export supports Llama models, not '{config.model_type}'")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise HearthError(f"model {name}: rope scaling '{rope_type}' is not supported by the GGUF export")
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    float_type = np.float16 if dtype == "f16" else np.float32

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(heads))
        writer.add_head_count_kv(int(kv_heads))
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
        _add_tokenizer(writer, tokenizer, tokenizer_pre, int(config.vocab_size), name)

        state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for hf_name, array in state.items():
            gguf_name = _tensor_name(hf_name)
            if gguf_name is None or (tied and gguf_name == "output.weight"):
                continue
            if gguf_name.endswith("attn_q.weight"):
                array = _rope_interleave(array, heads, head_dim)
            elif gguf_name.endswith("attn_k.weight"):
                array = _rope_interleave(array, kv_heads, head_dim)
            # Norms stay F32 (tiny, and llama.cpp expects them so); matrices take the chosen type.
            out = array.astype(np.float32 if array.ndim == 1 else float_type)
            writer.add_tensor(gguf_name, np.ascontiguousarray(out))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _tensor_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise HearthError(f"GGUF export: unexpected tensor {hf_name} (biases and extra modules are not supported)")


def _rope_interleave(weight: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Reorder each head's rows from halves (i, i + d/2) to pairs (2i, 2i+1)."""
    rows = weight.reshape(heads, 2, head_dim // 2, -1)
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer: Any, tokenizer: Any, pre: str, vocab_size: int, name: str) -> None:
    """tokenizer.ggml.* from the Hugging Face tokenizer: byte-level BPE (SmolLM2, llama.cpp's
    "gpt2" model) or SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, stories260K:
    llama.cpp's "llama" model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HearthError(f"model {name}: GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model", {})
    if bpe.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        _add_byte_level_bpe(writer, tokenizer, spec, pre, vocab_size)
    elif bpe.get("type") == "BPE" and bpe.get("byte_fallback") and _space_marker(spec) is not None:
        _add_sentencepiece_bpe(writer, tokenizer, spec, vocab_size)
    else:
        raise HearthError(f"model {name}: its tokenizer is neither byte-level BPE nor SentencePiece-style "
                          "BPE with byte fallback, so it cannot be exported to GGUF")
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _add_byte_level_bpe(writer: Any, tokenizer: Any, spec: dict, pre: str, vocab_size: int) -> None:
    import gguf

    bpe = spec["model"]
    tokens = [""] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, index in bpe["vocab"].items():
        if index < vocab_size:
            tokens[index] = text
            types[index] = int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        index = added["id"]
        if index < vocab_size:
            tokens[index] = added["content"]
            types[index] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for index, text in enumerate(tokens):
        if not text:
            tokens[index] = f"[PAD{index}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def _add_special_ids(writer: Any, tokenizer: Any) -> None:
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))


def _space_marker(spec: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer puts "\u2581" before the text (llama.cpp's
    add_space_prefix); None when it does not write spaces as "\u2581" at all.

    Two layouts exist: older tokenizer.json files prepend and replace in the normalizer; newer ones
    use a Metaspace pre-tokenizer whose prepend scheme says whether to prepend."""
    normalizer = json.dumps(spec.get("normalizer"), ensure_ascii=False)
    if "\u2581" in normalizer:
        return '"Prepend"' in normalizer
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return None


def _add_sentencepiece_bpe(writer: Any, tokenizer: Any, spec: dict, vocab_size: int) -> None:
    """llama.cpp's "llama" vocabulary: tokens, scores and token types, no merges.

    llama.cpp merges the adjacent pair whose concatenation has the highest score; Hugging Face's
    BPE applies the lowest-ranked merge. A token's score is therefore minus the rank of the first
    merge that makes it, so both pick the same pair (tokenizer.json files converted from
    SentencePiece list every split of a piece together, at that piece's rank). Tokens no merge
    makes (single characters, bytes, specials) score 0: llama.cpp never looks them up by score.
    """
    import gguf

    bpe = spec["model"]
    tokens = [""] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    scores = [0.0] * vocab_size
    byte_token = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    for text, index in bpe["vocab"].items():
        if index < vocab_size:
            tokens[index] = text
            types[index] = int(gguf.TokenType.BYTE if byte_token.fullmatch(text) else gguf.TokenType.NORMAL)
    for rank, merge in enumerate(bpe.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        index = bpe["vocab"].get(left + right)
        if index is not None and index < vocab_size and scores[index] == 0.0:
            scores[index] = -float(rank + 1)
    for added in spec.get("added_tokens", []):
        index = added["id"]
        if index < vocab_size:
            tokens[index] = added["content"]
            types[index] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk < vocab_size:
        types[unk] = int(gguf.TokenType.UNKNOWN)
    for index, text in enumerate(tokens):
        if not text:
            tokens[index] = f"[PAD{index}]"
    # Whether BOS / EOS are added is read from what the tokenizer does, not from its settings:
    # the post-processor decides, and the attributes that describe it differ between classes.
    ids = tokenizer("a")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, tokenizer)
    writer.add_add_bos_token(bos is not None and ids[:1] == [bos])
    writer.add_add_eos_token(eos is not None and ids[-1:] == [eos])
    writer.add_add_space_prefix(bool(_space_marker(spec)))


def quantize_gguf(source: Path, target: Path, quant: str, threads: int = 0) -> str:
    """llama.cpp's own quantiser: `source` (F16/F32 GGUF) -> `target` of type `quant`.

    Returns a one-line note when llama.cpp had to store many tensors (a tenth or more) in another
    type (a row length its blocks do not divide: SmolLM2's 576 columns in q4_k_m's 256-wide
    blocks), else "".
    Its per-tensor log (300 lines for SmolLM2) is kept off the terminal; its errors come back in
    the HearthError."""
    import llama_cpp

    if quant not in _FTYPE_NAMES:
        raise HearthError(f"cannot quantise to {quant!r}: choose one of {', '.join(_FTYPE_NAMES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPE_NAMES[quant])
    params.nthread = threads or (os.cpu_count() or 1)
    with atomic_path(Path(target)) as tmp, _llama_cpp_messages() as messages:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            errors = " ".join(text.strip() for level, text in messages if level == _LOG_ERROR)
            raise HearthError(f"{source}: llama.cpp could not quantise it to {quant}"
                              + (f": {errors}" if errors else f" (code {code})"))
    for _level, text in messages:
        fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
        # One or two tensors (the embedding's q6_K) falling back is llama.cpp's routine: no note.
        if fallback and int(fallback[1]) * 10 >= int(fallback[2]):
            return (f"llama.cpp stored {fallback[1]} of {fallback[2]} tensors in a wider type than {quant}: "
                    f"their rows do not divide into its blocks")
    return ""


# ggml's log levels (ggml.h). llama-cpp-python's own handler predates their renumbering and
# shows warnings as errors, so the quantiser gets a handler of its own.
_LOG_ERROR, _LOG_CONT = 4, 5


@contextmanager
def _llama_cpp_messages() -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log lines as (level, text) instead of printing them; llama-cpp-python's
    handler is put back afterwards (its module-level callback, the only handle to it)."""
    import llama_cpp
    from llama_cpp import _logger

    messages: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace")
        if level == _LOG_CONT and messages:
            messages[-1] = (messages[-1][0], messages[-1][1] + line)
        else:
            messages.append((level, line))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield messages
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))