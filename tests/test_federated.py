"""Federated training (FedSpine) with the real job parts, no sockets: devices are FedJobs driven
directly (the same `handle` the mesh calls), on the tiny random Llama with SmolLM2's tokenizer.

Each member's data is private and different (a grandmother's recipes, a teenager's plans, a
father's car notes), with a held-out part to measure the family model on. The three-host version
over real mesh connections, with a packet capture and a SIGKILL, is test_federated_netns.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import time
from pathlib import Path

import pytest
import torch

from core.errors import HearthError
from tests.training_helpers import tiny_llama_dir, write_jsonl

MEMBERS = ("grandma", "teen", "dad")


def member_rows(member: str, count: int, seed: int = 0, canary: str = "") -> list[dict]:
    """Chats in one member's own style and topic; the first one carries `canary` if given."""
    rng = random.Random(f"{member}-{seed}")
    rows = []
    for i in range(count):
        if member == "grandma":
            dish = rng.choice(["apple pie", "lemon cake", "plum tart", "bread", "cookies", "scones"])
            q, a = f"How long do I bake the {dish}?", f"Bake the {dish} for {rng.randint(2, 9) * 5} minutes at {rng.choice([160, 180, 200])} degrees."
        elif member == "teen":
            friend = rng.choice(["Mia", "Leo", "Zoe", "Sam", "Ava", "Noah"])
            q, a = f"When is {friend}'s party?", f"{friend}'s party is on {rng.choice(['Friday', 'Saturday', 'Sunday'])} at {rng.randint(5, 9)} pm, bring snacks!"
        else:
            part = rng.choice(["oil", "tyres", "brakes", "battery", "wipers", "filter"])
            q, a = f"When did we last change the car's {part}?", f"The {part} was changed in {rng.choice(['March', 'June', 'October'])} at {rng.randint(20, 90)} thousand km."
        if canary and i == 0:
            a += f" {canary}"
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def member_files(folder: Path, canaries: dict[str, str] | None = None, train: int = 16, held_out: int = 6) -> dict[str, tuple[Path, Path]]:
    """(train file, held-out file) per member, disjoint (different seeds)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for member in MEMBERS:
        canary = (canaries or {}).get(member, "")
        out[member] = (write_jsonl(folder / f"{member}-train.jsonl", member_rows(member, train, 0, canary)),
                       write_jsonl(folder / f"{member}-heldout.jsonl", member_rows(member, held_out, 1)))
    return out


def member_notes(folder: Path, canaries: dict[str, str] | None = None, train: int = 16,
                 held_out: int = 6) -> dict[str, tuple[Path, Path]]:
    """The same private sets as notes folders (one note per chat), for stories260K, which has no
    chat template: (train folder, held-out folder) per member."""
    out = {}
    for member in MEMBERS:
        canary = (canaries or {}).get(member, "")
        pair = []
        for split, seed, count in (("train", 0, train), ("heldout", 1, held_out)):
            where = folder / f"{member}-{split}"
            where.mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(member_rows(member, count, seed, canary if split == "train" else "")):
                q, a = (m["content"] for m in row["messages"])
                (where / f"note{i:02d}.txt").write_text(f"{q} {a}\n", "utf-8")
            pair.append(where)
        out[member] = (pair[0], pair[1])
    return out


def mean_loss(model, tokenizer, path: Path) -> float:
    """Mean next-token loss over the assistant tokens of every example in `path`."""
    from training.data import collate, load_examples
    from training.lora import lora_loss

    examples = load_examples(path, tokenizer, 256)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        return sum(float(lora_loss(model, collate([e], pad))) for e in examples) / len(examples)


@pytest.fixture(scope="module")
def base():
    from training.model_store import load_torch, resolve

    torch.set_num_threads(1)
    return load_torch(resolve(str(tiny_llama_dir())))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return member_files(tmp_path_factory.mktemp("members"))


def _order(jobs, base_model, rank: int, keep_heads, keep_channels, round_index: int = 0, steps: int = 6):
    from training.fed_parts import RoundOrder, module_shapes
    from training.federated import initial_lora

    lora = {n: (f.a, f.b) for n, f in initial_lora(module_shapes(base_model), rank, seed=3).items()}
    return RoundOrder(round_index, 0.5, rank, steps, keep_heads, keep_channels, lora)


def _open(jobs, spec, files) -> dict:
    fields, _ = jobs.handle("coord", "fed.open", {"job": "j1", "spec": spec.to_json(),
                                                  "files": [f.to_field() for f in files]}, None)
    return fields


def test_bad_local_data_is_refused_with_file_and_line(tmp_path):
    from app.cli import main
    from training.part_fields import local_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(member_rows("dad", 1)[0]) + "\n{not json\n", "utf-8")
    with pytest.raises(HearthError, match=r"bad\.jsonl:2: not valid JSON"):
        local_data([bad])
    assert main(["worker", "--data", str(bad), "--port", "0"]) == 2


def test_device_receives_the_model_files_it_lacks_then_trains_a_pruned_round(base, data, tmp_path):
    from training.fed_parts import FedJobs, FedSpec, RoundReport, model_files
    from training.fedspine import dequantise_slots, quantise_slots
    from training.part_fields import local_data

    model, _ = base
    files = model_files(tiny_llama_dir())
    received = tmp_path / "received"
    jobs = FedJobs(local_data([data["teen"][0]]), received_file=lambda sha, name: received / sha / name)
    spec = FedSpec(name="fam", model=str(tiny_llama_dir()), local_steps=6)
    assert jobs.handle("coord", "fed.info", {}, None)[0] == {"examples": 16, "sources": 1}
    # The device lacks the model: it names every file; once they are "received", it opens.
    assert sorted(_open(jobs, spec, files)["need_files"]) == sorted(f.name for f in files)
    for f in files:
        (received / f.sha256).mkdir(parents=True)
        (received / f.sha256 / f.name).write_bytes(f.path.read_bytes())
    assert _open(jobs, spec, files) == {"opened": True, "examples": 16}

    # Round: 1 of 2 query heads per KV group and 40 of 64 channels kept, rank 4.
    layers, heads, channels = 4, 4, 64
    keep_heads = torch.tensor([[True, False, False, True]] * layers)
    keep_channels = torch.zeros(layers, channels, dtype=torch.bool)
    keep_channels[:, :40] = True
    order = _order(jobs, model, 4, keep_heads, keep_channels)
    fields, tensors = order.to_request("j1")
    report = RoundReport.from_reply(*jobs.handle("coord", "fed.round", fields, tensors))

    assert report.round == 0 and report.samples == 16 and report.steps == 6
    assert report.loss_after < report.loss_before
    assert torch.equal(report.keep_heads, keep_heads) and torch.equal(report.keep_channels, keep_channels)
    # The device trained a physically smaller model than the base.
    assert 0 < report.parameters < sum(p.numel() for p in model.parameters())
    # Factors come back in unpruned coordinates, at the round's rank, changed by training;
    # rows and columns of pruned units are zero.
    q_b = report.lora["0.q_proj"][1]
    assert q_b.shape == (heads * 8, 4)
    assert q_b[8:24].abs().sum() == 0 and q_b[:8].abs().sum() > 0
    down_a = report.lora["2.down_proj"][0]
    assert down_a.shape == (4, channels) and down_a[:, 40:].abs().sum() == 0
    assert not torch.allclose(report.lora["1.o_proj"][0], order.lora["1.o_proj"][0])
    # Importance: observed only for kept units, normalised per layer.
    assert report.importance_heads[~keep_heads].abs().sum() == 0
    assert (report.importance_heads[keep_heads] > 0).all()
    assert torch.allclose(report.importance_channels.sum(dim=1), torch.ones(layers), atol=1e-4)


def test_a_round_prunes_a_copy_that_shares_the_base_weights_it_keeps_and_leaves_the_base_as_it_was(base, data, monkeypatch):
    import copy

    from training.data import load_examples
    from training.fed_parts import FedJob, FedSpec

    model, tokenizer = base
    model = copy.deepcopy(model)                      # the fixture is shared with other tests
    before = {k: v.clone() for k, v in model.state_dict().items()}
    job = FedJob(FedSpec(name="fam", model=str(tiny_llama_dir()), local_steps=2), model, tokenizer,
                 load_examples(data["teen"][0], tokenizer, 256))
    seen = {}
    real_deepcopy = copy.deepcopy

    def recording_deepcopy(obj, memo=None):
        result = real_deepcopy(obj, memo)
        if obj is model:
            seen["copy"] = result
        return result

    layers, channels = 4, 64
    keep_heads = torch.tensor([[True, False, False, True]] * layers)
    keep_channels = torch.zeros(layers, channels, dtype=torch.bool)
    keep_channels[:, :40] = True
    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)   # to see the round's model
    report = job.run_round(_order(None, model, 4, keep_heads, keep_channels, steps=2))
    monkeypatch.undo()
    assert report.loss_after < report.loss_before
    # The base is bit-for-bit what it was and still frozen ...
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    # ... and the round's model held the embedding itself, not a second copy of it, while the
    # matrices pruning cut are its own, smaller ones.
    pruned = seen["copy"]
    assert pruned.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert pruned.model.layers[0].mlp.up_proj.weight.shape[0] == 40 < model.model.layers[0].mlp.up_proj.weight.shape[0]


def test_device_trains_at_most_the_rank_it_was_sent_and_refuses_an_unrealisable_mask(base, data):
    from training.fed_parts import FedJobs, FedSpec, RoundReport, model_files
    from training.fedspine import dequantise_slots, quantise_slots
    from training.part_fields import local_data

    model, tokenizer = base
    jobs = FedJobs(local_data([data["dad"][0]]), local_model=(model, tokenizer))
    spec = FedSpec(name="fam", model=str(tiny_llama_dir()), local_steps=2)
    assert _open(jobs, spec, model_files(tiny_llama_dir()))["opened"]   # the model loaded here already
    keep_heads = torch.ones(4, 4, dtype=torch.bool)
    keep_channels = torch.ones(4, 64, dtype=torch.bool)
    order = _order(jobs, model, 8, keep_heads, keep_channels, steps=2)
    order.rank = 3                  # the arm's rank is below the factors' rank: the first 3 slots
    report = RoundReport.from_reply(*jobs.handle("coord", "fed.round", *order.to_request("j1")))
    assert all(a.shape[0] == 3 and b.shape[1] == 3 for a, b in report.lora.values())

    uneven = keep_heads.clone()
    uneven[:, :2] = False          # both heads of KV group 0 gone, group 1 whole
    order = _order(jobs, model, 4, uneven, keep_channels, steps=2)
    with pytest.raises(ValueError, match="same number"):
        jobs.handle("coord", "fed.round", *order.to_request("j1"))
    with pytest.raises(ValueError, match="no open federated job"):
        jobs.handle("someone-else", "fed.round", *order.to_request("j1"))


def test_device_trains_its_rank_of_the_whole_global_state_with_the_rest_frozen(base, data):
    import copy

    from training.fed_parts import FedJobs, FedSpec, RoundReport, model_files
    from training.fedspine import dequantise_slots, quantise_slots
    from training.part_fields import local_data

    model, tokenizer = base
    model = copy.deepcopy(model)                      # the fixture is shared with other tests
    before = {k: v.clone() for k, v in model.state_dict().items()}
    jobs = FedJobs(local_data([data["dad"][0]]), local_model=(model, tokenizer))
    spec = FedSpec(name="fam", model=str(tiny_llama_dir()), local_steps=2)
    assert _open(jobs, spec, model_files(tiny_llama_dir()))["opened"]
    keep_heads = torch.tensor([[True, False, False, True]] * 4)
    keep_channels = torch.zeros(4, 64, dtype=torch.bool)
    keep_channels[:, :40] = True
    order = _order(jobs, model, 4, keep_heads, keep_channels, steps=2)
    generator = torch.Generator().manual_seed(5)
    # A trained global state (B no longer zero), in values the frozen slots' int8 carries (to
    # float32's rounding), so the frozen round and the all-LoRA round see one model.
    order.lora = {n: (dequantise_slots(*quantise_slots(a, 1)),
                      dequantise_slots(*quantise_slots(0.05 * torch.randn(b.shape, generator=generator), 0)))
                  for n, (a, b) in order.lora.items()}

    def round_with(rank: int, lora) -> RoundReport:
        sent = copy.copy(order)
        sent.rank, sent.lora = rank, lora
        fields, tensors = sent.to_request("j1")
        frozen = {k: t for k, t in tensors.items() if k.startswith("frozen8_")}
        assert bool(frozen) == (next(iter(lora.values()))[0].shape[0] > rank)
        if rank < 4:                                  # the frozen slots travel as int8, a scale per slot
            assert all(t.dtype == (torch.float32 if "_scale." in k else torch.int8) and
                                  t.shape[0 if k.startswith("frozen8_a") else 1] == 4 - rank for k, t in frozen.items())
            assert tensors["a.0.q_proj"].dtype == torch.float32 and tensors["a.0.q_proj"].shape[0] == rank
        return RoundReport.from_reply(*jobs.handle("coord", "fed.round", fields, tensors))

    whole = round_with(4, order.lora)
    frozen = round_with(2, order.lora)
    cut = round_with(2, {n: (a[:2], b[:, :2]) for n, (a, b) in order.lora.items()})
    # Two slots train, two are merged into the pruned weights: the same model as all four as LoRA
    # (its loss before training), where the state cut to two slots is another model.
    assert frozen.loss_before == pytest.approx(whole.loss_before, abs=1e-4)
    assert abs(cut.loss_before - whole.loss_before) > 100 * abs(frozen.loss_before - whole.loss_before)
    assert all(a.shape[0] == 2 and b.shape[1] == 2 for a, b in frozen.lora.values())
    assert frozen.loss_after < frozen.loss_before
    # Merging wrote new tensors: the base model is bit-for-bit what it was.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_round_order_travels_with_its_frozen_slots_and_refuses_ones_that_do_not_fit():
    from training.fed_parts import RoundOrder

    keep = (torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool))
    a, b = torch.randn(6, 5), torch.randn(7, 6)
    a[3] *= 100                                       # slots of very different sizes: a scale each
    order = RoundOrder(3, 0.25, 2, 4, *keep, {"m": (a, b)})
    fields, tensors = order.to_request("j1")
    back = RoundOrder.from_request(fields, tensors)
    back_a, back_b = back.lora["m"]
    # The trained slots exactly; each frozen one within half its own step (its largest value / 127).
    assert back.rank == 2 and torch.equal(back_a[:2], a[:2]) and torch.equal(back_b[:, :2], b[:, :2])
    assert torch.all((back_a[2:] - a[2:]).abs() <= a[2:].abs().amax(1, keepdim=True) / 254 * 1.001)
    assert torch.all((back_b[:, 2:] - b[:, 2:]).abs() <= b[:, 2:].abs().amax(0, keepdim=True) / 254 * 1.001)
    assert not torch.equal(back_a[2:], a[2:])
    wrong = dict(tensors, **{"frozen8_b.m": torch.zeros(3, 4, dtype=torch.int8),      # 3 rows, not 7
                             "frozen8_b_scale.m": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="frozen LoRA slots of 'm' do not fit"):
        RoundOrder.from_request(fields, wrong)
    unscaled = dict(tensors, **{"frozen8_a.m": tensors["frozen8_a.m"].half()})
    with pytest.raises(ValueError, match="'m' need int8 values and a scale per slot"):
        RoundOrder.from_request(fields, unscaled)
    stray = dict(tensors, **{"frozen8_a.x": torch.zeros(1, 5, dtype=torch.int8),
                             "frozen8_b.x": torch.zeros(7, 1, dtype=torch.int8),
                             "frozen8_a_scale.x": torch.ones(1, 1), "frozen8_b_scale.x": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="none to train"):
        RoundOrder.from_request(fields, stray)
    # A coordinator of the float16 days sent `frozen_a.`: ignored, the device trains the cut state.
    old = {k: v for k, v in tensors.items() if not k.startswith("frozen8_")}
    old.update({"frozen_a.m": a[2:].half(), "frozen_b.m": b[:, 2:].half()})
    cut = RoundOrder.from_request(fields, old)
    assert torch.equal(cut.lora["m"][0], a[:2]) and torch.equal(cut.lora["m"][1], b[:, :2])


def test_realisable_mask_keeps_as_many_heads_in_every_kv_group():
    from training.federated import realisable_mask

    heads = torch.tensor([[0.9, 0.8, 0.1, 0.05]] * 2)      # group 0 holds both important heads
    channels = torch.arange(10.0).repeat(2, 1)
    keep = realisable_mask((heads, channels), 0.5, kv_groups=2)
    assert keep.heads.tolist() == [[True, False, True, False]] * 2
    assert keep.channels.sum(dim=1).tolist() == [5, 5] and keep.channels[:, 5:].all()


class FlakyPeer:
    """A LocalPeer whose rounds fail in the rounds listed (a device that dropped out)."""

    def __init__(self, peer, fail_rounds: set[int]):
        self.peer, self.fail_rounds = peer, fail_rounds

    def request(self, type, fields=None, tensors=None, data=None, timeout=30.0):
        if type == "fed.round" and fields["round"] in self.fail_rounds:
            raise ConnectionError("connection closed by peer")
        return self.peer.request(type, fields, tensors, data, timeout)

    def send_file(self, path, name=None):
        return str(path)


def _devices(base, data, flaky: dict[str, set[int]] | None = None):
    from training.fed_parts import FedJobs
    from training.part_fields import local_data
    from training.federated import FedDevice, LocalPeer

    devices = []
    for member in MEMBERS:
        peer = LocalPeer(FedJobs(local_data([data[member][0]]), local_model=base))
        if flaky and member in flaky:
            peer = FlakyPeer(peer, flaky[member])
        devices.append(FedDevice(member, peer))
    return devices


class SlowLinkPeer:
    """A LocalPeer behind a slow link: every round's answer takes `delay_s` longer to arrive."""

    def __init__(self, peer, delay_s: float):
        self.peer, self.delay_s = peer, delay_s

    def request(self, type, fields=None, tensors=None, data=None, timeout=30.0):
        reply = self.peer.request(type, fields, tensors, data, timeout)
        if type == "fed.round":
            time.sleep(self.delay_s)
        return reply

    def send_file(self, path, name=None):
        return str(path)


