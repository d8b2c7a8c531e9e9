"""Pooled training over loopback: this process coordinates, two `hearth worker` processes work.

Real worker processes (each with its own HEARTH_HOME, identity and one torch thread), real
pairing (the workers' prompts are answered on their stdin), real mutual TLS, the real
stories260K model and the household facts (as notes: the tiny model has no chat template).
The three-host version with mDNS, a packet capture and the CLI is test_pooled_netns.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from core.errors import HearthError

pytestmark = pytest.mark.slow

LOOP = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# Pooled and single-device runs differ only in float summation order (the same gradients,
# averaged by target tokens): measured ~1e-6 after 15 steps; this leaves room for other CPUs.
WEIGHT_TOLERANCE = 1e-4


def household_notes(shared_dir: Path, folder: Path, canary: str = "") -> Path:
    """The household facts as notes (question and answer per file): stories260K has no chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (shared_dir / "data" / "household" / "train.jsonl").read_text("utf-8").splitlines()
    for i, line in enumerate(lines):
        messages = json.loads(line)["messages"]
        text = f"{messages[0]['content']} {messages[1]['content']}"
        if canary and i == 0:
            text += f" {canary}"
        (folder / f"fact{i:02d}.txt").write_text(text + "\n", "utf-8")
    return folder


