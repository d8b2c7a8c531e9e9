"""PEFT LoRA (training/lora.py): the baseline and the mergeable path, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from tests.training_helpers import HOUSEHOLD, tiny_llama_dir


@pytest.fixture(scope="module")
def examples():
    from training.data import load_examples
    from training.trainer import load_backbone

    backbone = load_backbone(str(tiny_llama_dir()))
    return load_examples(HOUSEHOLD / "train.jsonl", backbone.tokenizer)


def _base():
    from training.trainer import load_backbone

    return load_backbone(str(tiny_llama_dir())).model


def test_lora_adapter_saves_loads_with_peft_and_merges(examples, tmp_path):
    from peft import PeftModel

    from training.data import collate
    from training.lora import LoraSettings, adapter_state, build_lora_model, lora_step, merge_adapter, save_adapter

    torch.manual_seed(0)
    model = build_lora_model(_base(), LoraSettings(rank=4, targets=["q_proj", "v_proj"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(examples[:4], 0)
    losses = [lora_step(model, optimizer, batch) for _ in range(5)]
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path / "adapter"))
    loaded.eval()
    assert set(adapter_state(model)) == set(adapter_state(loaded))
    with torch.no_grad():
        again = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        merged = merge_adapter(loaded)
        folded = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        plain = _base()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(again, trained, atol=1e-5)
    assert torch.allclose(folded, trained, atol=1e-4)
    assert not torch.allclose(plain, trained, atol=1e-4)


def test_lora_rank_must_be_positive():
    from core.errors import HearthError
    from training.lora import LoraSettings, build_lora_model

    with pytest.raises(HearthError, match="rank"):
        build_lora_model(_base(), LoraSettings(rank=0))
