"""Parallel adapters, the activation cache and the quantised backbone (ALGORITHMS.md sections 1-3),
on a tiny random Llama with SmolLM2's tokenizer (tests/training_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training_helpers import HOUSEHOLD, tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_backbone():
    from training.trainer import load_backbone

    torch.set_num_threads(2)
    return load_backbone(str(tiny_llama_dir()))


@pytest.fixture(scope="module")
def household_examples(tiny_backbone):
    from training.data import load_examples

    return load_examples(HOUSEHOLD / "train.jsonl", tiny_backbone.tokenizer)


def test_untrained_side_chain_gives_the_base_models_logits(tiny_backbone, household_examples):
    from training.data import collate
    from training.parallel_adapters import SideChain, SideChainConfig, full_logits

    model = tiny_backbone.model
    batch = collate(household_examples[:3], tiny_backbone.tokenizer.pad_token_id)
    chain = SideChain(SideChainConfig.for_backbone(model, every=1))
    with torch.no_grad():
        base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ours = full_logits(model, chain, batch.input_ids, batch.attention_mask)
    assert torch.allclose(ours, base, atol=1e-5, rtol=1e-5)
    # and a trained-looking chain (non-zero Up) changes them: the comparison above can fail
    torch.nn.init.normal_(chain.ups[0].weight, std=0.5)
    with torch.no_grad():
        moved = full_logits(model, chain, batch.input_ids, batch.attention_mask)
    assert not torch.allclose(moved, base, atol=1e-3)


def test_no_backbone_parameter_receives_a_gradient(tiny_backbone, household_examples):
    from training.data import collate
    from training.parallel_adapters import SideChain, SideChainConfig, backbone_taps, chain_loss, labelled_positions

    model = tiny_backbone.model
    chain = SideChain(SideChainConfig.for_backbone(model, every=2))
    with torch.no_grad():
        for up in chain.ups:
            up.weight.normal_(std=0.1)
    head = {id(p) for p in list(model.model.norm.parameters()) + list(model.get_output_embeddings().parameters())}
    body = [p for p in model.parameters() if id(p) not in head]
    try:
        for p in body:  # even if the backbone asked for gradients, none may reach it
            p.requires_grad_(True)
        batch = collate(household_examples[:4], tiny_backbone.tokenizer.pad_token_id)
        taps, _ = backbone_taps(model, chain.config, batch.input_ids, batch.attention_mask)
        rows, cols, targets = labelled_positions(batch)
        loss = chain_loss(model, chain, taps[rows, cols], targets)
        loss.backward()
    finally:
        for p in body:
            p.requires_grad_(False)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in chain.parameters())
    assert all(not p.requires_grad for p in model.parameters())


def test_sliced_loss_gives_the_whole_batchs_loss_and_gradients(tiny_backbone, household_examples):
    from training.data import collate
    from training.job import LOSS_SLICE, pac_gradients
    from training.parallel_adapters import SideChain, SideChainConfig, backbone_taps, chain_loss, labelled_positions

    model = tiny_backbone.model
    torch.manual_seed(0)
    chain = SideChain(SideChainConfig.for_backbone(model, every=2))
    with torch.no_grad():
        for up in chain.ups:
            up.weight.normal_(std=0.1)
    batch = collate(household_examples[:12], tiny_backbone.tokenizer.pad_token_id)
    taps, _ = backbone_taps(model, chain.config, batch.input_ids, batch.attention_mask)
    rows, cols, targets = labelled_positions(batch)
    positions = taps[rows, cols]
    assert len(targets) > 2 * LOSS_SLICE and len(targets) % LOSS_SLICE  # several slices, one short

    loss, grads = pac_gradients(model, chain, positions, targets)
    chain.zero_grad(set_to_none=True)
    whole = chain_loss(model, chain, positions, targets)
    whole.backward()
    assert loss == pytest.approx(float(whole), rel=1e-5)
    for name, p in chain.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_the_loss_floor_changes_neither_loss_nor_gradients():
    """The adapter's loss raises logits far below their row's largest (exp() of them would be
    subnormal, which is slow): on logits spread over hundreds, loss and gradients are the plain
    cross-entropy's."""
    from training.parallel_adapters import SOFTMAX_RANGE, floored_cross_entropy

    torch.manual_seed(0)
    base = torch.randn(64, 1000) * 100
    targets = torch.randint(0, 1000, (64,))
    spread = base.amax(dim=-1) - base.amin(dim=-1)
    assert float(spread.min()) > 2 * SOFTMAX_RANGE   # the floor really acts on every row
    floored = base.clone().requires_grad_(True)
    plain = base.clone().requires_grad_(True)
    a = floored_cross_entropy(floored, targets)
    b = torch.nn.functional.cross_entropy(plain, targets)
    a.backward()
    b.backward()
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert torch.allclose(floored.grad, plain.grad, rtol=1e-5, atol=1e-12)