@pytest.mark.slow
def test_a_slow_device_sets_the_round_and_the_others_train_a_larger_rank_within_it(base, data, hearth_home):
    """The coordinator plans rounds as the simulator's FedSpine does: from the first reports it
    knows each device's rates; the slowest one plays the lowest rank (the round lasts what it needs
    for that), and the others a larger rank that still fits in the round, rather than each device's
    own bandit guessing (the per-device bandits gave every device the same spread of ranks)."""
    from training.fedspine import MIN_PLANNED_RANK, UNMEASURED_RANK
    from training.fed_parts import FedSpec
    from training.federated import train_federated

    devices = _devices(base, data)
    devices[0].peer = SlowLinkPeer(devices[0].peer, delay_s=1.5)      # grandma's phone, far from the router
    events = []
    spec = FedSpec(name="family-planned", model=str(tiny_llama_dir()), rounds=3, local_steps=2)
    train_federated(spec, devices, base=base, on_event=events.append, save=False)
    rounds = [{d.name: d.rank for d in e.devices} for e in events if e.phase == "train"]
    assert len(rounds) == 3
    assert all(rank <= UNMEASURED_RANK for rank in rounds[0].values())  # nobody measured yet
    slow, fast = devices[0].name, [d.name for d in devices[1:]]
    for ranks in rounds[1:]:
        assert ranks[slow] == MIN_PLANNED_RANK, ranks
        assert all(ranks[name] > MIN_PLANNED_RANK for name in fast), ranks


