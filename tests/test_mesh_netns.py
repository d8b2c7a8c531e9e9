"""Three hosts in network namespaces, real mDNS, real TLS: the mesh as a household would run it.

Hosts a, b, c each run `hearth worker` with their own HEARTH_HOME (tests/netns.py). The tests
run in file order and share the lab: discovery, pairing accepted (a-b) and rejected (c-b),
requests and a bit-exact tensor round trip, refusals (unpaired device, impostor, commitment
mismatch), the canary capture, and last the workers leaving (SIGTERM goodbye, SIGKILL probe).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.netns import NetnsLab, lab_unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7000
CANARY = "HEARTH-CANARY-7f3a9c-the-family-recipe-is-secret"


@pytest.fixture(scope="module")
def lab():
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab() as lab:
        hosts = {name: lab.add_host(name) for name in ("a", "b", "c")}
        workers = {}
        for name, host in hosts.items():
            workers[name] = host.hearth("worker", "--name", f"host-{name}", "--port", str(PORT),
                                        "--interface", host.address)
        ids = {name: w.wait_for(r"Device id: (\S+)", 60).group(1) for name, w in workers.items()}
        lab.state = {"hosts": hosts, "workers": workers, "ids": ids}
        yield lab


def _devices_json(lab, name: str, wait: float = 3.0) -> dict:
    host = lab.state["hosts"][name]
    process = host.hearth("devices", "--json", "--wait", str(wait), "--interface", host.address)
    assert process.wait(60) == 0, process.stderr()
    return json.loads("\n".join(process.lines))


def test_every_host_discovers_the_others(lab):
    ids = lab.state["ids"]
    # All three listings run at once: each is a separate process in its own namespace.
    hosts = lab.state["hosts"]
    procs = {n: h.hearth("devices", "--json", "--wait", "4", "--interface", h.address) for n, h in hosts.items()}
    for name, process in procs.items():
        assert process.wait(60) == 0, process.stderr()
        listing = json.loads("\n".join(process.lines))
        assert listing["self"]["id"] == ids[name]
        seen = {d["id"]: d for d in listing["devices"]}
        others = {n for n in ids if n != name}
        assert {ids[n] for n in others} <= set(seen), listing
        for other in others:
            entry = seen[ids[other]]
            assert entry["name"] == f"host-{other}" and entry["port"] == PORT and entry["paired"] is False
            assert entry["addresses"] == [hosts[other].address] and entry["state"] == "seen"
            assert set(entry) >= {"id", "name", "kind", "addresses", "port", "paired"}


def _answer_prompt(worker, answer: str, after: int) -> str:
    worker.wait_for(r"Accept\? \[y/N\]", 30, after)
    code = worker.wait_for(r"Code: (\d{6})", 5, after).group(1)
    worker.send_line(answer)
    return code


def test_pairing_succeeds_when_accepted_with_the_same_code_on_both_sides(lab):
    a, b = lab.state["hosts"]["a"], lab.state["hosts"]["b"]
    worker_b = lab.state["workers"]["b"]
    mark = len(worker_b.lines)
    pair = a.hearth("pair", "host-b", "--interface", a.address)
    pair.send_line("y")  # a's person confirms the code too
    code_b = _answer_prompt(worker_b, "y", mark)
    assert pair.wait(60) == 0, pair.stderr() + "\n".join(pair.lines)
    code_a = pair.wait_for(r"Code: (\d{6})").group(1)
    assert code_a == code_b
    assert (a.home / "data" / "trusted" / f"{lab.state['ids']['b']}.json").exists()
    assert (b.home / "data" / "trusted" / f"{lab.state['ids']['a']}.json").exists()
    listing = _devices_json(lab, "a", 2)
    assert [d["paired"] for d in listing["devices"] if d["id"] == lab.state["ids"]["b"]] == [True]


def test_pairing_fails_when_rejected(lab):
    c = lab.state["hosts"]["c"]
    worker_b = lab.state["workers"]["b"]
    mark = len(worker_b.lines)
    pair = c.hearth("pair", "host-b", "--yes", "--json", "--interface", c.address)
    _answer_prompt(worker_b, "n", mark)
    assert pair.wait(60) == 1
    result = json.loads("\n".join(pair.lines))
    assert result["paired"] is False and "rejected" in result["message"]
    assert not (c.home / "data" / "trusted").exists() or not list((c.home / "data" / "trusted").iterdir())
    b_trusted = lab.state["hosts"]["b"].home / "data" / "trusted"
    assert not (b_trusted / f"{lab.state['ids']['c']}.json").exists()


def _roundtrip(peer_name: str) -> dict:
    import torch

    from mesh.service import MeshService

    torch.manual_seed(0)
    sent = {
        "weights": torch.randn(512, 257),
        "nan_bits": torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int32).view(torch.float32),
        "half": torch.randn(100).to(torch.bfloat16),
        "ids": torch.randint(0, 50000, (3, 77)),
    }
    with MeshService(interfaces=[os.environ["HOST_ADDRESS"]]) as service:
        service.wait_for(peer_name, 10)
        with service.connect(peer_name) as peer:
            hello = peer.hello()
            reply = peer.request("mesh.echo", {"step": 7, "note": "round trip"}, tensors=sent)
            profile = peer.profile()
    exact = all(reply.tensors[k].dtype == v.dtype and reply.tensors[k].view(torch.uint8).equal(v.view(torch.uint8))
                for k, v in sent.items())
    return {"hello": hello, "fields": reply.fields, "exact": exact, "rtt_ms": profile.link.rtt_ms,
            "cores": profile.device.cores}


def test_paired_devices_exchange_requests_and_tensors_bit_exact(lab):
    a = lab.state["hosts"]["a"]
    os.environ["HOST_ADDRESS"] = a.address
    result = a.call(_roundtrip, "host-b", timeout=90)
    assert result["hello"]["id"] == lab.state["ids"]["b"] and result["hello"]["name"] == "host-b"
    assert result["fields"] == {"step": 7, "note": "round trip"}
    assert result["exact"] is True
    assert result["rtt_ms"] > 0 and result["cores"] >= 1


def _measure_link(peer_name: str) -> tuple[float, float]:
    from mesh.service import MeshService

    with MeshService(interfaces=[os.environ["HOST_ADDRESS"]]) as service:
        service.wait_for(peer_name, 10)
        with service.connect(peer_name) as peer:
            link = peer.measure_link(pings=3, payload_bytes=3 << 20)
    return link.bandwidth_mbps, link.rtt_ms


def test_link_measurement_sees_a_shaped_link(lab):
    a = lab.state["hosts"]["a"]
    os.environ["HOST_ADDRESS"] = a.address
    a.shape("40mbit")  # a home Wi-Fi link, for what a sends
    try:
        bandwidth, rtt = a.call(_measure_link, "host-b", timeout=60)
    finally:
        a.shape(None)
    assert 25 <= bandwidth <= 48, bandwidth
    assert rtt > 0


def _dial_unpaired(address: str, port: int) -> str:
    from mesh.errors import PeerRefused
    from mesh.identity import load_or_create_identity
    from mesh.transport import Connection, dial_mesh, dial_pairing

    me = load_or_create_identity()
    sock, their_cert = dial_pairing(me, address, port)  # anyone can learn the public certificate
    sock.close()
    sock, peer = dial_mesh(me, their_cert, address, port)
    try:
        Connection(sock, peer).start().request("mesh.hello", timeout=10)
    except PeerRefused as exc:
        return f"refused: {exc}"
    return "served"


def test_unpaired_device_is_refused_during_the_tls_handshake(lab):
    c, b = lab.state["hosts"]["c"], lab.state["hosts"]["b"]
    worker_b = lab.state["workers"]["b"]
    outcome = c.call(_dial_unpaired, b.address, PORT)
    assert outcome.startswith("refused") and "TLS handshake" in outcome
    deadline = time.monotonic() + 5
    while f"refused connection from {c.address}: TLS handshake" not in worker_b.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"refused connection from {c.address}: TLS handshake" in worker_b.stderr()


def _run_impostor(real_cert_der: bytes, name: str, claimed_id: str, port: int, address: str, stop_file: str,
                  ready_file: str) -> str:
    """A device in c that copies b's name, b's id in its TXT record, and b's certificate subject."""
    from cryptography import x509

    from mesh.agent import Agent, AgentConfig
    from mesh.discovery import Discovery
    from mesh.identity import der_to_pem, load_or_create_identity, make_certificate
    from mesh.trust import TrustStore

    subject = x509.load_der_x509_certificate(real_cert_der).subject.rfc4514_string().split("=", 1)[1]
    key_pem, cert_der = make_certificate(subject)
    home = os.path.join(os.environ["HEARTH_HOME"], "impostor")
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "device.key"), "wb") as f:
        f.write(key_pem)
    os.chmod(os.path.join(home, "device.key"), 0o600)
    with open(os.path.join(home, "device.crt"), "w") as f:
        f.write(der_to_pem(cert_der))
    identity = load_or_create_identity(__import__("pathlib").Path(home))
    agent = Agent(AgentConfig(name=name, port=port, interfaces=[address], advertise=False), identity,
                  TrustStore(__import__("pathlib").Path(home) / "trusted")).start()
    discovery = Discovery([address]).start()
    discovery.advertise(claimed_id, name, "laptop", agent.port, True, instance=f"{name} (2)")
    open(ready_file, "w").close()
    while not os.path.exists(stop_file):
        time.sleep(0.1)
    discovery.close()
    agent.stop()
    return "stopped"