class WorkerProcess:
    """`hearth worker` on loopback with its own HEARTH_HOME; prompts answered on stdin."""

    def __init__(self, name: str, home: Path, *extra: str):
        self.name, self.home = name, home
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HEARTH_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.stderr = open(home.parent / f"{name}.stderr", "w")
        self.popen = subprocess.Popen(
            [str(VENV_BIN / "hearth"), "worker", "--name", name, "--port", "0", "--interface", LOOP, *extra],
            cwd=REPO, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, bufsize=1)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = int(self.wait_for("on port (\\d+)").group(1))
        self.device_id = self.wait_for("Device id: (\\S+)").group(1)

    def _pump(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0):
        import re
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    match = re.search(pattern, line)
                    if match:
                        return match
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    raise AssertionError(f"{self.name}: no {pattern!r}; stdout {self.lines}")
                self._cond.wait(0.2)

    def answer_pairing(self) -> None:
        self.wait_for(r"Accept\? \[y/N\]", 30)
        self.popen.stdin.write("y\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()


class Coordinator:
    """This test process as the coordinating device: its own identity and trust store."""

    def __init__(self, root: Path):
        from mesh.identity import load_or_create_identity
        from mesh.trust import TrustStore

        self.identity = load_or_create_identity(root / "identity")
        self.trust = TrustStore(root / "trusted")

    def pair(self, worker: WorkerProcess) -> None:
        from mesh.pairing import OutgoingPairing

        pairing = OutgoingPairing(self.identity, self.trust, "coordinator", "desktop", LOOP, worker.port, 0,
                                  confirm_locally=False).start()
        worker.answer_pairing()
        assert pairing.wait(30).paired

    def connect(self, worker: WorkerProcess, heartbeat_s: float = 5.0):
        from mesh.client import PeerClient

        return PeerClient.connect(worker.device_id, [(LOOP, worker.port)], self.identity, self.trust,
                                  heartbeat_s=heartbeat_s)

    def devices(self, workers: list[WorkerProcess]):
        from training.pooled import JobDevice

        return [JobDevice("this")] + [JobDevice(w.name, self.connect(w)) for w in workers]


@pytest.fixture(scope="module")
def notes(shared_dir, tmp_path_factory) -> Path:
    return household_notes(shared_dir, tmp_path_factory.mktemp("household-notes"))


@pytest.fixture(scope="module")
def backbone(stories_gguf):
    from training.trainer import load_backbone

    torch.set_num_threads(1)
    return load_backbone(str(stories_gguf))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled-loopback")
    coordinator = Coordinator(root / "coordinator")
    workers = [WorkerProcess(name, root / name) for name in ("kitchen", "attic")]
    try:
        for worker in workers:
            coordinator.pair(worker)
        yield coordinator, workers
    finally:
        for worker in workers:
            worker.stop()


def _spec(notes: Path, stories_gguf: Path, name: str, **kw):
    from training.job import JobSpec

    settings = dict(name=name, data=[str(notes)], model=str(stories_gguf), epochs=3, seed=7, batch_size=6)
    settings.update(kw)
    return JobSpec(**settings)


def _single(spec, backbone):
    from training.trainer import train

    return train(spec, save=False, backbone=backbone)


def _max_difference(a, b) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def _in_process(jobs_class, names: tuple[str, ...], backbone) -> list:
    """This device and `names`, each a `jobs_class` (WorkerJobs or a test's subclass, which
    knows its device as `self.name`) reached in-process through the parts a worker runs."""
    from training.local_peer import LocalPeer
    from training.pooled import JobDevice

    devices = [JobDevice("this")]
    for name in names:
        jobs = jobs_class(local_backbone=backbone)
        jobs.name = name
        devices.append(JobDevice(name, LocalPeer(jobs)))
    return devices


def test_pooled_run_over_two_workers_matches_the_single_device_run(mesh, notes, stories_gguf, backbone, hearth_home):
    from training.pooled import PooledEvent, train_pooled

    coordinator, workers = mesh
    spec = _spec(notes, stories_gguf, "pooled-match")
    single = _single(spec, backbone)
    events, plans = [], []
    pooled = train_pooled(spec, coordinator.devices(workers), backbone=backbone, on_event=events.append,
                          on_plan=plans.append)

    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE
    assert abs(single.final_loss - pooled.result.final_loss) < 1e-4
    assert pooled.result.steps == single.steps and pooled.lost == [], [e.message for e in events if e.phase == "devices"]
    # The plan was shown first, names every device with a share, and the data went only there.
    plan = plans[0]
    assert "The job's training data is sent to" in plan.describe()
    assert sum(plan.shares.values()) == spec.batch_size
    assert pooled.receivers == sorted(n for n, share in plan.shares.items() if share > 0 and n != "this")
    # Progress carries per-device figures, and each worker did real work.
    train_events = [e for e in events if isinstance(e, PooledEvent) and e.phase == "train"]
    assert len(train_events) == single.steps
    last = {d.name: d for d in train_events[-1].devices}
    assert set(last) == {"this", "kitchen", "attic"}
    assert plan.shares["kitchen"] > 0 and plan.shares["attic"] > 0, plan.describe()
    for name, figures in last.items():
        assert figures.state == ("training" if plan.shares[name] else "idle")
        assert (figures.samples_per_s or 0) > 0 if plan.shares[name] else figures.owned == 0
    assert sum(d.owned for d in last.values()) == 20
    assert json.loads(train_events[-1].to_json())["devices"][0]["name"] == "this"
    # Each worker lacked the base model (the job names a file on this device) and was sent it.
    for worker in workers:
        assert list((worker.home / "cache" / "received").glob("*/stories260K.gguf")), worker.name
    # The saved personalised model is the pooled side chain.
    assert pooled.result.output is not None and (pooled.result.output / "side_chain.safetensors").is_file()


def test_worker_killed_mid_epoch_is_replaced_and_no_step_is_lost_or_repeated(mesh, notes, stories_gguf, backbone,
                                                                              hearth_home, tmp_path):
    from training.pooled import train_pooled

    coordinator, workers = mesh
    victim = WorkerProcess("cellar", tmp_path / "cellar")
    try:
        coordinator.pair(victim)
        spec = _spec(notes, stories_gguf, "pooled-kill", epochs=3)
        single = _single(spec, backbone)
        steps_seen = []

        def on_event(event) -> None:
            if event.phase == "train":
                steps_seen.append(event.step)
                if event.step == 6:       # epoch 2 of 3, mid-epoch (4 steps per epoch)
                    victim.kill()

        pooled = train_pooled(spec, coordinator.devices(workers + [victim]), backbone=backbone,
                              on_event=on_event, save=False)
    finally:
        victim.stop()
    assert pooled.lost == ["cellar"]
    assert steps_seen == list(range(1, single.steps + 1))      # every step once, in order
    # Its samples were recomputed by the others from the same weights: the same result.
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE
    assert abs(pooled.result.final_loss - single.final_loss) < 0.01


def test_worker_that_falls_asleep_is_dropped_by_heartbeat_and_replaced(mesh, notes, stories_gguf, backbone,
                                                                       hearth_home, tmp_path):
    """SIGSTOP: the socket stays open, only the heartbeats stop (1 s here, so 3 s of silence)."""
    from training.pooled import JobDevice, train_pooled

    coordinator, workers = mesh
    home = tmp_path / "loft"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text("[mesh]\nheartbeat_s = 1.0\n", "utf-8")
    sleeper = WorkerProcess("loft", home)
    try:
        coordinator.pair(sleeper)
        spec = _spec(notes, stories_gguf, "pooled-asleep")
        single = _single(spec, backbone)

        def on_event(event) -> None:
            if event.phase == "train" and event.step == 6:
                sleeper.popen.send_signal(signal.SIGSTOP)

        devices = coordinator.devices(workers) + [JobDevice("loft", coordinator.connect(sleeper, heartbeat_s=1.0))]
        pooled = train_pooled(spec, devices, backbone=backbone, on_event=on_event, save=False)
    finally:
        if sleeper.popen.poll() is None:
            sleeper.popen.send_signal(signal.SIGCONT)
        sleeper.stop()
    assert pooled.lost == ["loft"]
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_coordinator_restart_resumes_from_its_checkpoint(mesh, notes, stories_gguf, backbone, hearth_home):
    from training.pooled import train_pooled

    coordinator, workers = mesh
    spec = _spec(notes, stories_gguf, "pooled-resume")
    single = _single(spec, backbone)

    class Crash(Exception):
        pass

    def crash_at_step_6(event) -> None:
        if event.phase == "train" and event.step == 6:   # in epoch 2
            raise Crash()

    with pytest.raises(Crash):
        train_pooled(spec, coordinator.devices(workers), backbone=backbone, on_event=crash_at_step_6,
                     checkpoint_every_s=0.0)
    steps = []
    resumed = train_pooled(spec, coordinator.devices(workers), backbone=backbone, resume=True,
                           on_event=lambda e: steps.append(e.step) if e.phase == "train" else None, save=False)
    assert resumed.result.resumed_from == 6 and steps == list(range(7, single.steps + 1))
    assert _max_difference(single.module, resumed.result.module) < WEIGHT_TOLERANCE


def test_resume_with_other_settings_is_refused(mesh, notes, stories_gguf, backbone, hearth_home):
    from training.job import Checkpoint, save_checkpoint
    from training.pooled import JobDevice, train_pooled

    spec = _spec(notes, stories_gguf, "pooled-other")
    from core.paths import hearth_paths

    save_checkpoint(hearth_paths().jobs_dir / spec.name, Checkpoint(_spec(notes, stories_gguf, "pooled-other", seed=1),
                                                                   1, {}, {"state": {}, "param_groups": []}))
    with pytest.raises(HearthError, match="other settings"):
        train_pooled(spec, [JobDevice("this")], backbone=backbone, resume=True)


def test_device_that_left_is_taken_back_at_the_next_epoch(mesh, notes, stories_gguf, backbone, hearth_home, tmp_path):
    from training.pooled import train_pooled

    coordinator, workers = mesh
    victim = WorkerProcess("shed", tmp_path / "shed")
    reborn: list[WorkerProcess] = []
    try:
        coordinator.pair(victim)
        spec = _spec(notes, stories_gguf, "pooled-rejoin", epochs=3)
        single = _single(spec, backbone)

        def on_event(event) -> None:
            if event.phase == "train" and event.step == 2:     # in epoch 1: kill it, start it again
                victim.kill()
                reborn.append(WorkerProcess("shed", tmp_path / "shed"))   # same home: same identity

        def rejoin(name: str):
            return coordinator.connect(reborn[0]) if name == "shed" and reborn else None

        pooled = train_pooled(spec, coordinator.devices(workers + [victim]), backbone=backbone,
                              on_event=on_event, rejoin=rejoin, save=False)
    finally:
        for process in [victim, *reborn]:
            process.stop()
    assert pooled.lost == ["shed"] and pooled.rejoined == ["shed"]
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_every_replica_ends_equal_to_the_coordinators_side_chain_bit_for_bit(notes, stories_gguf, backbone,
                                                                              hearth_home):
    """Devices keep replicas and are sent only the sum or the others' contributions: each must
    rebuild the coordinator's sum exactly, whatever its place in the order, and take steps it had
    no sample in (20 samples in batches of 6 leave some device out of the last step of each
    epoch), at the coordinator's learning rate for each step. Two devices in-process here,
    through the same job parts a remote worker runs."""
    from training.job import scheduled_lr
    from training.pooled import train_pooled
    from training.worker_parts import APPLY, CLOSE, WorkerJobs

    finals: dict[str, dict] = {}
    rates: dict[int, set[float]] = {}

    class Recording(WorkerJobs):
        def handle(self, owner, type, fields, tensors):
            if type == APPLY:
                rates.setdefault(fields["step"], set()).add(fields["lr"])
            if type == CLOSE:
                job = self.jobs.get(owner, fields["job"])
                finals[self.name] = {k: v.detach().clone() for k, v in job.chain.named_parameters()}
            return super().handle(owner, type, fields, tensors)

    devices = _in_process(Recording, ("left", "right"), backbone)
    spec = _spec(notes, stories_gguf, "pooled-replicas", epochs=2)
    pooled = train_pooled(spec, devices, backbone=backbone, save=False)
    assert pooled.lost == [] and set(finals) == {"left", "right"}
    steps = len(pooled.result.losses)
    assert rates == {step: {scheduled_lr(spec.learning_rate, step, steps)} for step in range(steps)}
    master = dict(pooled.result.module.named_parameters())
    for name, weights in finals.items():
        assert all(torch.equal(weights[k], master[k].detach()) for k in master), name
    single = _single(spec, backbone)
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_epoch_one_hands_the_backbone_work_to_whichever_device_is_free(notes, stories_gguf, backbone, hearth_home):
    """A device whose backbone passes take longer than its profile said (a laptop its owner
    started using, made so here by a pause in each of its passes) ends epoch 1 with fewer
    samples: the samples go out in pieces to whichever device is free. The result is still
    the single-device run's."""
    import time

    from training.pooled import train_pooled
    from training.worker_parts import FILL, WorkerJobs

    class Busy(WorkerJobs):
        def handle(self, owner, type, fields, tensors):
            if type == FILL and self.name == "busy":
                time.sleep(0.3 * len(fields["indices"]))
            return super().handle(owner, type, fields, tensors)

    devices = _in_process(Busy, ("busy", "free"), backbone)
    spec = _spec(notes, stories_gguf, "pooled-free", epochs=2)
    events = []
    pooled = train_pooled(spec, devices, backbone=backbone, save=False, on_event=events.append)
    epoch1 = [e for e in events if e.phase == "train" and e.epoch == 1][-1]
    owned = {d.name: d.owned for d in epoch1.devices}
    # Fewer than an even share, and no more than any other device. (The pieces are 4 samples:
    # one CI run gave busy 4, free 4, this 12, the coordinator's thread being quickest off the
    # mark; "fewer than free" alone then failed by the piece size.)
    assert sum(owned.values()) == 20 and owned["busy"] < 20 / len(owned), owned
    assert owned["busy"] <= min(owned["free"], owned["this"]), owned
    single = _single(spec, backbone)
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_a_replica_that_drifts_is_found_by_its_digest_and_sent_the_whole_state(notes, stories_gguf, backbone,
                                                                               hearth_home):
    """A device whose arithmetic rounds differently would drift from the coordinator by ulps.
    Made so here: one replica's weight is nudged by one ulp after step 2. The digest it reports
    with its next step gives it away, it is sent the whole state with its next part, and it
    ends bit-equal to the coordinator again."""
    from training.pooled import train_pooled
    from training.worker_parts import APPLY, CLOSE, WorkerJobs

    finals: dict[str, dict] = {}

    class Drifting(WorkerJobs):
        def handle(self, owner, type, fields, tensors):
            job = self.jobs.get(owner, fields["job"]) if type in (APPLY, CLOSE) else None
            if type == CLOSE:
                finals[self.name] = {k: v.detach().clone() for k, v in job.chain.named_parameters()}
            reply = super().handle(owner, type, fields, tensors)
            if type == APPLY and self.name == "odd" and fields["step"] == 1:
                weight = next(p for _, p in sorted(job.chain.named_parameters()) if p.abs().sum() > 0)
                with torch.no_grad():
                    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1.0))
            return reply

    devices = _in_process(Drifting, ("even", "odd"), backbone)
    events = []
    spec = _spec(notes, stories_gguf, "pooled-drift", epochs=2)
    pooled = train_pooled(spec, devices, backbone=backbone, save=False, on_event=events.append)
    assert pooled.resynced == ["odd"], [e.message for e in events if e.phase == "devices"]
    master = dict(pooled.result.module.named_parameters())
    for name, weights in finals.items():
        assert all(torch.equal(weights[k], master[k].detach()) for k in master), name


