"""Federated training across hosts in network namespaces (real mDNS, real TLS, the real CLI).

Host `coord` runs `hearth train --federated --devices ...` and holds no data; `grandma`, `teen`
and `dad` each run `hearth worker --data` on their own private notes (disjoint sets, each with its
own canary string) with one torch thread. The tests share the lab and run in file order: pairing;
the federated job under a packet capture of every link (it completes, the family model beats the
base model on every member's held-out notes, and no canary crosses any link); then a job during
which `dad` is SIGKILLed mid-round (the job completes; that round is aggregated from the others).
"""

from __future__ import annotations

import json
import signal
import struct
import time
from pathlib import Path

import pytest

from tests.netns import NetnsLab, lab_unavailable
from tests.test_federated import MEMBERS, mean_loss, member_notes

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7000
CANARIES = {m: f"HEARTH-CANARY-fed-{m}-7c3e-secret-{i}{i}{i}" for i, m in enumerate(MEMBERS)}
JOB = ["--rounds", "4", "--local-steps", "12", "--lr", "1e-2", "--sparsity", "0.3", "--seed", "3"]
# Over the mesh the coordinator plans each member's rank and pruning from the timings it measures
# (training/fedspine.py), so the family model, unlike the in-process test's, varies from run to
# run: one CI run (2026-12-05) gave a member 1.10 nats below the base where others gave > 1.5.
# 1.0 is still well above what an adapter can change on the random tiny Llama (about 0.6).
PLANNED_MARGIN = 1.0


def _stories() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "stories260K.gguf"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    notes = member_notes(tmp_path_factory.mktemp("fed-notes"), CANARIES)
    with NetnsLab("hf") as lab:
        hosts = {name: lab.add_host(name) for name in ("coord", *MEMBERS)}
        workers = {m: hosts[m].hearth("worker", "--name", f"host-{m}", "--port", str(PORT), "--interface",
                                      hosts[m].address, "--data", str(notes[m][0]), OMP_NUM_THREADS="1")
                   for m in MEMBERS}
        for worker in workers.values():
            worker.wait_for(r"Device id: (\S+)", 60)
            worker.wait_for(r"Local data: 16 conversations", 10)
        lab.state = {"hosts": hosts, "workers": workers, "notes": notes}
        yield lab


def _pair(lab, name: str) -> None:
    lab.state["hosts"]["coord"].pair_with(lab.state["workers"][name], f"host-{name}")


def _train(lab, name: str, *extra: str):
    # --wait 15: it returns as soon as every named device is found; under load mDNS can be slow.
    coord = lab.state["hosts"]["coord"]
    devices = ",".join(f"host-{m}" for m in MEMBERS)
    return coord.hearth("train", "--federated", "--devices", devices, "--model", str(_stories()), "--name", name,
                        *JOB, *extra, "--json", "--interface", coord.address, "--wait", "15", OMP_NUM_THREADS="1")


def _events(process) -> list[dict]:
    return [json.loads(line) for line in process.lines if line.startswith("{")]


def _canary_ids(canary: str) -> list[int]:
    from training.model_store import load_torch, resolve

    _, tokenizer = load_torch(resolve(str(_stories())))
    return tokenizer(canary, add_special_tokens=False)["input_ids"][2:10]


def test_coordinator_pairs_with_every_member(lab):
    for name in MEMBERS:
        _pair(lab, name)
    trusted = lab.state["hosts"]["coord"].home / "data" / "trusted"
    assert len(list(trusted.glob("*.json"))) == 3


def test_federated_job_completes_beats_the_base_and_no_private_data_crosses_a_link(lab):
    from training.model_store import load_torch, resolve

    hosts = lab.state["hosts"]
    captures = {name: lab.capture(hosts[name]) for name in ("coord", *MEMBERS)}
    for capture in captures.values():
        capture.__enter__()
    try:
        job = _train(lab, "family")
        assert job.wait(240) == 0, job.stderr() + "\n".join(job.lines)
    finally:
        for capture in captures.values():
            capture.__exit__(None, None, None)
    events = _events(job)
    plan = events[0]
    assert plan["phase"] == "plan" and plan["receivers"] == [] and "only adapter updates" in plan["message"]
    rounds = [e for e in events if e["phase"] == "train"]
    assert [e["step"] for e in rounds] == [1, 2, 3, 4]
    for event in rounds:      # every member trained every round
        assert sorted(event["accepted"]) == sorted(f"host-{m}" for m in MEMBERS), event
    done = events[-1]
    assert done["phase"] == "done"

    # Each worker lacked the base model and was sent it through the mesh's file transfer.
    for m in MEMBERS:
        assert list((hosts[m].home / "cache" / "received").glob("*/stories260K.gguf")), m

    # The family model (pruned, LoRA merged) beats the base on every member's held-out notes.
    base, tokenizer = load_torch(resolve(str(_stories())))
    family, family_tokenizer = load_torch(resolve(str(hosts["coord"].home / "data" / "models" / "family")))
    assert family.config.num_attention_heads < base.config.num_attention_heads
    for m in MEMBERS:
        held_out = lab.state["notes"][m][1]
        before, after = mean_loss(base, tokenizer, held_out), mean_loss(family, family_tokenizer, held_out)
        assert after < before - PLANNED_MARGIN, (m, before, after)

    # Updates really travelled both ways on every member's link ...
    for m in MEMBERS:
        assert len(captures[m].data) > 200_000, m
    # ... and no member's canary crossed any link, neither as text nor as token ids.
    for canary in CANARIES.values():
        ids = _canary_ids(canary)
        for capture in captures.values():
            assert canary.encode() not in capture.data and canary.encode()[:16] not in capture.data
            assert struct.pack(f"<{len(ids)}q", *ids) not in capture.data


def test_worker_killed_mid_round_and_the_job_still_completes(lab):
    job = _train(lab, "family-kill", "--rounds", "6", "--local-steps", "60")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:      # just after round 1 closed: round 2 is running
        if any(e.get("phase") == "train" for e in _events(job)):
            break
        assert job.popen.poll() is None, job.stderr() + "\n".join(job.lines)
        time.sleep(0.002)
    lab.state["workers"]["dad"].stop(sig=signal.SIGKILL)
    assert job.wait(300) == 0, job.stderr() + "\n".join(job.lines)
    events = _events(job)
    rounds = [e for e in events if e["phase"] == "train"]
    assert [e["step"] for e in rounds] == [1, 2, 3, 4, 5, 6]
    assert any("host-dad left the job" in e.get("message", "") for e in events)
    dropped = next(e for e in rounds if "host-dad" not in e["accepted"])
    assert dropped["step"] == 2, rounds
    assert sorted(dropped["accepted"]) == ["host-grandma", "host-teen"] and "host-dad" in dropped["missing"]
    assert dropped["loss"] is not None          # aggregated from the other two
    states = {d["name"]: d["state"] for d in dropped["devices"]}
    assert states["host-dad"] == "gone" and states["host-teen"] == "accepted"
    assert events[-1]["phase"] == "done"
    assert (lab.state["hosts"]["coord"].home / "data" / "models" / "family-kill" / "hearth-model.json").is_file()
