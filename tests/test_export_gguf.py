"""Pruning the bundled SmolLM2-135M by 30% and exporting it to GGUF: transformers loads the pruned
checkpoint with no custom code, llama.cpp loads the export, and both agree on the logits.

One pruned model (module fixture) serves every test here: `hearth prune` then `hearth export`,
through the command line, into a private HEARTH_HOME.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as hearth

# f16 export of an f16 checkpoint: the weights are the same numbers, so the two engines differ
# only in arithmetic order and in llama.cpp's f16 matrix products. Measured: max |diff| 0.03 on
# logits whose standard deviation is 3.3.
LOGIT_TOLERANCE = 0.1
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Pruned:
    home: Path
    folder: Path
    f16: Path


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = hearth(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def pruned(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pruned:
    torch.set_num_threads(2)
    home = tmp_path_factory.mktemp("pruning-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEARTH_HOME", str(home))
        data = shared_dir / "data" / "dolly_open_qa" / "open_qa_train.jsonl"
        code, out = _run(["prune", "smollm2-135m", "--ratio", "0.3", "--data", str(data), "--out", "pruned30"])
        assert code == 0, out
        code, out = _run(["export", "pruned30", "--gguf", "--quant", "f16"])
        assert code == 0, out
    f16 = Path(out.strip().splitlines()[-1])
    return Pruned(home, home / "data" / "models" / "pruned30", f16)


@pytest.mark.slow
def test_pruned_model_loads_in_transformers_without_custom_code(pruned):
    from transformers import AutoModelForCausalLM

    config = json.loads((pruned.folder / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_attention_heads"] == 6 and config["num_key_value_heads"] == 3   # 1 of 3 per group
    assert config["head_dim"] == 64
    assert config["intermediate_size"] == 1088           # 29.2% of 1536 channels, a multiple of 32
    model = AutoModelForCausalLM.from_pretrained(pruned.folder)   # no trust_remote_code
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (384, 576) and attn.o_proj.weight.shape == (576, 384)
    assert model.model.layers[29].mlp.down_proj.weight.shape == (576, 1088)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * 134_515_008
    manifest = json.loads((pruned.folder / "hearth-model.json").read_text())
    assert manifest["format"] == "hf" and manifest["pruning_ratio"] == 0.3
    assert manifest["details"]["importance"] == "activations"


@pytest.mark.slow
def test_f16_export_agrees_with_transformers_on_logits_and_greedy_text(pruned):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned.folder)
    model = AutoModelForCausalLM.from_pretrained(pruned.folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    llm = Llama(str(pruned.f16), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids   # same tokenizer
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        llm.eval(ids)
        llama_logits = np.array(llm.scores[len(ids) - 1])
        with torch.no_grad():
            torch_logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(llama_logits - torch_logits).max() < LOGIT_TOLERANCE

        llm.reset()
        llama_tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            llama_tokens.append(token)
            if len(llama_tokens) == 16:
                break
        torch_tokens = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False)[0, len(ids):].tolist()
        assert llama_tokens == torch_tokens
    finally:
        llm.close()


@pytest.mark.slow
def test_q8_0_quantisation_through_llama_cpp(pruned, tmp_path):
    from gguf import GGUFReader
    from llama_cpp import Llama

    from training.export_gguf import quantize_gguf

    target = tmp_path / "pruned30-q8_0.gguf"
    quantize_gguf(pruned.f16, target, "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(target)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert target.stat().st_size < 0.6 * pruned.f16.stat().st_size
    llm = Llama(str(target), n_ctx=128, n_threads=2, verbose=False)
    try:
        text = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
        assert text.strip()
    finally:
        llm.close()


@pytest.mark.slow
def test_exported_pruned_model_chats_through_llama_cpp(pruned, monkeypatch):
    from training.engines import ChatMessage, LlamaCppEngine, SamplingSettings, open_engine

    monkeypatch.setenv("HEARTH_HOME", str(pruned.home))
    engine = open_engine("pruned30", context_length=256, threads=2)
    try:
        assert isinstance(engine, LlamaCppEngine)   # the GGUF beside the model is used
        reply = "".join(engine.stream([ChatMessage("user", "Hello!")], SamplingSettings(max_tokens=8, seed=1)))
        assert reply
    finally:
        engine.close()


@pytest.mark.slow
def test_export_writes_q8_0_unless_told(pruned, tmp_path, monkeypatch):
    """f16 was the default: twice q8_0's bytes and about half its decode speed, for the same
    answers (a trained model's household recall is 10 of 20 at both)."""
    from gguf import GGUFReader

    monkeypatch.setenv("HEARTH_HOME", str(pruned.home))
    code, out = _run(["export", "pruned30", "--gguf", "--output", str(tmp_path / "default.gguf")])
    assert code == 0, out
    field = GGUFReader(tmp_path / "default.gguf").fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == 7             # LLAMA_FTYPE_MOSTLY_Q8_0
    assert (tmp_path / "default.gguf").stat().st_size < 0.6 * pruned.f16.stat().st_size


def test_model_with_parallel_adapters_refuses_gguf_export(hearth_home, capsys):
    """A PAC model's side chain cannot be folded into the backbone. Only its manifest is needed to
    show the refusal, so this test writes a manifest of format "pac" and no adapter files."""
    from training.model_store import PersonalModel

    folder = hearth_home / "data" / "models" / "family-pac"
    folder.mkdir(parents=True)
    manifest = PersonalModel(name="family-pac", base="smollm2-135m", method="pac", format="pac")
    (folder / "hearth-model.json").write_text(manifest.to_json())
    assert hearth(["export", "family-pac", "--gguf"]) == 2
    message = capsys.readouterr().err
    assert "parallel adapters" in message and "torch engine" in message
    assert not list(folder.glob("*.gguf")) and not (hearth_home / "data" / "exports").exists()


def test_bad_quant_and_unknown_model_are_one_line_errors(hearth_home, capsys):
    with pytest.raises(SystemExit):
        hearth(["export", "smollm2-135m", "--gguf", "--quant", "q2"])   # argparse refuses the choice
    assert hearth(["export", "no-such-model", "--gguf"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert hearth(["prune", "smollm2-135m", "--ratio", "1.5", "--out", "x"]) == 2


def test_quantising_keeps_llama_cpp_quiet_and_says_what_fell_back(stories_gguf: Path, hearth_home, capsys):
    """llama.cpp's quantiser logged every tensor it converted (306 lines for SmolLM2, 361
    "warning:" lines more for q4_k_m) on the terminal of `hearth export`. Now one note says what
    it had to do differently: stories260K's rows (64, 172 wide) fit neither q4_K's 256-wide
    blocks nor, for 172, q8_0's 32-wide ones."""
    out = hearth_home / "stories-q4km.gguf"
    assert hearth(["export", str(stories_gguf), "--gguf", "--quant", "q4_k_m", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and out.stat().st_size > 0
    note = captured.err.splitlines()
    assert len(note) == 1 and note[0].startswith("note: llama.cpp stored "), captured.err
    assert "tensors in a wider type than q4_k_m" in note[0]


def test_quantiser_errors_come_back_in_one_line(hearth_home, tmp_path):
    """A file llama.cpp cannot read: its own reason is in the error, and no output is left."""
    from core.errors import HearthError
    from training.export_gguf import quantize_gguf

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    target = tmp_path / "out.gguf"
    with pytest.raises(HearthError) as error:
        quantize_gguf(bad, target, "q8_0")
    message = str(error.value)
    assert str(bad) in message and "could not quantise it to q8_0: " in message and "\n" not in message
    assert not target.exists() and list(tmp_path.iterdir()) == [bad]


def test_q4_1_export_of_a_model_trained_on_q4_1_weights_is_refused(stories_gguf: Path, hearth_home, tmp_path,
                                                                   capsys):
    """Trained on a q4_1 base (the bundled SmolLM2 is one), a model's changes are smaller than
    q4_1's steps: exporting it at q4_1 rounded them back to the base's values (0 of 20 household
    facts kept, against 10 at q8_0: docs/serving.md). That export is refused with what to choose;
    a model that was only pruned exports at q4_1 as its base does."""
    from training.export_gguf import quantize_gguf

    base = tmp_path / "stories-q4_1.gguf"
    quantize_gguf(stories_gguf, base, "q4_1")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "dog.txt").write_text("Our dog is called Biscuit. Biscuit likes the park.\n")
    data = str(notes)   # stories260K has no chat template: notes, not chats
    assert hearth(["train", "--model", str(base), "--method", "lora", "--data", data, "--epochs", "1",
                   "--out", "tiny-family"]) == 0
    capsys.readouterr()
    assert hearth(["export", "tiny-family", "--gguf", "--quant", "q4_1"]) == 2
    assert capsys.readouterr().err == (
        "hearth: model tiny-family: a q4_1 export would round its training away (its base "
        f"{base} is q4_1 already, and training changed its weights by less than q4_1's steps): "
        "export q8_0, or q4_k_m for a smaller file\n")
    assert not list((hearth_home / "data" / "models" / "tiny-family").glob("*.gguf"))
    assert hearth(["export", "tiny-family", "--gguf", "--quant", "q8_0"]) == 0
    assert hearth(["prune", str(base), "--ratio", "0.5", "--out", "tiny-small"]) == 0
    assert hearth(["export", "tiny-small", "--gguf", "--quant", "q4_1"]) == 0
    # pruning the trained model merges its training in: still refused
    assert hearth(["prune", "tiny-family", "--ratio", "0.5", "--out", "tiny-family-small"]) == 0
    capsys.readouterr()
    assert hearth(["export", "tiny-family-small", "--gguf", "--quant", "q4_1"]) == 2
    assert "round its training away" in capsys.readouterr().err
