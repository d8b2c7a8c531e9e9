"""The GGUF reader of the model store against llama.cpp, on the real stories260K model.

stories260K is a GGUF whose tokenizer transformers cannot convert; the model store builds the
tokenizer from the file's `tokenizer.ggml.*` fields and reads the F32 weights itself. llama.cpp
is the reference: same token ids, same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def stories_torch(stories_gguf: Path):
    from training.model_store import load_torch, resolve

    return load_torch(resolve(str(stories_gguf)))


@pytest.fixture(scope="module")
def stories_llama(stories_gguf: Path):
    import llama_cpp

    # F32 KV cache: llama.cpp's default F16 cache alone moves logits by about 1e-2.
    llm = llama_cpp.Llama(model_path=str(stories_gguf), n_ctx=512, n_threads=1, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    yield llm
    llm.close()


def sample_texts(shared_dir: Path) -> list[str]:
    """Real sentences (the household fixture, open QA) plus the awkward cases of a SentencePiece
    vocabulary: leading and repeated spaces, new lines, digits, accents, emoji (byte fallback)."""
    texts = []
    for line in (shared_dir / "data" / "household" / "train.jsonl").read_text("utf-8").splitlines()[:10]:
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    for line in (shared_dir / "data" / "dolly_open_qa" / "open_qa_train.jsonl").open("r", encoding="utf-8"):
        texts.append(json.loads(line)["text"])
        if len(texts) >= 30:
            break
    texts += ["Once upon a time", " leading space", "two  spaces\nand a new line\n\n", "café ñ 😀 ™",
              "Lily's 3 red balls cost $12.50!", "", " ", "\t tab"]
    return texts


def test_gguf_tokenizer_matches_llama_cpp(stories_torch, stories_llama, shared_dir: Path):
    _, tokenizer = stories_torch
    for text in sample_texts(shared_dir):
        expected = stories_llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert tokenizer(text)["input_ids"] == expected, text
        # and back: decoding gives the text again
        assert tokenizer.decode(expected, skip_special_tokens=True) == text, text


def test_gguf_logits_match_llama_cpp(stories_torch, stories_llama):
    import torch

    model, _ = stories_torch
    prompt = b"Once upon a time, there was a little girl named Lily. She loved to play"
    ids = stories_llama.tokenize(prompt, add_bos=True)
    stories_llama.reset()
    stories_llama.eval(ids)
    reference = np.array(stories_llama.scores[: len(ids)])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    # Both run float32; what is left is summation order. Measured: 1.2e-5 on logits of size ~20.
    assert np.abs(logits - reference).max() < 1e-3
    assert (logits.argmax(-1) == reference.argmax(-1)).all()


def test_llama_cpp_continues_stories_with_lily(stories_llama):
    stories_llama.reset()
    out = stories_llama.create_completion("Once upon a time", max_tokens=24, temperature=0.0)
    assert "Lily" in out["choices"][0]["text"]


def test_gguf_model_in_transformers_continues_with_lily(stories_torch):
    model, tokenizer = stories_torch
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 292_800  # as the file says
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "there was a little girl named Lily" in tokenizer.decode(out[0], skip_special_tokens=True)


def test_gguf_special_tokens_come_from_the_file(stories_torch):
    _, tokenizer = stories_torch
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    # The file's pad id is 2**32 - 1 (unset): the store pads with the end-of-sequence token.
    assert tokenizer.pad_token_id == 2


def test_gguf_model_can_be_trained(stories_torch):
    """The dequantised weights are ordinary parameters: a few optimiser steps lower the loss."""
    import copy

    import torch

    model, tokenizer = copy.deepcopy(stories_torch[0]), stories_torch[1]  # the shared model stays as it is
    batch = tokenizer("Hearth keeps the family's notes at home.", return_tensors="pt").input_ids
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_quantised_load_holds_one_float32_layer_at_a_time(stories_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    """A quantised backbone is read and quantised layer by layer (the memory-saving point of NF4
    on a small device): when a layer is handed over, it is the only decoder layer in float32. The
    result is the same model as quantising after a whole float32 load."""
    import gc

    import torch
    from torch import nn

    from training import gguf_model
    from training.quant import quantize_backbone
    from training.trainer import load_backbone

    def float32_linears() -> int:   # every live one in the process, other tests' models included
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is nn.Linear and o.weight.device.type != "meta")

    before = float32_linears()
    seen: list[int] = []
    reading = gguf_model.read_llama_model

    def watched(reader, dtype, on_layer=None):
        def counting(layer):
            seen.append(float32_linears() - before)
            return on_layer(layer)
        return reading(reader, dtype, counting)

    monkeypatch.setattr(gguf_model, "read_llama_model", watched)
    quantised = load_backbone(str(stories_gguf), "nf4").model
    monkeypatch.undo()
    assert len(seen) == len(quantised.model.layers)
    assert max(seen) == 7          # q, k, v, o, gate, up, down of the layer at hand, no others

    # The same packed 4-bit weights and block scales as quantising a whole float32 load. (Compared
    # as data: bitsandbytes' CPU NF4 kernel does not run at stories260K's widths.)
    whole = load_backbone(str(stories_gguf)).model
    quantize_backbone(whole, "nf4")
    pairs = list(zip(quantised.model.layers.modules(), whole.model.layers.modules()))
    packed = [(a.weight, b.weight) for a, b in pairs if hasattr(getattr(a, "weight", None), "quant_state")]
    assert len(packed) == 7 * len(seen)
    for a, b in packed:
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    for name, value in whole.state_dict().items():
        if value.dtype.is_floating_point and "layers" not in name:
            assert torch.equal(quantised.state_dict()[name], value), name


@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_tokenizer_comes_back_from_the_cache_the_same(model, stories_gguf: Path, shared_dir: Path,
                                                      hearth_home: Path, monkeypatch: pytest.MonkeyPatch):
    """Built once per file (SmolLM2's took 5.4 s every load), then read back from the cache:
    the same ids, chat prompt, special tokens and text; a damaged entry is built again."""
    from gguf import GGUFReader

    import training.gguf_model as gguf_model
    from training.model_store import resolve

    path = stories_gguf if model == "stories" else resolve("smollm2-135m").path
    reader = GGUFReader(str(path))
    built = gguf_model.cached_tokenizer(path, reader)
    [entry] = (hearth_home / "cache" / "tokenizers").iterdir()
    assert (entry / "tokenizer.json").is_file()

    builds = []
    original = gguf_model._build_tokenizer
    monkeypatch.setattr(gguf_model, "_build_tokenizer", lambda *args: builds.append(args) or built)
    cached = gguf_model.cached_tokenizer(path, reader)
    assert not builds and cached is not built                     # read back, not built again
    texts = sample_texts(shared_dir) + ["<|im_start|>user\nhi<|im_end|>", "<s> a </s>"]
    for text in texts:
        assert cached(text)["input_ids"] == built(text)["input_ids"], text
        assert cached.decode(built(text)["input_ids"]) == built.decode(built(text)["input_ids"])
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id, cached.unk_token_id) == (
        built.bos_token_id, built.eos_token_id, built.pad_token_id, built.unk_token_id)
    if built.chat_template:
        chat = [{"role": "user", "content": "Where is the key?"}]
        assert cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            built.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    monkeypatch.setattr(gguf_model, "_build_tokenizer", original)
    (entry / "tokenizer.json").write_text("{not json")
    again = gguf_model.cached_tokenizer(path, reader)
    assert again(texts[0])["input_ids"] == built(texts[0])["input_ids"]
    assert json.loads((entry / "tokenizer.json").read_text())      # rebuilt whole


def test_gguf_file_reads_what_the_gguf_package_reads(stories_gguf: Path):
    """training/gguf_file.py against the `gguf` package's GGUFReader on both real files: every
    metadata value and every tensor (name, type, shape, sizes, bytes) the same."""
    from gguf import GGUFReader

    from training.gguf_file import GGUFFile
    from training.model_store import resolve

    for path in (stories_gguf, resolve("smollm2-135m").path):
        theirs, ours = GGUFReader(str(path)), GGUFFile(path)
        header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}   # GGUFReader's own extras
        assert set(theirs.fields) - header == set(ours.fields)
        for key, field in ours.fields.items():
            expected, got = theirs.fields[key].contents(), field.contents()
            assert type(got) is type(expected), key
            if isinstance(expected, float) or (isinstance(expected, list) and expected and isinstance(expected[0], float)):
                np.testing.assert_array_equal(np.array(got), np.array(expected), err_msg=key)
            else:
                assert got == expected, key
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for mine, reference in zip(ours.tensors, theirs.tensors):
            assert (mine.tensor_type, list(mine.shape), mine.n_elements, mine.n_bytes) == \
                (reference.tensor_type, list(reference.shape), reference.n_elements, reference.n_bytes)
            assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape
            assert np.array_equal(mine.data, reference.data), mine.name