def _connect_as_a(b_id: str, impostor_address: str, impostor_port: int) -> dict:
    from mesh.errors import PeerRefused
    from mesh.identity import load_or_create_identity
    from mesh.service import MeshService
    from mesh.transport import dial_mesh
    from mesh.trust import TrustStore

    out = {}
    me = load_or_create_identity()
    b_cert = TrustStore().get(b_id).cert_der
    try:
        dial_mesh(me, b_cert, impostor_address, impostor_port)
        out["direct"] = "connected"
    except PeerRefused as exc:
        out["direct"] = f"refused: {exc}"
    with MeshService(interfaces=[os.environ["HOST_ADDRESS"]]) as service:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until a has heard the impostor's claim
            rows = [d for d in service.devices() if d.id == b_id]
            if rows and (impostor_address, impostor_port) in rows[0].endpoints:
                break
            time.sleep(0.2)
        out["claims"] = [list(e) for e in rows[0].endpoints] if rows else []
        with service.connect(b_id) as peer:  # the real b, despite the claim
            out["hello_id"] = peer.hello()["id"]
            out["address"] = peer.peer.address
    return out


def _impostor_dials_a(real_cert_der_a: bytes, address: str, port: int) -> str:
    from pathlib import Path

    from mesh.errors import PeerRefused
    from mesh.identity import load_or_create_identity
    from mesh.transport import Connection, dial_mesh

    me = load_or_create_identity(Path(os.environ["HEARTH_HOME"]) / "impostor")
    sock, peer = dial_mesh(me, real_cert_der_a, address, port)
    try:
        Connection(sock, peer).start().request("mesh.hello", timeout=10)
    except PeerRefused as exc:
        return f"refused: {exc}"
    return "served"