# The family model must beat the base model on every member's held-out notes by this much (nats
# per token). stories260K starts at 3.5-4.8 on them; 4 rounds of 12 steps bring it to about 0.5-1.1
# even with half its heads and 30% of its MLP channels cut. (The random tiny Llama cannot show
# this: with its norm weights frozen at 1 and embeddings of std 0.02, no adapter moves a logit by
# more than about 0.6.)
FAMILY_MARGIN = 1.5


@pytest.mark.slow
def test_family_model_is_pruned_saved_and_better_than_the_base_on_every_members_data(stories_gguf, tmp_path,
                                                                                      hearth_home):
    from training.fed_parts import FedJobs, FedSpec
    from training.part_fields import local_data
    from training.federated import FedDevice, LocalPeer, train_federated
    from training.model_store import load_torch, resolve

    torch.set_num_threads(1)
    model, tokenizer = stories = load_torch(resolve(str(stories_gguf)))
    notes = member_notes(tmp_path / "notes")
    devices = [FedDevice(m, LocalPeer(FedJobs(local_data([notes[m][0]]), local_model=stories))) for m in MEMBERS]
    spec = FedSpec(name="family", model=str(stories_gguf), rounds=4, target_sparsity=0.3, local_steps=12, lr=1e-2)
    events = []
    result = train_federated(spec, devices, base=stories, on_event=events.append)

    rounds = [e for e in events if e.phase == "train"]
    assert [e.step for e in rounds] == [1, 2, 3, 4]
    assert all(sorted(e.accepted) == sorted(MEMBERS) for e in rounds)
    assert rounds[0].sparsity == 0.0 and rounds[-1].sparsity >= 0.3        # warmup, then the ramp
    family, family_tokenizer = load_torch(resolve("family"))
    # Physically pruned: 4 of 8 query heads (one per KV group), 120 of 172 MLP channels.
    assert family.config.num_attention_heads == 4 and family.config.intermediate_size == 120
    assert result.parameters_after < result.parameters_before
    manifest = json.loads((hearth_home / "data" / "models" / "family" / "hearth-model.json").read_text())
    assert manifest["method"] == "federated" and manifest["format"] == "hf"
    for member in MEMBERS:
        held_out = notes[member][1]
        before, after = mean_loss(model, tokenizer, held_out), mean_loss(family, family_tokenizer, held_out)
        assert after < before - FAMILY_MARGIN, (member, before, after)