def test_samples_are_owned_in_proportion_to_speed():
    from training.pooled import assign_owners

    owners = assign_owners([(1.0, 0.1)] * 20, {"desktop": 3.0, "laptop": 1.0, "phone": 0.0}, 2)
    counts = {name: list(owners.values()).count(name) for name in ("desktop", "laptop", "phone")}
    assert counts == {"desktop": 15, "laptop": 5, "phone": 0} and sorted(owners) == list(range(20))
    with pytest.raises(HearthError, match="no device"):
        assign_owners([(1.0, 0.1)] * 3, {"phone": 0.0})


def test_samples_are_owned_by_what_they_cost_not_by_count():
    """One long answer costs as much as four short ones: equal devices get equal work, and the
    later epochs (adapter work only) are balanced too when they dominate the job."""
    from training.pooled import assign_owners

    costs = [(4.0, 4.0)] + [(1.0, 1.0)] * 4 + [(2.0, 2.0)] * 2
    owners = assign_owners(costs, {"a": 1.0, "b": 1.0}, 3)
    load = {n: sum(costs[i][0] for i, o in owners.items() if o == n) for n in "ab"}
    assert load == {"a": 6.0, "b": 6.0}
    # Epoch 1 balanced by length, later epochs by trained tokens: with 9 later epochs the
    # trained tokens decide.
    costs = [(3.0, 1.0), (1.0, 3.0), (3.0, 1.0), (1.0, 3.0)]
    owners = assign_owners(costs, {"a": 1.0, "b": 1.0}, 9)
    later = {n: sum(costs[i][1] for i, o in owners.items() if o == n) for n in "ab"}
    assert later == {"a": 4.0, "b": 4.0}