def test_device_with_a_paired_devices_name_but_another_certificate_is_refused(lab):
    hosts, ids = lab.state["hosts"], lab.state["ids"]
    a, c = hosts["a"], hosts["c"]
    from mesh.trust import TrustStore

    b_cert = TrustStore(a.home / "data" / "trusted").get(ids["b"]).cert_der
    a_cert = TrustStore(hosts["b"].home / "data" / "trusted").get(ids["a"]).cert_der
    stop_file = str(lab.root / "stop-impostor")
    ready_file = lab.root / "impostor-ready"
    impostor = c.spawn(_run_impostor, b_cert, "host-b", ids["b"], PORT + 1, c.address, stop_file, str(ready_file))
    try:
        deadline = time.monotonic() + 20
        while not ready_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.environ["HOST_ADDRESS"] = a.address
        out = a.call(_connect_as_a, ids["b"], c.address, PORT + 1, timeout=60)
        refused_by_a = c.call(_impostor_dials_a, a_cert, a.address, PORT)
    finally:
        open(stop_file, "w").close()
        impostor.result(30)
    assert out["direct"].startswith("refused"), out
    assert [c.address, PORT + 1] in out["claims"], out     # a heard the false claim ...
    assert out["hello_id"] == ids["b"] and out["address"] == hosts["b"].address  # ... and reached only the real b
    assert refused_by_a.startswith("refused"), refused_by_a


def _mismatched_commitment(address: str, port: int) -> str:
    from mesh.identity import load_or_create_identity
    from mesh.pairing import OutgoingPairing
    from mesh.trust import TrustStore

    pairing = OutgoingPairing(load_or_create_identity(), TrustStore(), "host-c", "laptop", address, port,
                              confirm_locally=False)
    pairing.reveal_nonce = lambda nonce: bytes(32)  # not the nonce it committed to
    return pairing.start().wait(30).message


