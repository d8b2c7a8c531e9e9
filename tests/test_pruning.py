"""Structured pruning (ALGORITHMS.md section 5): plans, physical removal, LoRA-gradient importance.

The fast tests use a tiny randomly initialised Llama (real transformers modules, built from a
config: no download); the slow ones prune the bundled SmolLM2-135M (see test_export_gguf.py for
the GGUF side and tests/pruned_model.py for the shared fixture).
"""

from __future__ import annotations

import json

import pytest
import torch

from core.errors import HearthError
from training import pruning


def tiny_llama(heads: int = 6, kv: int = 2, layers: int = 3, width: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_query_heads_go_evenly_from_every_kv_group():
    model = tiny_llama(heads=6, kv=2)
    scores = pruning.magnitude_importance(model)
    plan = pruning.plan_pruning(model, scores, ratio=0.3, channel_align=8)
    for kept in plan.keep_heads:
        assert len(kept) == 4
        assert sum(1 for h in kept if h < 3) == 2 and sum(1 for h in kept if h >= 3) == 2
    assert plan.head_ratio == pytest.approx(1 / 3)
    assert all(len(c) == len(plan.keep_channels[0]) for c in plan.keep_channels)
    assert len(plan.keep_channels[0]) % 8 == 0


def test_the_least_important_units_are_the_ones_removed():
    model = tiny_llama(heads=6, kv=2, layers=2, width=64)
    heads = torch.tensor([[5.0, 1.0, 4.0, 3.0, 6.0, 0.5]] * 2)
    channels = torch.arange(64, dtype=torch.float).repeat(2, 1)
    plan = pruning.plan_pruning(model, pruning.UnitScores(heads, channels), ratio=0.5, channel_align=16)
    assert plan.keep_heads[0] == [0, 2, 3, 4]          # one per group: heads 1 and 5 scored lowest
    assert plan.keep_channels[0] == list(range(32, 64))


def test_pruned_model_is_physically_smaller_and_still_runs():
    model = tiny_llama()
    before = pruning.parameter_count(model)
    ids = torch.randint(0, 64, (2, 10))
    plan = pruning.prune(model, pruning.magnitude_importance(model), 0.5)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (len(plan.keep_heads[0]) * 8, 48)
    assert layer.self_attn.o_proj.weight.shape == (48, len(plan.keep_heads[0]) * 8)
    assert layer.mlp.down_proj.weight.shape[1] == model.config.intermediate_size < 96
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    assert pruning.parameter_count(model) < before
    assert model(ids).logits.shape == (2, 10, 64)


def test_pruning_zero_ratio_keeps_the_model_exact():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        pruning.prune(model, pruning.magnitude_importance(model), 0.0)
        after = model(ids).logits
    assert torch.allclose(before, after)


def test_group_granularity_removes_whole_kv_groups():
    model = tiny_llama(heads=6, kv=3)
    plan = pruning.prune(model, pruning.magnitude_importance(model), 0.3, granularity="group")
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == 16
    assert plan.head_ratio == pytest.approx(1 / 3)
    model(torch.randint(0, 64, (1, 5)))


def test_bad_ratio_is_refused():
    model = tiny_llama()
    with pytest.raises(HearthError, match="ratio"):
        pruning.plan_pruning(model, pruning.magnitude_importance(model), 1.0)


def test_lora_gradient_importance_and_pruning_alternate_with_recovery():
    """LoRAPrune-style scores from a real backward pass; pruning cuts the LoRA factors too, and
    LoRA training continues on the smaller model."""
    from training.lora import LoraSettings, build_lora_model

    model = build_lora_model(tiny_llama(), LoraSettings(rank=4))
    tracker = pruning.LoraImportance()
    ids = torch.randint(0, 64, (2, 12))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        # B starts at zero in LoRA: a step makes it non-zero so both factor gradients count.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        scores = tracker.update(model)
        optimizer.step()
        optimizer.zero_grad()
    assert scores.source == "lora-gradient" and tracker.updates == 2
    assert torch.all(scores.heads >= 0) and float(scores.heads.sum()) > 0
    assert torch.allclose(scores.channels.sum(dim=1), torch.ones(3))
    pruning.prune(model, scores, 0.5)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.shape[0] == q.base_layer.weight.shape[0]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()                                      # recovery keeps training after the cut
    assert tracker.update(model).heads.shape[1] == model.base_model.model.config.num_attention_heads


def test_pruned_tiny_model_saves_as_a_plain_llama_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model = tiny_llama()
    pruning.prune(model, pruning.magnitude_importance(model), 0.3)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    pruning.write_hf_folder(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_dim"] == 8 and config["num_attention_heads"] == 4
    assert "auto_map" not in config
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.layers[1].mlp.up_proj.weight.shape[0] == config["intermediate_size"]
