"""GGUF export of models with a SentencePiece-style vocabulary (Llama 2, TinyLlama, stories260K):
llama.cpp's "llama" tokenizer (tokens, scores, types), judged by llama.cpp itself.

Real parts: the stories260K model, a LoRA model trained on it by `hearth train`, `hearth export`,
and llama.cpp loading what was written.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from app.cli import main as hearth
from tests.test_gguf import sample_texts

# Special tokens written into text, which llama.cpp parses when asked to.
SPECIAL_TEXTS = ["<s>Once upon a time</s>", "a</s>b", "<unk>"]


def _run(argv: list[str]) -> tuple[int, str]:
    """Exit code and standard output (llama.cpp's quantiser writes its own lines to stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = hearth(argv)
    return code, out.getvalue()


def _llama(path: Path):
    import llama_cpp

    # F32 KV cache, one thread: the two files then differ only in what the export wrote.
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


def test_stories260K_exports_with_the_tokenizer_llama_cpp_had(stories_gguf: Path, shared_dir: Path,
                                                              hearth_home: Path, tmp_path: Path):
    out = tmp_path / "stories-again.gguf"
    code, text = _run(["export", str(stories_gguf), "--gguf", "--quant", "f32", "--output", str(out)])
    assert code == 0, text
    assert _fields(out) == _fields(stories_gguf)      # same tokens, types and special ids
    original, exported = _llama(stories_gguf), _llama(out)
    try:
        for sample in sample_texts(shared_dir):
            data = sample.encode("utf-8")
            assert exported.tokenize(data, add_bos=True) == original.tokenize(data, add_bos=True), sample
        for sample in SPECIAL_TEXTS:
            data = sample.encode("utf-8")
            assert exported.tokenize(data, special=True) == original.tokenize(data, special=True), sample
        ids = original.tokenize(b"Once upon a time, there was a little girl named Lily.", add_bos=True)
        for llm in (original, exported):
            llm.reset()
            llm.eval(ids)
        # The same float32 weights through the same code: identical logits.
        assert np.array_equal(np.array(original.scores[: len(ids)]), np.array(exported.scores[: len(ids)]))
        exported.reset()
        story = exported.create_completion("Once upon a time", max_tokens=24, temperature=0.0)
        assert "Lily" in story["choices"][0]["text"]
    finally:
        original.close()
        exported.close()


def test_lora_model_on_stories260K_exports_and_agrees_with_transformers(stories_gguf: Path, shared_dir: Path,
                                                                        hearth_home: Path, tmp_path: Path):
    import torch

    from tests.test_pooled import household_notes
    from training.merge import merged_model
    from training.model_store import resolve

    notes = household_notes(shared_dir, tmp_path / "notes")
    code, text = _run(["train", "--data", str(notes), "--model", str(stories_gguf), "--method", "lora",
                       "--epochs", "1", "--out", "family", "--json", "--checkpoint-every", "0"])
    assert code == 0, text
    code, text = _run(["export", "family", "--gguf", "--quant", "f32"])
    assert code == 0, text
    exported = Path(text.strip().splitlines()[-1])
    assert exported.is_file() and exported.parent == hearth_home / "data" / "models" / "family"

    model, tokenizer = merged_model(resolve("family"))
    llm = _llama(exported)
    try:
        for sample in sample_texts(shared_dir):
            assert llm.tokenize(sample.encode("utf-8"), add_bos=True) == tokenizer(sample)["input_ids"], sample
        ids = tokenizer("Once upon a time, there was a little girl named Lily.")["input_ids"]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        # Both float32; what differs is summation order (measured ~1e-5 on logits of size ~20).
        assert np.abs(logits - np.array(llm.scores[: len(ids)])).max() < 1e-3
    finally:
        llm.close()
    # and llama.cpp's own quantiser takes the SentencePiece file like any other
    code, text = _run(["export", "family", "--gguf", "--quant", "q8_0"])
    assert code == 0, text
    q8 = Path(text.strip().splitlines()[-1])
    assert _fields(q8)["tokenizer.ggml.tokens"] == _fields(exported)["tokenizer.ggml.tokens"]


def test_metaspace_layout_exports_the_same_vocabulary(stories_gguf: Path, shared_dir: Path, tmp_path: Path):
    """Newer tokenizer.json files mark spaces with a Metaspace pre-tokenizer instead of the
    normalizer; the export must read the prefix-space rule from either."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.export_gguf import write_gguf
    from training.model_store import load_torch, resolve

    model, tokenizer = load_torch(resolve(str(stories_gguf)))
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    metaspace = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    # Metaspace does not prepend to text that already starts with a space (llama.cpp and the
    # normalizer layout do): a difference between the two layouts themselves, left out here.
    samples = [s for s in sample_texts(shared_dir) if s.strip() and not s[0].isspace()]
    assert [metaspace(s)["input_ids"] for s in samples] == [tokenizer(s)["input_ids"] for s in samples]

    out = tmp_path / "metaspace.gguf"
    write_gguf(model, metaspace, out, "metaspace", dtype="f32")
    llm = _llama(out)
    try:
        for sample in samples:
            assert llm.tokenize(sample.encode("utf-8"), add_bos=True) == tokenizer(sample)["input_ids"], sample
    finally:
        llm.close()


def test_a_tokenizer_of_another_kind_is_a_one_line_error(stories_gguf: Path, tmp_path: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from core.errors import HearthError
    from training.export_gguf import write_gguf
    from training.model_store import load_torch, resolve

    model, _ = load_torch(resolve(str(stories_gguf)))
    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    out = tmp_path / "words.gguf"
    with pytest.raises(HearthError, match=r"^model words: its tokenizer is neither") as error:
        write_gguf(model, words, out, "words", dtype="f32")
    assert "\n" not in str(error.value)
    assert not out.exists() and not list(tmp_path.iterdir())     # nothing half-written
