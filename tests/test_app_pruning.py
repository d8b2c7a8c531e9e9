"""The Train form's "Target pruning": the base is pruned first and the job trains on the smaller
model, which is its recovery. It used to train, then prune the trained model with nothing after:
that model answered nothing (0 of 20 household facts against 11 of 20 in this order, SmolLM2,
LoRA, 30%; docs/app.md), and with PAC, the form's default, it failed after the whole job.

Real parts: a tiny random Llama, the household fixture, the app's TrainService, PEFT, the files
the job writes.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.training_helpers import HOUSEHOLD, tiny_llama_dir


def _plan(name: str, method: str = "lora", pruning: float = 0.5, devices: list[str] | None = None):
    from app.services.train import TrainPlan

    return TrainPlan(name, [str(HOUSEHOLD / "train.jsonl")], str(tiny_llama_dir()), method=method, epochs=1,
                     pruning=pruning, devices=devices or [], max_steps=2)


def _manifest(home, name: str) -> dict:
    return json.loads((home / "data" / "models" / name / "hearth-model.json").read_text())


@pytest.mark.parametrize("method", ["lora", "pac"])
def test_pruning_comes_first_and_the_job_trains_on_the_pruned_model(hearth_home, method):
    from app.services.train import TrainService
    from training.model_store import load_torch, resolve
    from training.pruning import prune_to_store
    from training.torch_engine import open_personal_lm

    service = TrainService("living-room")
    said = []
    assert service.run(_plan("family", method), said.append) == "family"
    assert said[0].phase == "prune" and "into family-base" in said[0].message
    base, family = _manifest(hearth_home, "family-base"), _manifest(hearth_home, "family")
    assert base["method"] == "pruned" and base["base"] == str(tiny_llama_dir())
    assert family["method"] == method and family["base"] == "family-base"
    assert family["pruning_ratio"] == base["pruning_ratio"] == 0.5   # the Models screen's "Pruned"

    # The pruned base is the untrained base, pruned with the family's data as calibration: the
    # same pruning done by hand gives the same weights.
    prune_to_store(str(tiny_llama_dir()), 0.5, "by-hand", [HOUSEHOLD / "train.jsonl"])
    pruned, _ = load_torch(resolve("family-base"))
    by_hand, _ = load_torch(resolve("by-hand"))
    full, _ = load_torch(resolve(str(tiny_llama_dir())))
    assert pruned.config.intermediate_size < full.config.intermediate_size
    for (name, a), (_, b) in zip(pruned.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), name

    # The trained model runs on the pruned weights.
    lm = open_personal_lm(hearth_home / "data" / "models" / "family", resolve("family").personal)
    assert lm.model.config.intermediate_size == pruned.config.intermediate_size
    assert lm.model.config.num_attention_heads == pruned.config.num_attention_heads < full.config.num_attention_heads
    assert lm.answers(["What do we call our dog?"], 4)


def test_retraining_never_replaces_a_base_a_model_runs_on(hearth_home):
    """Retraining `family` with pruning must not replace the base the old `family` runs on: a
    cancelled job would leave that model on weights of other shapes. The job prunes into the next
    free name; the Models screen refuses to delete a base a model runs on."""
    from app.services.models import ModelsService
    from app.services.train import TrainService, pruned_base_name
    from core.config import load_config
    from core.errors import HearthError

    service = TrainService("living-room")
    service.run(_plan("family"), lambda status: None)
    assert pruned_base_name("family") == "family-base-2"
    assert service.replaces("family", 0.5) == "A model named family exists: this job replaces it when it finishes."
    service.run(_plan("family"), lambda status: None)
    assert _manifest(hearth_home, "family")["base"] == "family-base-2"
    assert pruned_base_name("family") == "family-base"        # nothing runs on it any more
    assert service.replaces("family", 0.5) == "Models named family and family-base exist: this job replaces both."

    models = ModelsService(load_config())
    titles = {m.name: m.title for m in models.models()}
    assert titles["family-base-2"].endswith("; family runs on it")
    assert titles["family-base"].endswith("; answers poorly until trained (hearth train --model family-base)")
    from app.commands.models import model_rows

    rows = {row["name"]: row for row in model_rows()}
    assert rows["family-base-2"]["base_of"] == ["family"] and rows["family-base"]["base_of"] == []
    with pytest.raises(HearthError, match="model family-base-2 is the base of family, which run on it: delete it first"):
        models.delete("family-base-2")
    models.delete("family-base")
    assert not (hearth_home / "data" / "models" / "family-base").exists()


def test_pruning_is_refused_before_any_work_where_it_cannot_run(hearth_home):
    from app.services.train import TrainService
    from core.errors import HearthError

    service = TrainService("living-room")
    with pytest.raises(HearthError, match="a job with other devices trains the full model; choose no pruning"):
        service.check(_plan("family", "pac", devices=["living-room", "kitchen"]))