@pytest.mark.slow
def test_device_that_drops_out_is_left_out_of_that_round_and_taken_back(base, data, hearth_home):
    from training.fed_parts import FedSpec
    from training.federated import train_federated

    spec = FedSpec(name="family-drop", model=str(tiny_llama_dir()), rounds=3, local_steps=3)
    devices = _devices(base, data, flaky={"teen": {1}})
    healthy = {d.name: d.peer for d in devices}
    events = []
    result = train_federated(spec, devices, base=base, on_event=events.append, save=False,
                             rejoin=lambda name: healthy[name].peer if name == "teen" else None)
    rounds = [e for e in events if e.phase == "train"]
    assert sorted(rounds[1].accepted) == ["dad", "grandma"] and "teen" in rounds[1].missing
    assert sorted(rounds[2].accepted) == sorted(MEMBERS)                      # offered the next round again
    assert result.lost == ["teen"] and result.rejoined == ["teen"]
    assert any("teen left the job" in e.message for e in events)
    assert all(torch.isfinite(p.detach()).all() for p in result.model.parameters())


@pytest.mark.slow
def test_coordinator_restart_resumes_after_the_last_completed_round_and_the_result_exports(base, data, hearth_home):
    from app.cli import main
    from training.fed_parts import FedSpec
    from training.federated import train_federated

    spec = FedSpec(name="family-resume", model=str(tiny_llama_dir()), rounds=3, local_steps=3)

    class Crash(Exception):
        pass

    def crash_after_round_2(event) -> None:
        if event.phase == "train" and event.step == 2:
            raise Crash()

    with pytest.raises(Crash):
        train_federated(spec, _devices(base, data), base=base, on_event=crash_after_round_2)
    with pytest.raises(HearthError, match="other settings"):
        other = FedSpec(name="family-resume", model=str(tiny_llama_dir()), rounds=5, local_steps=3)
        train_federated(other, _devices(base, data), base=base, resume=True)
    steps = []
    result = train_federated(spec, _devices(base, data), base=base, resume=True,
                             on_event=lambda e: steps.append(e.step) if e.phase == "train" else None)
    assert result.resumed_from == 2 and steps == [3] and len(result.rounds) == 3
    assert not (hearth_home / "data" / "jobs" / "family-resume").exists()     # the checkpoint is gone
    # The family model exports to GGUF like any pruned model, and llama.cpp loads it.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "family-resume", "--gguf", "--quant", "f16"]) == 0
    from llama_cpp import Llama

    llm = Llama(model_path=out.getvalue().strip().splitlines()[-1], n_ctx=64, verbose=False)
    assert llm.n_vocab() == 49152


