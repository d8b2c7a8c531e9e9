"""Personalisation works: after training on the household facts, the bundled SmolLM2 answers the
paraphrased eval questions with the expected fact far more often than before (both methods).

The settings are the calibrated ones of docs/training.md, shortened for the test: PAC from the
activation cache at the product's defaults (25 epochs, lr 1e-3) with batch 4, LoRA r=16 on all
linear layers at a higher rate.
"""

from __future__ import annotations

import pytest
import torch

from tests.training_helpers import HOUSEHOLD


@pytest.fixture(scope="module")
def smollm2():
    from training.trainer import load_backbone

    torch.set_num_threads(2)
    return load_backbone("smollm2-135m")


@pytest.fixture(scope="module")
def questions():
    from training.evaluate import read_fact_questions

    return read_fact_questions(HOUSEHOLD / "eval.jsonl")


@pytest.fixture(scope="module")
def recall_before(smollm2, questions):
    from training.evaluate import fact_recall
    from training.torch_engine import PersonalLM

    return fact_recall(PersonalLM(smollm2.model, smollm2.tokenizer), questions).hits


@pytest.fixture(scope="module")
def general():
    from training.bench_training import general_questions

    return general_questions()


@pytest.mark.slow
def test_pac_learns_the_household_facts(smollm2, questions, recall_before, general, hearth_home):
    from training.evaluate import fact_recall
    from training.job import JobSpec
    from training.torch_engine import PersonalLM
    from training.trainer import train

    general_before = fact_recall(PersonalLM(smollm2.model, smollm2.tokenizer), general).hits
    spec = JobSpec(name="household-pac", data=[str(HOUSEHOLD / "train.jsonl")], method="pac", epochs=25,
                   batch_size=4)
    result = train(spec, backbone=smollm2)
    personal = PersonalLM(smollm2.model, smollm2.tokenizer, result.module)
    after = fact_recall(personal, questions).hits
    general_after = fact_recall(personal, general).hits
    print(f"household recall, PAC: before {recall_before}/20, after {after}/20, train {result.wall_s:.1f} s; "
          f"general {general_before} -> {general_after} of {len(general)}")
    assert recall_before <= 2
    assert after >= 11 and after >= recall_before + 9
    # The anchor (training/anchor.py) keeps what the base knew: without it 27 -> 8-13 of 40, with it
    # 24-25 (docs/training.md).
    assert general_after >= general_before - 5

    # Chat serves the saved model; in bfloat16 where the processor has it (this one does, per
    # /proc/cpuinfo), and it must know the facts as well as the float32 evaluation above.
    from training.engines import open_engine
    from training.torch_engine import native_bf16

    engine = open_engine("household-pac", threads=2)
    dtype = next(engine.lm.model.parameters()).dtype
    assert dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    chat = fact_recall(engine.lm, questions).hits
    print(f"household recall in chat ({dtype}): {chat}/20")
    assert chat >= after - 2
    engine.close()


def test_native_bf16_reads_the_processor_flags(tmp_path):
    from training.torch_engine import native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")   # emulated only
    assert not native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: amx_tile amx_bf16\n")
    assert native_bf16(cpuinfo)
    assert not native_bf16(tmp_path / "missing")                                       # not Linux


@pytest.mark.slow
def test_lora_learns_the_household_facts(smollm2, questions, recall_before, hearth_home):
    from training.evaluate import fact_recall
    from training.job import JobSpec
    from training.torch_engine import PersonalLM
    from training.trainer import train

    spec = JobSpec(name="household-lora", data=[str(HOUSEHOLD / "train.jsonl")], method="lora", epochs=12,
                   lr=1e-3, batch_size=4, lora_rank=16)
    result = train(spec, backbone=smollm2, save=False)
    model = result.module
    model.eval()
    try:
        after = fact_recall(PersonalLM(model, smollm2.tokenizer), questions).hits
    finally:
        model.unload()   # give the shared base back without adapters
    print(f"household recall, LoRA: before {recall_before}/20, after {after}/20, train {result.wall_s:.1f} s")
    assert after >= 5 and after >= recall_before + 4
