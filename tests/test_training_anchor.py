"""The anchor (training/anchor.py): a PAC job keeps the base model's next-token distribution on
general chats while it learns the household's facts. On the tiny random Llama of
tests/training_helpers.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training_helpers import HOUSEHOLD, tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_backbone():
    """The tiny random Llama with its final norm's weights scaled up: untouched, its logits are
    all within about 0.1 of each other (random embeddings of width 32), a distribution nothing
    moves far from; scaled, it predicts with a confidence like a trained model's."""
    from training.trainer import load_backbone

    torch.set_num_threads(2)
    backbone = load_backbone(str(tiny_llama_dir()))   # its own copy: other modules' stays as it is
    with torch.no_grad():
        backbone.model.model.norm.weight.mul_(60.0)
    return backbone


@pytest.fixture(scope="module")
def anchor(tiny_backbone):
    from training.anchor import anchor_examples, build_anchor
    from training.parallel_adapters import SideChainConfig

    config = SideChainConfig.for_backbone(tiny_backbone.model, every=2)
    return config, build_anchor(tiny_backbone.model, tiny_backbone.tokenizer, config,
                                anchor_examples(tiny_backbone.tokenizer))


def _spec(name, **overrides):
    from training.job import JobSpec

    settings = dict(name=name, data=[str(HOUSEHOLD / "train.jsonl")], method="pac", epochs=3, batch_size=4,
                    lr=5e-3, tap_every=2, cache_shard_size=8)
    settings.update(overrides)
    return JobSpec(**settings)


def _kl_to_base(backbone, chain, anchor) -> float:
    from training.anchor import anchor_kl
    from training.parallel_adapters import head_logits

    with torch.no_grad():
        logits = head_logits(backbone.model, chain, anchor.taps.float())
        return float(anchor_kl(logits, anchor.top_ids, anchor.top_logp, anchor.rest_logp))


def test_a_pac_job_is_anchored_to_the_base_by_default():
    from training.job import JobSpec

    assert JobSpec(name="x", data=["f.jsonl"]).anchor > 0


def test_the_anchor_chats_are_none_of_the_general_evaluation_questions():
    from importlib import resources

    from training.anchor import ANCHOR_CHATS

    assets = resources.files("assets")
    chats = [json.loads(line) for line in assets.joinpath(ANCHOR_CHATS).read_text("utf-8").splitlines()]
    asked = {chat["messages"][0]["content"].lower() for chat in chats}
    evaluated = [json.loads(line) for line in
                 assets.joinpath("eval/general_questions.jsonl").read_text("utf-8").splitlines()]
    assert len(chats) >= 40 and len(evaluated) >= 40
    assert not asked & {row["question"].lower() for row in evaluated}


def test_the_anchor_is_zero_with_zero_gradient_at_the_base(tiny_backbone, anchor):
    """An untrained chain is the base: no KL, and no pull."""
    from training.anchor import TOP_K, anchor_gradients
    from training.parallel_adapters import SideChain

    config, found = anchor
    assert len(found) > 200 and found.top_ids.shape[1] == TOP_K
    # the kept tokens and the rest bucket are the base's whole distribution
    total = torch.cat([found.top_logp, found.rest_logp[:, None]], dim=1).logsumexp(dim=1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-4)
    chain = SideChain(config)
    kl, grads = anchor_gradients(tiny_backbone.model, chain, found, found.positions(0, 0))
    assert abs(kl) < 1e-5
    assert max(float(g.abs().max()) for g in grads.values()) < 1e-5


def test_the_anchor_pulls_the_side_chain_towards_the_base(tiny_backbone, anchor, hearth_home):
    """The same job with and without the anchor: both learn the household data, but the anchored
    chain's distribution on the general chats stays much closer to the base's."""
    from training.trainer import train

    _, found = anchor
    free = train(_spec("free", anchor=0.0, lr=2e-2), backbone=tiny_backbone, save=False)
    held = train(_spec("held", anchor=1.0, lr=2e-2), backbone=tiny_backbone, save=False)
    assert not free.anchor_losses and len(held.anchor_losses) == held.steps and held.anchor_s > 0
    assert held.losses[-1] < 0.9 * held.losses[0] and free.losses[-1] < 0.9 * free.losses[0]
    drift_free = _kl_to_base(tiny_backbone, free.module, found)
    drift_held = _kl_to_base(tiny_backbone, held.module, found)
    assert drift_held < 0.5 * drift_free, (drift_held, drift_free)