def test_rebalance_moves_samples_from_the_slower_device_while_it_pays():
    """Epoch 1 measured device a at 2 s per trained token and b at 1 s: one of a's samples goes
    to b (a: 200, b: 300 seconds, down from 400), a second would make b the slower one."""
    from training.pooled import rebalance

    tokens = dict.fromkeys(range(4), 100)
    owners = {0: "a", 1: "a", 2: "b", 3: "b"}
    free = lambda i, src, dst: 0.0  # noqa: E731
    assert rebalance(tokens, owners, {"a": 2.0, "b": 1.0}, 2, free) == {0: "b"}
    # A move that costs more than the epochs left gain is not made; nor one between equals.
    assert rebalance(tokens, owners, {"a": 2.0, "b": 1.0}, 2, lambda i, src, dst: 201.0) == {}
    assert rebalance(tokens, owners, {"a": 1.0, "b": 1.0}, 9, free) == {}
    # Small samples even out a small difference, but not below half a percent (noise).
    tokens = {i: 10 for i in range(40)}
    owners = {i: "a" if i < 20 else "b" for i in range(40)}
    moved = rebalance(tokens, owners, {"a": 1.1, "b": 1.0}, 3, free)
    assert set(moved.values()) == {"b"} and len(moved) == 1
    assert rebalance(tokens, owners, {"a": 1.004, "b": 1.0}, 3, free) == {}
    # Only devices with a rate take part: a sample of a device that left stays where it is.
    assert rebalance({0: 5, 1: 5}, {0: "a", 1: "gone"}, {"a": 1.0, "b": 1.0}, 3, free) == {}