def _pac_spec(name: str, data: Path, **overrides):
    from training.job import JobSpec

    settings = dict(name=name, data=[str(data)], model=str(tiny_llama_dir()), method="pac", epochs=3,
                    batch_size=4, lr=5e-3, tap_every=2, cache_shard_size=8)
    settings.update(overrides)
    return JobSpec(**settings)


def test_training_from_the_cache_gives_the_same_adapter_as_without(tiny_backbone, hearth_home):
    from training.trainer import train

    data = HOUSEHOLD / "train.jsonl"
    plain = train(_pac_spec("plain", data, cache=False), backbone=tiny_backbone, save=False)
    exact = train(_pac_spec("exact", data, cache_dtype="float32"), backbone=tiny_backbone, save=False)
    half = train(_pac_spec("half", data, cache_dtype="float16"), backbone=tiny_backbone, save=False)
    assert plain.losses[-1] < plain.losses[0]
    for name, weight in plain.module.state_dict().items():
        # float32 cache: the same numbers up to batch-shape rounding of the backbone forward
        assert torch.allclose(exact.module.state_dict()[name], weight, atol=1e-5), name
        # float16 cache: the tolerance a half-precision copy of the activations allows
        assert torch.allclose(half.module.state_dict()[name], weight, atol=2e-3), name
    assert exact.losses == pytest.approx(plain.losses, abs=1e-5)