def test_each_step_draws_the_same_anchor_positions_wherever_it_runs(anchor):
    """A function of seed and step: a resumed job draws what the uninterrupted one drew."""
    from training.anchor import POSITIONS

    _, found = anchor
    first = found.positions(3, 17)
    assert torch.equal(first, found.positions(3, 17)) and len(first) == POSITIONS
    assert not torch.equal(first, found.positions(3, 18)) and not torch.equal(first, found.positions(4, 17))


def test_a_model_without_a_chat_template_is_not_anchored(tiny_backbone):
    """It learns notes, and is never asked a chat question: no anchor, and no chats to render."""
    from types import SimpleNamespace

    from training.anchor import job_anchor
    from training.parallel_adapters import SideChainConfig

    config = SideChainConfig.for_backbone(tiny_backbone.model, every=2)
    notes_only = SimpleNamespace(model=tiny_backbone.model, tokenizer=SimpleNamespace(chat_template=None),
                                 identity=tiny_backbone.identity)
    assert job_anchor(notes_only, config) is None


def test_the_anchor_is_built_once_per_base_and_read_by_later_jobs(tiny_backbone, anchor, hearth_home, monkeypatch):
    """Every job of a base built the same anchor again (about 4 s of backbone work on SmolLM2, a
    sixth of the household job). Now the first job keeps it; a later job reads exactly what it
    would have built; a kept file that is damaged is built anew (a base whose weights changed
    has another key: the next test)."""
    import training.anchor as anchor_module
    from training.anchor import anchor_examples, anchor_path, job_anchor

    config, built = anchor
    builds = []
    real_build = anchor_module.build_anchor
    monkeypatch.setattr(anchor_module, "build_anchor", lambda *a, **k: builds.append(1) or real_build(*a, **k))

    def same(found) -> bool:
        return all(torch.equal(getattr(found, name), getattr(built, name))
                   for name in ("taps", "top_ids", "top_logp", "rest_logp"))

    first = job_anchor(tiny_backbone, config)
    assert builds == [1] and same(first)
    assert same(job_anchor(tiny_backbone, config)) and builds == [1]      # read, not built
    path = anchor_path(tiny_backbone.identity, tiny_backbone.tokenizer, config,
                       anchor_examples(tiny_backbone.tokenizer))
    assert path.is_file() and hearth_home in path.parents
    path.write_bytes(path.read_bytes()[:100])                                # a damaged file
    assert same(job_anchor(tiny_backbone, config)) and builds == [1, 1]
    assert same(job_anchor(tiny_backbone, config)) and builds == [1, 1]      # and kept whole again


def test_a_base_whose_weights_change_at_the_same_path_gets_another_key(tmp_path):
    """A model pruned again under the same name keeps its folder: the caches keyed on the
    backbone (activation cache, anchor) must not take it for the old one."""
    import os

    from training.trainer import files_stamp

    folder = tmp_path / "p30"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before = files_stamp(folder)
    assert files_stamp(folder) == before
    weights.write_bytes(b"b" * 64)                      # the same size, written again
    os.utime(weights, ns=(1, 1))
    assert files_stamp(folder) != before
    assert files_stamp(None) == ""


def test_only_the_most_recently_used_anchors_are_kept(tiny_backbone, anchor, hearth_home):
    """A base pruned again or deleted left its anchor in the cache for ever (14 MB for SmolLM2).
    Building one now forgets all but the KEPT_ANCHORS most recently used; reading one counts as
    using it, so the anchor of the base a family trains on survives older bases' files."""
    import os

    from training.anchor import KEPT_ANCHORS, anchor_examples, anchor_path, job_anchor

    config, _ = anchor
    path = anchor_path(tiny_backbone.identity, tiny_backbone.tokenizer, config, anchor_examples(tiny_backbone.tokenizer))
    job_anchor(tiny_backbone, config)                                   # built and kept
    folder = path.parent
    old = []
    for i in range(KEPT_ANCHORS + 1):                                   # other bases' anchors, older
        other = folder / f"other-{i}-top32.safetensors"
        other.write_bytes(b"x")
        os.utime(other, ns=(10**9 * (i + 1),) * 2)
        old.append(other)
    os.utime(path, ns=(1, 1))                                           # ours: the oldest of all
    job_anchor(tiny_backbone, config)                                   # read: used now
    assert path.is_file() and path.stat().st_mtime > 10**6
    path.unlink()                                                       # this base's anchor is built again
    job_anchor(tiny_backbone, config)
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == KEPT_ANCHORS and path.name in left
    assert left == sorted([path.name] + [p.name for p in old[-(KEPT_ANCHORS - 1):]])