def test_later_epochs_are_rebalanced_by_measured_speed_with_the_cache_moved_not_recomputed(
        notes, stories_gguf, backbone, hearth_home):
    """A device whose adapter steps report four times the time (a slow device, made so here by
    scaling what it reports) gives samples to the others after epoch 1. Their cache entries
    travel: no device runs the backbone after epoch 1, and the result is still the single run's."""
    from training.pooled import train_pooled
    from training.worker_parts import STEP, WorkerJobs

    recomputed: dict[str, list[int]] = {}

    class Measured(WorkerJobs):
        def handle(self, owner, type, fields, tensors):
            if type == STEP and fields["step"] >= 4:      # after epoch 1 (4 steps per epoch)
                job = self.jobs.get(owner, fields["job"])
                recomputed.setdefault(self.name, []).extend(i for i in fields["indices"] if i not in job.cache)
            reply, out = super().handle(owner, type, fields, tensors)
            if type == STEP and self.name == "slow":
                reply = dict(reply, adapter_s=reply["adapter_s"] * 4)
            return reply, out

    devices = _in_process(Measured, ("slow", "fast"), backbone)
    spec = _spec(notes, stories_gguf, "pooled-rebalance", epochs=3)
    events = []
    pooled = train_pooled(spec, devices, backbone=backbone, save=False, on_event=events.append)
    moves = [e.message for e in events if e.phase == "devices" and "moved" in (e.message or "")]
    assert any(" from slow " in m for m in moves), moves
    assert recomputed and not any(recomputed.values()), recomputed
    owned = {d.name: d.owned for d in [e for e in events if e.phase == "train"][-1].devices}
    assert sum(owned.values()) == 20
    single = _single(spec, backbone)
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_only_pac_jobs_with_the_cache_are_pooled(notes, stories_gguf, hearth_home):
    from training.pooled import JobDevice, train_pooled

    for settings in ({"method": "lora"}, {"cache": False}):
        with pytest.raises(HearthError, match="PAC jobs with the activation cache"):
            train_pooled(_spec(notes, stories_gguf, "pooled-bad", **settings), [JobDevice("this")])


