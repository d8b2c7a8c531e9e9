"""Pooled training across three hosts in network namespaces (real mDNS, real TLS, the real CLI).

Host `coord` runs `hearth train --devices host-w1,host-w2`; `w1` and `w2` run `hearth worker`
(one torch thread each); `outsider` runs a worker too and is paired with the coordinator but not
named in the job. The tests share the lab and run in file order: pairing, the pooled job under a
packet capture of every link (the adapters match a single-device run; no canary and no
coordinator traffic to the outsider on the wire), then the same job with w2 SIGKILLed mid-epoch.
"""

from __future__ import annotations

import json
import signal
import struct
import time
from pathlib import Path

import pytest
import torch

from tests.netns import NetnsLab, lab_unavailable
from tests.test_pooled import WEIGHT_TOLERANCE, household_notes

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7000
CANARY = "HEARTH-CANARY-pooled-4be1-grandmas-pin-is-2718"
JOB = ["--batch-size", "6", "--seed", "7", "--method", "pac"]
EPOCHS = 3
KILL_EPOCHS = 20            # long enough (80 steps) for the test to kill a worker mid-job
# A device killed mid-epoch costs nothing but time: its samples are recomputed elsewhere from
# the same weights, so the training loss must match the undisturbed run's closely.
LOSS_MARGIN = 0.01


@pytest.fixture(scope="module")
def lab(shared_dir, tmp_path_factory):
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    notes = household_notes(shared_dir, tmp_path_factory.mktemp("netns-notes"), canary=CANARY)
    with NetnsLab("hp") as lab:
        hosts = {name: lab.add_host(name) for name in ("coord", "w1", "w2", "outsider")}
        workers = {name: hosts[name].hearth("worker", "--name", f"host-{name}", "--port", str(PORT),
                                            "--interface", hosts[name].address, OMP_NUM_THREADS="1")
                   for name in ("w1", "w2", "outsider")}
        for worker in workers.values():
            worker.wait_for(r"Device id: (\S+)", 60)
        lab.state = {"hosts": hosts, "workers": workers, "notes": notes}
        yield lab


def _pair(lab, name: str) -> None:
    lab.state["hosts"]["coord"].pair_with(lab.state["workers"][name], f"host-{name}")


def _train(lab, out: str, devices: str, epochs: int = EPOCHS):
    coord = lab.state["hosts"]["coord"]
    return coord.hearth("train", "--data", str(lab.state["notes"]), "--model", str(_stories()), "--out", out,
                        *JOB, "--epochs", str(epochs), "--devices", devices, "--json", "--interface", coord.address, "--wait", "5",
                        OMP_NUM_THREADS="1")


def _stories() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "stories260K.gguf"


def _events(process) -> list[dict]:
    return [json.loads(line) for line in process.lines if line.startswith("{")]


def _single(lab, epochs: int):
    """The same job on one device (this process; HEARTH_HOME is the test's own)."""
    from training.job import JobSpec
    from training.trainer import train

    torch.set_num_threads(1)
    spec = JobSpec(name=f"single-{epochs}", data=[str(lab.state["notes"])], model=str(_stories()), epochs=epochs,
                   batch_size=6, seed=7)
    return train(spec, save=False)


@pytest.fixture(scope="module")
def single_run(lab):
    return _single(lab, EPOCHS)


def _tcp_frames(frames: list[bytes], src: str, dst: str) -> list[bytes]:
    """Ethernet frames carrying IPv4 TCP from `src` to `dst`."""
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    return [f for f in frames if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 6 and f[26:30] == s and f[30:34] == d]


def _tcp_payload(frame: bytes) -> int:
    ip_header = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    tcp_header = (frame[14 + ip_header + 12] >> 4) * 4
    return total - ip_header - tcp_header


def test_coordinator_pairs_with_three_workers(lab):
    for name in ("w1", "w2", "outsider"):
        _pair(lab, name)
    trusted = lab.state["hosts"]["coord"].home / "data" / "trusted"
    assert len(list(trusted.glob("*.json"))) == 3


