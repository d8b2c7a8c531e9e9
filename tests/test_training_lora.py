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
    from training.offline_bitsandbytes import import_bitsandbytes

    import_bitsandbytes()   # before peft: tests/test_offline.py
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


def test_sliced_loss_gives_the_whole_loss_and_gradients(examples):
    """The LM head a slice of positions at a time (federated rounds) gives `lora_loss` and the
    gradients of its backward, with several slices and a short last one."""
    from training.data import IGNORE, collate
    from training.job import LOSS_SLICE
    from training.lora import LoraSettings, build_lora_model, lora_loss, sliced_lora_loss

    torch.manual_seed(0)
    model = build_lora_model(_base(), LoraSettings(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():   # B starts at zero: give the factors values so every gradient is live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.eval()
    batch = collate(examples[:12], 0)
    labelled = int((batch.labels[:, 1:] != IGNORE).sum())
    assert labelled > 2 * LOSS_SLICE and labelled % LOSS_SLICE

    whole = lora_loss(model, batch)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss = sliced_lora_loss(model, batch, backward=True)
    assert loss == pytest.approx(float(whole), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-7), name
    with torch.no_grad():
        assert sliced_lora_loss(model, batch) == pytest.approx(float(whole), rel=1e-5)