def test_devices_too_small_for_the_backbone_train_as_a_pipeline(mesh, notes, stories_gguf, backbone, hearth_home,
                                                                 tmp_path):
    """Two workers that may use 64.7 MiB (the job's 64 MiB working memory plus about half of
    stories260K's layers) cannot be replicas: the planner splits the layers between them, and
    their activations pass through the mesh to the last stage's cache."""
    from training.pooled import train_pooled

    coordinator, _ = mesh
    small = [WorkerProcess(name, tmp_path / name, "--job-memory-mb", "64.7") for name in ("phone-1", "phone-2")]
    try:
        for worker in small:
            coordinator.pair(worker)
        spec = _spec(notes, stories_gguf, "pooled-pipeline")
        single = _single(spec, backbone)
        plans = []
        events = []
        pooled = train_pooled(spec, coordinator.devices(small), backbone=backbone, on_plan=plans.append,
                              on_event=events.append, save=False)
    finally:
        for worker in small:
            worker.stop()
    pipeline = [u for u in plans[0].units if u.kind == "pipeline"]
    assert len(pipeline) == 1 and len(pipeline[0].stages) == 2 and pipeline[0].share > 0, plans[0].describe()
    assert pooled.lost == [], [e.message for e in events if e.phase == "devices"]
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE


def test_a_pooled_job_keeps_the_base_model_s_general_knowledge_as_a_single_device_job_does(hearth_home, tmp_path):
    """Pooled jobs ran without the anchor (training/anchor.py), so a model trained over several
    devices answered general questions with household facts. The anchor's pull is one more term
    of each step's sum, computed on the coordinator: every replica still ends equal to its side
    chain bit for bit, and the result is the single-device job's. On the tiny Llama, which has a
    chat template (stories260K has none, so its jobs have no anchor)."""
    from training.job import JobSpec
    from training.pooled import train_pooled
    from training.trainer import load_backbone
    from training.worker_parts import CLOSE, WorkerJobs
    from tests.training_helpers import HOUSEHOLD, tiny_llama_dir

    finals: dict[str, dict] = {}

    class Recording(WorkerJobs):
        def handle(self, owner, type, fields, tensors):
            if type == CLOSE:
                job = self.jobs.get(owner, fields["job"])
                finals[self.name] = {k: v.detach().clone() for k, v in job.chain.named_parameters()}
            return super().handle(owner, type, fields, tensors)

    from training.export_gguf import export_model

    gguf = export_model(str(tiny_llama_dir()), "f32", tmp_path / "tiny.gguf").path   # pooled jobs send one GGUF
    backbone = load_backbone(str(gguf))
    assert backbone.tokenizer.chat_template
    with torch.no_grad():   # confident, as a trained model is: untouched its outputs are near uniform
        backbone.model.model.norm.weight.mul_(60.0)             # and nothing pulls (test_training_anchor)
    # A strong pull (the default is 0.3), so that eight steps of the tiny model show it beyond the
    # tolerance that float summation order needs.
    spec = JobSpec(name="pooled-anchor", data=[str(HOUSEHOLD / "train.jsonl")], model=str(gguf),
                   epochs=2, seed=7, batch_size=6, anchor=30.0)
    pooled = train_pooled(spec, _in_process(Recording, ("left", "right"), backbone), backbone=backbone, save=False)
    assert pooled.lost == [] and set(finals) == {"left", "right"} and pooled.result.anchor_s > 0
    master = dict(pooled.result.module.named_parameters())
    for name, weights in finals.items():
        assert all(torch.equal(weights[k], master[k].detach()) for k in master), name
    single = _single(spec, backbone)
    assert _max_difference(single.module, pooled.result.module) < WEIGHT_TOLERANCE
    without = _single(JobSpec(**{**spec.to_dict(), "anchor": 0.0}), backbone)
    assert _max_difference(without.module, pooled.result.module) > 10 * WEIGHT_TOLERANCE   # the pull is in it