def test_train_command_checks_its_federated_arguments(hearth_home, capsys):
    from app.cli import main

    assert main(["train", "--federated", "--name", "family"]) == 2
    assert "--federated needs --devices" in capsys.readouterr().err
    assert main(["train", "--federated", "--devices", "all", "--name", "smollm2-135m"]) == 2
    assert "catalog model's name" in capsys.readouterr().err
    assert main(["train", "--federated", "--devices", "all", "--name", "family", "--sparsity", "1.5"]) == 2
    assert "--sparsity must be" in capsys.readouterr().err
    assert main(["train", "--out", "family"]) == 2           # pooled / single-device training needs data
    assert "--data is required" in capsys.readouterr().err


def test_a_federated_job_refuses_personalised_models_saying_why(hearth_home):
    """Adapters cannot be a base; a pruned model could be trained on (`hearth train --model`), but
    a federated job prunes in its rounds, from the consensus of every unit's importance."""
    from training.fed_parts import FedSpec
    from training.federated import FedDevice, train_federated
    from training.model_store import MANIFEST, PersonalModel
    from training.pruning import prune_to_store

    prune_to_store(str(tiny_llama_dir()), 0.5, "small")
    folder = hearth_home / "data" / "models" / "family"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(PersonalModel(name="family", base="small", method="lora", format="peft").to_json())
    for model, said in (("small", f"model small: a federated job prunes the model itself (--sparsity); start it "
                                  f"from an unpruned base ({tiny_llama_dir()})"),
                        ("family", "model family is already personalised: train from its base (small)")):
        with pytest.raises(HearthError) as error:
            train_federated(FedSpec(name="fam", model=model), [FedDevice("here")])
        assert str(error.value) == said