def test_pooled_job_matches_one_device_and_its_data_goes_only_where_the_plan_says(lab, single_run):
    from training.trainer import load_side_chain

    hosts = lab.state["hosts"]
    with lab.capture(hosts["w1"]) as w1, lab.capture(hosts["w2"]) as w2, \
            lab.capture(hosts["outsider"]) as outsider, lab.capture(hosts["coord"]) as coord:
        job = _train(lab, "pooled", "host-w1,host-w2")
        assert job.wait(180) == 0, job.stderr() + "\n".join(job.lines)
    events = _events(job)
    plan = next(e for e in events if e["phase"] == "plan")
    assert plan["receivers"] == sorted(n for n, s in plan["shares"].items() if s > 0)
    assert {"host-w1", "host-w2"} <= set(plan["receivers"]), plan["message"]
    assert "host-outsider" not in plan["message"]
    done = events[-1]
    assert done["phase"] == "done"
    assert len(done["devices"]) == 3 and {"host-w1", "host-w2"} <= {d["name"] for d in done["devices"]}

    # The adapters match the single-device run of the same job.
    chain = load_side_chain(hosts["coord"].home / "data" / "models" / "pooled")
    single = dict(single_run.module.named_parameters())
    pooled = dict(chain.named_parameters())
    assert max((single[k] - pooled[k]).abs().max().item() for k in single) < WEIGHT_TOLERANCE
    assert abs(done["loss"] - single_run.final_loss) < 1e-4

    # The workers really got work over their links ...
    for capture, host in ((w1, hosts["w1"]), (w2, hosts["w2"])):
        assert sum(map(len, _tcp_frames(capture.frames, hosts["coord"].address, host.address))) > 100_000
    # ... the canary never crossed any link in the clear (neither as text nor as token ids) ...
    ids = _canary_ids()
    for capture in (w1, w2, outsider, coord):
        assert CANARY.encode() not in capture.data and CANARY.encode()[:16] not in capture.data
        assert struct.pack(f"<{len(ids)}q", *ids) not in capture.data
    # ... and the device not in the job was sent not one byte by the coordinator (discovery's
    # liveness probes open and close TCP connections without a byte of data: they are allowed).
    to_outsider = _tcp_frames(outsider.frames, hosts["coord"].address, hosts["outsider"].address)
    assert sum(_tcp_payload(f) for f in to_outsider) == 0


def _canary_ids() -> list[int]:
    from training.model_store import load_torch, resolve

    _, tokenizer = load_torch(resolve(str(_stories())))
    return tokenizer(CANARY, add_special_tokens=False)["input_ids"][2:10]


def test_worker_killed_mid_epoch_and_the_job_still_completes(lab):
    single = _single(lab, KILL_EPOCHS)
    job = _train(lab, "pooled-kill", "host-w1,host-w2", epochs=KILL_EPOCHS)
    deadline = time.monotonic() + 120
    killed_after = 0
    while time.monotonic() < deadline:   # in epoch 2 or later, just after an epoch's first step
        steps = [e["step"] for e in _events(job) if e.get("phase") == "train"]
        if steps and steps[-1] >= 5 and steps[-1] % 4 == 1:
            killed_after = steps[-1]
            break
        assert job.popen.poll() is None, job.stderr()
        time.sleep(0.002)
    lab.state["workers"]["w2"].stop(sig=signal.SIGKILL)
    assert job.wait(180) == 0, job.stderr() + "\n".join(job.lines)
    events = _events(job)
    steps = [e["step"] for e in events if e["phase"] == "train"]
    assert steps == list(range(1, 4 * KILL_EPOCHS + 1))          # no step lost or applied twice
    assert 0 < killed_after < steps[-1] - 2
    assert any("host-w2 left the job" in e.get("message", "") for e in events)
    done = events[-1]
    assert done["phase"] == "done" and abs(done["loss"] - single.final_loss) < LOSS_MARGIN
    assert {d["name"]: d["state"] for d in done["devices"]}["host-w2"] == "gone"