def test_pairing_whose_commitment_does_not_match_is_refused(lab):
    c, b = lab.state["hosts"]["c"], lab.state["hosts"]["b"]
    worker_b = lab.state["workers"]["b"]
    mark = len(worker_b.lines)
    message = c.call(_mismatched_commitment, b.address, PORT)
    assert "commitment does not match" in message
    time.sleep(0.5)
    assert not any("Pairing request from" in line for line in worker_b.lines[mark:])  # never prompted
    assert not (b.home / "data" / "trusted" / f"{lab.state['ids']['c']}.json").exists()


def _send_canary(peer_name: str, canary: str) -> int:
    import torch

    from mesh.service import MeshService

    tensor = torch.tensor(list(canary.encode()) * 200, dtype=torch.uint8)
    with MeshService(interfaces=[os.environ["HOST_ADDRESS"]]) as service:
        service.wait_for(peer_name, 10)
        with service.connect(peer_name) as peer:
            reply = peer.request("mesh.echo", {"note": canary}, tensors={"secret": tensor})
            assert reply.fields["note"] == canary and torch.equal(reply.tensors["secret"], tensor)
    return tensor.numel()


def _plain_listener(address: str, port: int) -> bytes:
    with socket.create_server((address, port)) as server:
        server.settimeout(20)
        conn, _ = server.accept()
        with conn:
            return conn.recv(4096)


def _plain_send(address: str, port: int, payload: bytes) -> None:
    for _ in range(50):
        try:
            with socket.create_connection((address, port), timeout=2) as sock:
                sock.sendall(payload)
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("plain listener never came up")


def test_canary_in_a_tensor_and_a_request_never_appears_on_the_wire(lab):
    a, b = lab.state["hosts"]["a"], lab.state["hosts"]["b"]
    os.environ["HOST_ADDRESS"] = a.address
    with lab.capture(a) as capture:
        sent = a.call(_send_canary, "host-b", CANARY, timeout=60)
    wire = capture.data
    # The capture saw the exchange (the tensor went both ways inside TLS) ...
    assert len(wire) > 2 * sent
    assert CANARY.encode() not in wire and CANARY.encode()[:16] not in wire
    # ... and the same capture does find a canary sent in the clear: the check can fail.
    with lab.capture(a) as control:
        listener = b.spawn(_plain_listener, b.address, PORT + 2)
        a.call(_plain_send, b.address, PORT + 2, CANARY.encode())
        assert listener.result(30) == CANARY.encode()
    assert CANARY.encode() in control.data


def _watch_departures(names: list[str], ready_file: str, timeout: float) -> dict:
    from mesh.discovery import Discovery

    gone: dict[str, float] = {}
    discovery = Discovery([os.environ["HOST_ADDRESS"]],
                          on_change=lambda event, d: gone.setdefault(d.name, time.time()) if event == "gone" else None)
    discovery.start()
    deadline = time.monotonic() + 15
    while {d.name for d in discovery.devices(include_gone=False)} < set(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    open(ready_file, "w").close()
    deadline = time.monotonic() + timeout
    while set(gone) < set(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    discovery.close()
    return gone


def test_workers_leaving_are_reported_gone(lab):
    from mesh.discovery import GONE_WITHIN_S

    hosts, workers = lab.state["hosts"], lab.state["workers"]
    b = hosts["b"]
    os.environ["HOST_ADDRESS"] = b.address
    ready = lab.root / "watch-ready"
    watcher = b.spawn(_watch_departures, ["host-a", "host-c"], str(ready), 30.0)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped_at = time.time()
    assert workers["c"].stop(signal.SIGTERM) == 0          # clean stop: goodbye packet
    assert "mDNS record is withdrawn" in "\n".join(workers["c"].lines)
    killed_at = time.time()
    workers["a"].stop(signal.SIGKILL)                       # no goodbye: the probe notices
    gone = watcher.result(60)
    assert gone.get("host-c", 1e9) - stopped_at < 3.0, (gone, stopped_at)
    assert gone.get("host-a", 1e9) - killed_at <= GONE_WITHIN_S, (gone, killed_at, GONE_WITHIN_S)
