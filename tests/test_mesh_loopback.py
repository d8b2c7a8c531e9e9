"""The mesh over loopback: identity, frames, TLS pinning, pairing, requests, files, profile.

Real sockets and real TLS 1.3 on 127.0.0.1; several devices live in one process, each with its
own identity and trust store. The three-host test with real mDNS is test_mesh_netns.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mesh.agent import Agent, AgentConfig
from mesh.client import PeerClient
from mesh.errors import FrameError, PeerRefused, RemoteError, RequestTimeout
from mesh.frames import Frame, decode_frame, frame_bytes
from mesh.identity import Identity, der_to_pem, load_or_create_identity, make_certificate
from mesh.pairing import OutgoingPairing, PairingLimits, pairing_code
from mesh.transport import Connection, dial_mesh
from mesh.trust import TrustStore

LOOP = "127.0.0.1"


@dataclass
class Device:
    name: str
    identity: Identity
    trust: TrustStore
    agent: Agent | None = None

    def pair_with(self, other: "Device", confirm: bool = True, **kw) -> OutgoingPairing:
        assert other.agent is not None
        return OutgoingPairing(self.identity, self.trust, self.name, "laptop", LOOP, other.agent.port,
                               confirm_locally=confirm, **kw).start()

    def connect(self, other: "Device", **kw) -> PeerClient:
        return PeerClient.connect(other.identity.device_id, identity=self.identity, trust=self.trust, **kw)


@pytest.fixture
def make_device(tmp_path: Path, hearth_home: Path):
    agents: list[Agent] = []

    def make(name: str, serve: bool = True, answer=None, limits: PairingLimits | None = None,
             heartbeat_s: float = 5.0, accept_pairing: bool = True) -> Device:
        device = Device(name, load_or_create_identity(tmp_path / name / "identity"), TrustStore(tmp_path / name / "trusted"))
        if serve:
            config = AgentConfig(name=name, interfaces=[LOOP], advertise=False, heartbeat_s=heartbeat_s,
                                 accept_pairing=accept_pairing, pairing=limits or PairingLimits())
            device.agent = Agent(config, device.identity, device.trust,
                                 on_pairing_request=answer or (lambda incoming: incoming.accept())).start()
            agents.append(device.agent)
        return device

    yield make
    for agent in agents:
        agent.stop()


def paired(make_device, **kw) -> tuple[Device, Device]:
    a = make_device("alpha", serve=False)
    b = make_device("beta", **kw)
    assert a.pair_with(b, confirm=False).wait(20).paired
    return a, b


# --- identity ---------------------------------------------------------------------------------

def test_identity_key_is_private_and_device_id_is_certificate_hash(tmp_path):
    identity = load_or_create_identity(tmp_path / "id")
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert len(identity.device_id) == 52
    assert identity.fingerprint == hashlib.sha256(identity.cert_der).digest()
    assert load_or_create_identity(tmp_path / "id").device_id == identity.device_id  # stable across runs
    assert load_or_create_identity(tmp_path / "other").device_id != identity.device_id
    os.chmod(identity.key_path, 0o644)
    with pytest.raises(Exception, match="readable by others"):
        load_or_create_identity(tmp_path / "id")


# --- frames -----------------------------------------------------------------------------------

def test_frame_roundtrip_is_bit_exact():
    tensors = {
        "f32": torch.randn(7, 5),
        "bits": torch.randint(-(2**31), 2**31 - 1, (64,), dtype=torch.int32).view(torch.float32),  # NaN payloads too
        "bf16": torch.randn(3, 3).to(torch.bfloat16),
        "i64": torch.arange(-5, 5),
        "u8": torch.tensor(list(b"hello"), dtype=torch.uint8),
    }
    frame = Frame("req", "job.step", 42, {"a": [1, 2.5, "x", b"\x00", None, {"b": True}]}, tensors)
    back = decode_frame(frame_bytes(frame))
    assert (back.kind, back.type, back.id, back.fields) == ("req", "job.step", 42, frame.fields)
    for name, tensor in tensors.items():
        assert back.tensors[name].dtype == tensor.dtype
        assert back.tensors[name].contiguous().view(torch.uint8).tolist() == tensor.contiguous().view(torch.uint8).tolist()


def test_tensor_payload_is_standard_safetensors_both_ways():
    from safetensors.torch import load, save

    from mesh.frames import decode_tensors, encode_tensors

    tensors = {"w": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "n": torch.arange(7), "m": torch.ones(2, dtype=torch.bool)}
    ours = load(encode_tensors(tensors))
    theirs = decode_tensors(save(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(ours[name], tensor) and torch.equal(theirs[name], tensor)


def test_oversized_and_malformed_frames_are_refused_by_the_decoder():
    big = frame_bytes(Frame("req", "x", 1, {}, data=b"\x00" * 2000))
    with pytest.raises(FrameError, match="over"):
        decode_frame(big, max_frame=1000)
    with pytest.raises(FrameError):
        decode_frame(big[:-1])
    with pytest.raises(FrameError):
        decode_frame(b"\x00\x00\x00\x03\x00\x00\x00\x00\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    import msgpack

    ext = msgpack.packb({"k": "req", "t": "x", "id": 1, "f": {"a": msgpack.ExtType(5, b"boom")}, "p": ""})
    with pytest.raises(FrameError, match="extension"):
        decode_frame(len(ext).to_bytes(4, "big") + b"\x00\x00\x00\x00" + ext)


# --- pairing ----------------------------------------------------------------------------------

def test_pairing_accepted_shows_one_code_and_stores_both_certificates(make_device):
    shown = []
    a = make_device("alpha", serve=False)
    b = make_device("beta", answer=lambda incoming: (shown.append(incoming.code), incoming.accept()))
    pairing = a.pair_with(b)
    assert pairing.code_ready.wait(10)
    pairing.accept()
    result = pairing.wait(20)
    assert result.paired, result.message
    assert shown == [pairing.code] and len(pairing.code) == 6 and pairing.code.isdigit()
    assert a.trust.is_trusted(b.identity.cert_der)
    assert b.trust.is_trusted(a.identity.cert_der)


def test_pairing_code_binds_both_certificates_and_nonces():
    _, cert_a = make_certificate()
    _, cert_b = make_certificate()
    na, nb = os.urandom(32), os.urandom(32)
    code = pairing_code(cert_a, cert_b, na, nb)
    digest = hashlib.sha256(hashlib.sha256(cert_a).digest() + hashlib.sha256(cert_b).digest() + na + nb).digest()
    assert code == f"{int.from_bytes(digest, 'big') % 10**6:06d}"
    assert code != pairing_code(cert_b, cert_a, na, nb) or code != pairing_code(cert_a, cert_b, nb, na)


def test_pairing_rejected_on_the_responder_stores_nothing(make_device):
    a = make_device("alpha", serve=False)
    b = make_device("beta", answer=lambda incoming: incoming.reject())
    result = a.pair_with(b, confirm=False).wait(20)
    assert not result.paired and "rejected" in result.message
    assert a.trust.all() == [] and b.trust.all() == []


def test_pairing_rejected_on_the_initiator_stores_nothing(make_device):
    a = make_device("alpha", serve=False)
    b = make_device("beta")
    pairing = a.pair_with(b)
    pairing.code_ready.wait(10)
    pairing.reject()
    assert not pairing.wait(20).paired
    time.sleep(0.3)
    assert a.trust.all() == [] and b.trust.all() == []


def test_pairing_commitment_mismatch_is_refused_before_any_prompt(make_device):
    prompts = []
    a = make_device("alpha", serve=False)
    b = make_device("beta", answer=lambda incoming: (prompts.append(incoming), incoming.accept()))
    pairing = OutgoingPairing(a.identity, a.trust, "alpha", "laptop", LOOP, b.agent.port, confirm_locally=False)
    pairing.reveal_nonce = lambda nonce: os.urandom(32)  # a nonce other than the committed one
    result = pairing.start().wait(20)
    assert not result.paired and "commitment does not match" in result.message
    assert prompts == [] and b.trust.all() == [] and a.trust.all() == []


def test_three_failed_pairing_attempts_block_the_address(make_device):
    a = make_device("alpha", serve=False)
    b = make_device("beta", answer=lambda incoming: incoming.reject())
    for _ in range(3):
        assert "rejected" in a.pair_with(b, confirm=False).wait(20).message
    result = a.pair_with(b, confirm=False).wait(20)
    assert not result.paired and "too many failed" in result.message


def test_no_pairing_refuses_requests(make_device):
    a = make_device("alpha", serve=False)
    b = make_device("beta", accept_pairing=False)
    result = a.pair_with(b, confirm=False).wait(20)
    assert not result.paired and "does not accept pairing" in result.message


def test_unanswered_pairing_request_expires_and_pending_requests_are_capped(make_device):
    waiting = []
    b = make_device("beta", answer=waiting.append, limits=PairingLimits(expiry_s=2.0, max_pending=2, max_failures=10))
    initiators = [make_device(f"i{n}", serve=False) for n in range(3)]
    pairings = [i.pair_with(b, confirm=False) for i in initiators[:2]]
    deadline = time.monotonic() + 10
    while len(waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    third = initiators[2].pair_with(b, confirm=False).wait(10)
    assert not third.paired and "too many pairing requests" in third.message
    for pairing in pairings:  # nobody answers: both expire after 2 s
        result = pairing.wait(15)
        assert not result.paired and "expired" in result.message
    assert b.trust.all() == []


# --- transport --------------------------------------------------------------------------------

def test_paired_devices_exchange_requests_and_tensors_bit_exact(make_device):
    a, b = paired(make_device)
    with a.connect(b) as peer:
        assert peer.hello()["id"] == b.identity.device_id
        x = torch.randn(256, 64)
        reply = peer.request("mesh.echo", {"note": "hi"}, tensors={"x": x, "bits": x.view(torch.int32)})
        assert reply.fields == {"note": "hi"}
        assert torch.equal(reply.tensors["x"].view(torch.int32), x.view(torch.int32))
        with pytest.raises(RemoteError, match="unknown request type"):
            peer.request("job.nothing")


def test_handler_fields_are_validated_before_the_handler_runs(make_device):
    a, b = paired(make_device)
    calls = []
    b.agent.register_handler("job.add", lambda req: (calls.append(req), {"sum": req.fields["x"] + 1})[1], {"x": int})
    with a.connect(b) as peer:
        assert peer.request("job.add", {"x": 41}).fields == {"sum": 42}
        with pytest.raises(RemoteError, match="field 'x'"):
            peer.request("job.add", {"x": "41"})
        assert len(calls) == 1 and calls[0].peer.device_id == a.identity.device_id


def test_unpaired_device_is_refused_during_the_tls_handshake(make_device):
    a, b = paired(make_device)
    stranger = make_device("stranger", serve=False)
    # The stranger knows b's certificate (it is public) but b does not trust the stranger's.
    sock, peer = dial_mesh(stranger.identity, b.identity.cert_der, LOOP, b.agent.port)
    with pytest.raises(PeerRefused, match="TLS handshake"):
        # TLS 1.3: the client learns of the server's refusal on its first read.
        Connection(sock, peer).start().request("mesh.hello", timeout=5)
    deadline = time.monotonic() + 5
    while not b.agent.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("TLS handshake" in r for r in b.agent.refused)


def test_impostor_with_a_paired_devices_name_and_subject_is_refused(make_device, tmp_path):
    a, b = paired(make_device)
    # The impostor copies b's certificate subject exactly, with its own key.
    from cryptography import x509

    subject = x509.load_der_x509_certificate(b.identity.cert_der).subject.rfc4514_string().split("=", 1)[1]
    key_pem, cert_der = make_certificate(subject)
    (tmp_path / "imp").mkdir()
    (tmp_path / "imp" / "device.key").write_bytes(key_pem)
    os.chmod(tmp_path / "imp" / "device.key", 0o600)
    (tmp_path / "imp" / "device.crt").write_text(der_to_pem(cert_der))
    impostor = Device("beta", load_or_create_identity(tmp_path / "imp"), TrustStore(tmp_path / "imp-trust"))
    # 1. a dials the impostor thinking it is b: refused by a's pinned trust anchor.
    impostor.agent = Agent(AgentConfig(name="beta", interfaces=[LOOP], advertise=False), impostor.identity, impostor.trust).start()
    try:
        with pytest.raises(PeerRefused):
            dial_mesh(a.identity, b.identity.cert_der, LOOP, impostor.agent.port)
        # Dialling "b" where the impostor claims to be skips it and reaches the real b.
        with PeerClient.connect(b.identity.device_id, [(LOOP, impostor.agent.port)], a.identity, a.trust) as peer:
            assert peer.hello()["id"] == b.identity.device_id
    finally:
        impostor.agent.stop()
    # 2. the impostor dials a's agent presenting itself as b: refused in a's handshake.
    a_agent = Agent(AgentConfig(name="alpha", interfaces=[LOOP], advertise=False), a.identity, a.trust).start()
    try:
        sock, peer = dial_mesh(impostor.identity, a.identity.cert_der, LOOP, a_agent.port)
        with pytest.raises(PeerRefused):
            Connection(sock, peer).start().request("mesh.hello", timeout=5)
        assert a_agent.connections == []
    finally:
        a_agent.stop()


def test_unpair_stops_both_sides_at_once(make_device):
    a, b = paired(make_device)
    peer = a.connect(b)
    assert peer.hello()
    b.trust.remove(a.identity.device_id)  # b unpairs a (as `hearth unpair` in another process would)
    with pytest.raises(Exception):
        peer.hello()  # the open connection is refused at the next request
    with pytest.raises(PeerRefused):
        c = a.connect(b)
        c.hello()


def test_silent_peer_is_dropped_after_missed_heartbeats(make_device):
    a, b = paired(make_device, heartbeat_s=0.5)
    # A raw client that completes the handshake and then goes silent (no heartbeats).
    sock, _ = dial_mesh(a.identity, b.identity.cert_der, LOOP, b.agent.port)
    deadline = time.monotonic() + 5
    while not b.agent.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(b.agent.connections) == 1
    conn = b.agent.connections[0]
    assert conn.closed.wait(5)
    assert "heartbeat" in conn.close_reason
    sock.close()


def test_request_times_out(make_device):
    a, b = paired(make_device)
    release = threading.Event()
    b.agent.register_handler("job.slow", lambda req: (release.wait(5), {})[1])
    with a.connect(b) as peer:
        with pytest.raises(RequestTimeout):
            peer.request("job.slow", timeout=0.3)
        release.set()
        assert peer.hello()  # the connection survives a timed-out request


def test_file_transfer_checks_sha256_and_resumes(make_device, tmp_path):
    a, b = paired(make_device)
    src = tmp_path / "base-model.gguf"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    with a.connect(b) as peer:
        # The connection drops after two chunks ...
        peer.request("file.offer", {"name": src.name, "size": src.stat().st_size, "sha256": sha})
        data = src.read_bytes()
        for offset in (0, 1 << 20):
            peer.request("file.chunk", {"sha256": sha, "offset": offset}, data=data[offset:offset + (1 << 20)])
    sent = []
    with a.connect(b) as peer:
        # ... and a new one resumes where it stopped.
        path = peer.send_file(src, progress=lambda done, total: sent.append(done))
    assert Path(path).read_bytes() == src.read_bytes()
    assert sent[0] == 3 << 20  # only the last two chunks went again
    with a.connect(b) as peer:
        with pytest.raises(RemoteError, match="bad file name"):
            peer.request("file.offer", {"name": "../escape", "size": 1, "sha256": sha})


def test_profile_reports_capabilities_and_measured_link(make_device):
    a, b = paired(make_device)
    with a.connect(b) as peer:
        profile = peer.profile()
    assert profile.device.cores == os.cpu_count()
    assert profile.device.memory_total_mb > 0 and profile.device.matmul_gflops > 0
    assert profile.device.torch_threads >= 1
    assert profile.link is not None and profile.link.rtt_ms > 0 and profile.link.bandwidth_mbps > 0


def test_bad_prelude_or_garbage_closes_only_that_socket(make_device):
    a, b = paired(make_device)
    with a.connect(b) as peer:
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"HRTH\x01M" + os.urandom(200), b""):
            with socket.create_connection((LOOP, b.agent.port)) as raw:
                raw.sendall(garbage)
        assert peer.hello()["name"] == "beta"


def test_mesh_never_imports_transformers_or_peft():
    import subprocess
    import sys

    code = ("import sys, importlib, pkgutil, mesh\n"
            "for m in pkgutil.iter_modules(mesh.__path__): importlib.import_module('mesh.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_mesh_group_average_is_the_mean_on_every_rank(make_device):
    from mesh.collective import MeshGroup

    devices = [make_device(f"rank{r}") for r in range(3)]
    for d in devices:  # every pair paired (the ceremony is tested above)
        for other in devices:
            if other is not d:
                d.trust.add(other.identity.cert_der, other.name, "laptop", [LOOP], other.agent.port)
    groups = [MeshGroup(r, {}, d.agent.handlers) for r, d in enumerate(devices)]
    for r, (d, group) in enumerate(zip(devices, groups)):
        group.peers = {o: d.connect(devices[o]) for o in range(3) if o != r}
    values = [torch.randn(1001, 3) for _ in range(3)]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, groups[r].average(values[r]))) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expected = (values[0] + values[1] + values[2]) / 3
    for r in range(3):
        assert results[r].shape == (1001, 3) and torch.allclose(results[r], expected, atol=1e-6)
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])  # bit-identical everywhere
    for group in groups:
        for peer in group.peers.values():
            peer.close()
        group.close()


def _mesh_groups(make_device, count: int, **kw):
    from mesh.collective import MeshGroup

    devices = [make_device(f"rank{r}") for r in range(count)]
    for d in devices:
        for other in devices:
            if other is not d:
                d.trust.add(other.identity.cert_der, other.name, "laptop", [LOOP], other.agent.port)
    groups = [MeshGroup(r, {}, d.agent.handlers, **kw) for r, d in enumerate(devices)]
    for r, (d, group) in enumerate(zip(devices, groups)):
        group.peers = {o: d.connect(devices[o]) for o in range(count) if o != r}
    return groups


def test_mesh_group_average_in_pieces_and_in_place_round_after_round(make_device):
    # 4 KiB pieces: each rank's chunk travels as many pieces, averaged and passed on one by one,
    # and from the second round on lands in receive buffers the group reuses.
    groups = _mesh_groups(make_device, 2, piece_bytes=4096)
    values = [torch.randn(20_011) for _ in range(2)]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(rank: int) -> None:
        for round_ in range(4):
            y = values[rank] * (round_ + 1)
            out = groups[rank].average(y, out=y)  # in place
            assert out is y
            results[rank].append(y.clone())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for round_ in range(4):
        expected = (values[0] + values[1]) * (round_ + 1) / 2
        assert torch.allclose(results[0][round_], expected, atol=1e-5)
        assert torch.equal(results[0][round_], results[1][round_])
    assert groups[0]._buffers  # the pieces were received into reused buffers
    for group in groups:
        for peer in group.peers.values():
            peer.close()
        group.close()


def test_mesh_group_refuses_a_part_sent_in_another_ranks_name(make_device):
    groups = _mesh_groups(make_device, 3, timeout=10)
    # Rank 1 claims to be rank 2: its TLS identity says otherwise.
    with pytest.raises(RemoteError, match="not that rank"):
        groups[1].peers[0].request("coll.part", {"round": 1, "phase": 1, "src": 2, "piece": 0},
                                   tensors={"x": torch.zeros(3)})
    assert not groups[0]._inbox
    for group in groups:
        for peer in group.peers.values():
            peer.close()
        group.close()