def test_cache_is_read_not_recomputed_after_epoch_one(tiny_backbone, hearth_home, monkeypatch):
    from training import parallel_adapters
    from training.trainer import train

    calls = []
    real = parallel_adapters.backbone_taps
    monkeypatch.setattr(parallel_adapters, "backbone_taps", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = _pac_spec("count", HOUSEHOLD / "train.jsonl", epochs=4)
    result = train(spec, backbone=tiny_backbone, save=False)
    # 20 samples in shards of 8, each shard's passes sorted by length (about 4 samples' tokens
    # each): those passes fill the cache (the side chain is calibrated from it), and the anchor's
    # general chats take theirs once (training/anchor.py), then none
    from training.anchor import anchor_examples
    from training.data import read_sources, tokenize
    from training.trainer import length_chunks

    examples = tokenize(read_sources(spec.data), tiny_backbone.tokenizer, spec.max_length)
    passes = sum(len(length_chunks(examples, list(range(b, min(b + 8, 20))), 4)) for b in range(0, 20, 8))
    general = anchor_examples(tiny_backbone.tokenizer)
    anchor_passes = len(length_chunks(general, list(range(len(general))), spec.batch_size))
    assert 5 <= passes <= 10 and anchor_passes >= 1 and len(calls) == passes + anchor_passes
    assert result.steps == 20


def test_epoch_one_passes_group_similar_lengths_and_stay_under_the_token_cap():
    """A batch of 128 with lengths from 40 to 600 tokens: no pass is padded past PASS_TOKENS
    (unless one sample alone is longer), every sample is in exactly one pass, and little is
    padding (the old passes of a whole batch's tokens padded this set to twice its size)."""
    from training.data import Example
    from training.trainer import PASS_TOKENS, length_chunks

    lengths = [40 + (i * 37) % 560 for i in range(128)]
    examples = [Example([1] * n, [-100] * n, f"sample {i}") for i, n in enumerate(lengths)]
    passes = length_chunks(examples, list(range(128)), 128)
    assert sorted(i for chunk in passes for i in chunk) == list(range(128))
    padded = [len(chunk) * max(lengths[i] for i in chunk) for chunk in passes]
    assert all(p <= PASS_TOKENS or len(chunk) == 1 for p, chunk in zip(padded, passes))
    assert sum(padded) < 1.1 * sum(lengths)


def test_crash_in_epoch_one_resumes_at_the_last_complete_shard(tiny_backbone, hearth_home, monkeypatch):
    from training import activation_cache
    from training.trainer import train

    real = activation_cache.ActivationCache.write_shard
    written = []

    def crash_on_third(self, shard, acts, targets):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        written.append(shard)
        real(self, shard, acts, targets)

    spec = _pac_spec("crash", HOUSEHOLD / "train.jsonl", cache_dtype="float32")
    monkeypatch.setattr(activation_cache.ActivationCache, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(spec, backbone=tiny_backbone, save=False)
    monkeypatch.setattr(activation_cache.ActivationCache, "write_shard",
                        lambda self, shard, a, t: written.append(shard) or real(self, shard, a, t))
    resumed = train(spec, resume=True, backbone=tiny_backbone, save=False)
    assert written == [0, 1, 2]   # shards 0 and 1 survived the crash; only shard 2 was computed again
    fresh = train(_pac_spec("fresh", HOUSEHOLD / "train.jsonl", cache=False), backbone=tiny_backbone, save=False)
    for name, weight in fresh.module.state_dict().items():
        assert torch.allclose(resumed.module.state_dict()[name], weight, atol=1e-5), name


def test_int8_cache_rows_round_trip(tmp_path):
    from training.activation_cache import ActivationCache, CacheKey

    key = CacheKey("b", "t", "d", (1, 3), "int8")
    cache = ActivationCache(tmp_path, key, n_samples=3, shard_size=2, n_inputs=2, hidden=16)
    torch.manual_seed(0)
    acts = [torch.randn(n, 2, 16) * 30 for n in (5, 0, 7)]
    targets = [torch.arange(n) for n in (5, 0, 7)]
    cache.write_shard(0, acts[:2], targets[:2])
    assert cache.missing_shards() == [1]
    cache.write_shard(1, acts[2:], targets[2:])
    for i in range(3):
        got, tgt = cache.sample(i)
        assert got.shape == acts[i].shape and torch.equal(tgt, targets[i])
        if acts[i].numel():
            assert (got - acts[i]).abs().max() <= acts[i].abs().amax(-1).max() / 127 * 0.51 + 1e-6


def test_cache_key_changes_with_taps_data_and_backbone():
    from training.activation_cache import CacheKey

    base = CacheKey("smollm2|none", "tok", "data", (2, 5), "float16")
    assert len({base.digest(), CacheKey("smollm2|nf4", "tok", "data", (2, 5), "float16").digest(),
                CacheKey("smollm2|none", "tok", "data2", (2, 5), "float16").digest(),
                CacheKey("smollm2|none", "tok", "data", (2, 4), "float16").digest(),
                CacheKey("smollm2|none", "tok2", "data", (2, 5), "float16").digest(),
                CacheKey("smollm2|none", "tok", "data", (2, 5), "float16", means=(2, 5)).digest(),
                CacheKey("smollm2|none", "tok", "data", (2, 5), "float16", means=(2, 5), mean_decay=0.9).digest()}) == 7


def test_running_means_carried_with_the_kv_cache_equal_a_whole_sequence_pass(tiny_backbone):
    """The running means are the decay-weighted means of the tapped states; generation feeds the
    prompt, then one token at a time, and the chain's inputs at each new position equal those of
    one pass over the whole sequence; a left-padded row gets the same inputs as the row alone."""
    from training.parallel_adapters import SideChainConfig, backbone_taps

    model = tiny_backbone.model
    config = SideChainConfig.for_backbone(model, every=1)
    assert config.means == config.taps and config.n_inputs == 2 * len(config.taps)
    ids = torch.tensor([tiny_backbone.tokenizer("Where do we keep the spare key? Under the blue pot.")["input_ids"]])
    whole, _ = backbone_taps(model, config, ids)
    assert whole.shape == (1, ids.shape[1], config.n_inputs, config.hidden_size)
    states = whole[:, :, len(config.means):]
    # Each position's mean, written out: weights decay ** (t - s) over the positions s <= t.
    length, decay = ids.shape[1], config.mean_decay
    lags = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    weights = torch.where(lags >= 0, decay ** lags.clamp(min=0).double(), 0.0)
    expected = torch.einsum("ts,snd->tnd", weights / weights.sum(dim=1, keepdim=True), states[0].double())
    assert torch.allclose(whole[0, :, :len(config.means)].double(), expected, atol=1e-4)
    assert 0.0 < decay < 1.0

    split = 5
    first, past = backbone_taps(model, config, ids[:, :split], use_cache=True)
    pieces = [first]
    for t in range(split, ids.shape[1]):
        piece, past = backbone_taps(model, config, ids[:, t:t + 1], past=past, use_cache=True)
        pieces.append(piece)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4)

    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    shifted, _ = backbone_taps(model, config, padded, mask)
    assert torch.allclose(shifted[:, pad:], whole, atol=1e-4)


def test_a_side_chain_saved_before_running_means_still_loads_and_answers(tmp_path, tiny_backbone):
    import json

    from core.errors import HearthError
    from training.parallel_adapters import SideChain, SideChainConfig, full_logits
    from training.trainer import load_side_chain, save_side_chain

    old = SideChainConfig.for_backbone(tiny_backbone.model)
    old.means = []
    chain = SideChain(old)
    torch.nn.init.normal_(chain.ups[0].weight, std=0.1)
    save_side_chain(chain, tmp_path)
    saved = json.loads((tmp_path / "side_chain.json").read_text())
    del saved["means"], saved["mean_decay"]    # as an earlier Hearth wrote it
    (tmp_path / "side_chain.json").write_text(json.dumps(saved))
    loaded = load_side_chain(tmp_path)
    assert loaded.config.means == [] and len(loaded.downs) == len(old.taps)
    ids = torch.tensor([tiny_backbone.tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(full_logits(tiny_backbone.model, loaded, ids), full_logits(tiny_backbone.model, chain, ids))
    with pytest.raises(HearthError, match="not tapped"):
        SideChainConfig(8, 2, [1], 2, means=[0])
    with pytest.raises(HearthError, match="mean_decay"):
        SideChainConfig(8, 2, [1], 2, means=[1], mean_decay=0.0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantised_backbone_trains_a_side_chain(mode, hearth_home):
    from training.parallel_adapters import SideChain, SideChainConfig, full_logits
    from training.quant import quantize_backbone, weight_bytes
    from training.trainer import load_backbone, train

    full = load_backbone(str(tiny_llama_dir()))
    quant = load_backbone(str(tiny_llama_dir()), mode)
    from training.offline_bitsandbytes import import_bitsandbytes

    bnb = import_bitsandbytes()

    kinds = {type(m) for m in quant.model.model.layers.modules()}
    assert (bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt) in kinds
    assert torch.nn.Linear not in kinds
    assert weight_bytes(quant.model) < weight_bytes(full.model)
    assert quant.identity != full.identity  # a quantised backbone never reads a float32 cache
    ids = torch.tensor([full.tokenizer("The dog is called Biscuit.")["input_ids"]])
    chain = SideChain(SideChainConfig.for_backbone(full.model))
    with torch.no_grad():
        a, b = full_logits(full.model, chain, ids), full_logits(quant.model, chain, ids)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9
    result = train(_pac_spec(f"q-{mode}", HOUSEHOLD / "train.jsonl", quant=mode, epochs=2), backbone=quant, save=False)
    assert result.losses[-1] < result.losses[0]
    assert quantize_backbone(full.model, "none") == 0


def test_nf4_layers_compute_in_float32_in_eval_mode_too(stories_gguf):
    """Quantised layers multiply by their dequantised weights in float32 whatever the module's
    mode: bitsandbytes would otherwise repack them for a bf16 kernel once a model is put in eval
    mode (on AVX512-BF16 CPUs), which changes the numbers training and chat get."""
    from training.offline_bitsandbytes import import_bitsandbytes

    bnb = import_bitsandbytes()

    from training.trainer import load_backbone

    model = load_backbone(str(stories_gguf), "nf4").model
    model.eval()
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and not layer.training
    x = torch.randn(3, 5, layer.in_features)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight), atol=1e-5)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_batched_greedy_answers_match_one_at_a_time(tiny_backbone):
    from training.evaluate import read_fact_questions
    from training.parallel_adapters import SideChain, SideChainConfig
    from training.torch_engine import PersonalLM

    questions = [q for q, _ in read_fact_questions(HOUSEHOLD / "eval.jsonl")][:6]
    chain = SideChain(SideChainConfig.for_backbone(tiny_backbone.model))
    torch.manual_seed(0)
    for up in chain.ups:
        torch.nn.init.normal_(up.weight, std=0.05)
    for side in (None, chain):
        lm = PersonalLM(tiny_backbone.model, tiny_backbone.tokenizer, side)
        assert lm.answers(questions, 8, batch_size=4) == [lm.answer(q, 8) for q in questions]


def test_calibration_standardises_every_channel_and_floors_the_constant_ones():
    """A tap whose channels differ in scale by 100,000 (as a small model's massive activations
    do) and one channel that never varies: after `calibrate` each channel reaches Down with mean 0
    and deviation 1, except that one at the floor's scale (1% of the median deviation) is damped
    rather than blown up and the constant one stays finite; the untrained chain still adds 0."""
    from training.parallel_adapters import SideChain, SideChainConfig

    torch.manual_seed(0)
    chain = SideChain(SideChainConfig(hidden_size=8, num_layers=2, taps=[0, 1], bottleneck=2))
    scale = torch.tensor([1000.0, 1, 1, 1, 0.01, 5, 1, 1])
    taps = torch.randn(400, 2, 8) * scale + 3.0
    taps[:, :, 7] = 42.0
    chain.calibrate(taps)
    z = (taps - chain.input_mean) / chain.input_std
    assert torch.allclose(z[..., :7].mean(dim=0), torch.zeros(2, 7), atol=1e-4)
    varying = [0, 1, 2, 3, 5, 6]
    assert torch.allclose(z[..., varying].std(dim=0), torch.ones(2, 6), atol=2e-2)
    assert 0.4 < float(z[..., 4].std(dim=0).min()) and float(z[..., 4].std(dim=0).max()) < 0.6
    assert torch.isfinite(z).all() and float(chain.input_std[:, 7].min()) > 0
    assert torch.equal(chain(taps), torch.zeros(400, 8))
    with pytest.raises(Exception, match="two labelled positions"):
        chain.calibrate(taps[:1])


def test_a_job_calibrates_its_side_chain_on_its_first_samples_and_saves_the_statistics(tiny_backbone, hearth_home):
    """The statistics come from the first samples of epoch 1's order (read from the cache, or
    from a backbone pass without it), and travel with the saved model (a chain saved without them
    is refused with a message naming its folder)."""
    import json

    from core.errors import HearthError
    from training.data import read_conversations, tokenize
    from training.trainer import SIDE_CHAIN_CONFIG, calibration_samples, load_side_chain, taps_at_labels, train

    spec = _pac_spec("calibrated", HOUSEHOLD / "train.jsonl", epochs=1)
    result = train(spec, backbone=tiny_backbone)
    chain = result.module
    examples = tokenize(read_conversations(HOUSEHOLD / "train.jsonl"), tiny_backbone.tokenizer, spec.max_length)
    first = calibration_samples(len(examples), spec)
    assert len(first) == 16 and len(set(first)) == 16
    taps = torch.cat([taps_at_labels(tiny_backbone.model, chain.config, examples, [i], 0)[0] for i in first])
    # the job's cache is float16: its rounding, no more
    assert torch.allclose(chain.input_mean, taps.mean(dim=0), rtol=1e-3, atol=1e-3)
    assert float(chain.input_std.min()) > 0 and not torch.equal(chain.input_std, torch.ones_like(chain.input_std))
    plain = train(_pac_spec("calibrated-plain", HOUSEHOLD / "train.jsonl", epochs=1, cache=False),
                  backbone=tiny_backbone, save=False)
    assert torch.allclose(plain.module.input_mean, taps.mean(dim=0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(plain.module.input_std, chain.input_std, rtol=1e-2, atol=1e-3)

    folder = result.output
    loaded = load_side_chain(folder)
    assert torch.equal(loaded.input_mean, chain.input_mean) and torch.equal(loaded.input_std, chain.input_std)
    config = json.loads((folder / SIDE_CHAIN_CONFIG).read_text())
    del config["inputs"]
    (folder / SIDE_CHAIN_CONFIG).write_text(json.dumps(config))
    with pytest.raises(HearthError, match="train the model again") as caught:
        load_side_chain(folder)
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize("method", ["pac", "lora"])
def test_every_step_runs_at_the_cosine_schedules_rate(method, tiny_backbone, hearth_home, monkeypatch):
    """A job's rate decays from its peak at step 0 to near zero at its last step, as a function
    of the step alone (so a resumed job and pooled replicas, which are sent the rate, agree)."""
    from training import job, trainer

    peak = 2e-3
    rates = [job.scheduled_lr(peak, step, 10) for step in range(10)]
    assert rates[0] == peak and rates[5] == pytest.approx(peak / 2)
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < peak / 30
    seen = []
    real = job.set_learning_rate
    monkeypatch.setattr(job, "set_learning_rate", lambda optimizer, lr: (seen.append(lr), real(optimizer, lr)))
    monkeypatch.setattr(trainer, "set_learning_rate", job.set_learning_rate)
    # 20 household samples, batch 4: 5 steps an epoch, 10 in all
    spec = _pac_spec(f"schedule-{method}", HOUSEHOLD / "train.jsonl", epochs=2, method=method, lr=peak)
    result = trainer.train(spec, backbone=tiny_backbone, save=False)
    if method == "lora":
        result.module.unload()
    assert seen == rates
