"""Bad input never takes the agent down (hypothesis).

Malformed, truncated and oversized frames and malformed msgpack go to the decoder and to a live
agent over a real paired TLS connection. The decoder raises FrameError and nothing else; the
agent closes that one connection and keeps serving a paired peer whose connection stays open.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.agent import Agent, AgentConfig
from mesh.client import PeerClient
from mesh.errors import FrameError
from mesh.frames import Frame, decode_frame, frame_bytes
from mesh.identity import load_or_create_identity
from mesh.pairing import OutgoingPairing
from mesh.transport import dial_mesh
from mesh.trust import TrustStore

LOOP = "127.0.0.1"
MAX_FRAME = 1 << 20

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
plain = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | ints, inner, max_size=4),
    max_leaves=20,
)


VALID = frame_bytes(Frame("req", "mesh.echo", 9, {"a": [1, "x"]}, {"t": torch.arange(6, dtype=torch.float32)}))


def _raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


def _header(**override) -> bytes:
    head = {"k": "req", "t": "mesh.echo", "id": 1, "f": {}, "p": ""}
    head.update(override)
    return msgpack.packb(head, use_bin_type=True)


# Each strategy draws the bytes a hostile peer might send after the TLS handshake.
malformed_msgpack = st.binary(min_size=1, max_size=200).map(_raw_frame)
random_headers = plain.map(lambda v: _raw_frame(msgpack.packb(v, use_bin_type=True)))
bad_fields = st.fixed_dictionaries({"k": plain, "t": plain, "id": plain, "f": plain, "p": plain}).map(
    lambda d: _raw_frame(msgpack.packb(d, use_bin_type=True)))
bad_tensors = st.binary(max_size=300).map(lambda payload: _raw_frame(_header(p="st"), payload))
truncated = st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n])
flipped = st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)).map(
    lambda t: VALID[: t[0]] + bytes([VALID[t[0]] ^ t[1]]) + VALID[t[0] + 1:])
oversized = st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda n: struct.pack(">II", 16, n - 16) + b"\x80" * 16)
hostile = malformed_msgpack | random_headers | bad_fields | bad_tensors | truncated | flipped | oversized


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_decoder_raises_only_frame_error(data):
    try:
        frame = decode_frame(data, MAX_FRAME)
    except FrameError:
        return
    assert frame.kind in ("req", "res", "err", "hb")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_survives_arbitrary_bytes(data):
    try:
        decode_frame(data, MAX_FRAME)
    except FrameError:
        pass


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    a_id, a_trust = load_or_create_identity(root / "a"), TrustStore(root / "a-trust")
    b_id, b_trust = load_or_create_identity(root / "b"), TrustStore(root / "b-trust")
    agent = Agent(AgentConfig(name="b", interfaces=[LOOP], advertise=False, max_frame=MAX_FRAME, heartbeat_s=2.0),
                  b_id, b_trust, on_pairing_request=lambda incoming: incoming.accept()).start()
    assert OutgoingPairing(a_id, a_trust, "a", "laptop", LOOP, agent.port, confirm_locally=False).start().wait(20).paired
    legit = PeerClient.connect(b_id.device_id, identity=a_id, trust=a_trust)
    yield a_id, b_id, agent, legit
    legit.close()
    agent.stop()


def _closed_by_peer(sock: ssl.SSLSocket, timeout: float = 3.0) -> bool:
    """True when the other side closes (EOF or reset) within `timeout`, ignoring replies."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except (ssl.SSLError, ConnectionError):
        return True
    except (socket.timeout, TimeoutError):
        return False
    return False


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_live_agent_closes_only_the_bad_connection_and_keeps_serving(live, data):
    a_id, b_id, agent, legit = live
    sock, _ = dial_mesh(a_id, b_id.cert_der, LOOP, agent.port)
    try:
        sock.sendall(data)
        try:
            decode_frame(data, MAX_FRAME)
            well_formed = True
        except FrameError as exc:
            well_formed = "truncated" in str(exc) or "length mismatch" in str(exc)  # the agent waits for the rest
        if not well_formed:
            assert _closed_by_peer(sock), "the agent kept a connection that sent a bad frame"
    finally:
        sock.close()
    x = torch.randn(32)
    reply = legit.request("mesh.echo", {"n": 1}, tensors={"x": x}, timeout=10)
    assert torch.equal(reply.tensors["x"], x)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_garbage_before_tls_is_dropped_and_the_agent_keeps_serving(live, data):
    _, _, agent, legit = live
    with socket.create_connection((LOOP, agent.port)) as raw:
        raw.sendall(data)
    assert legit.hello()["name"] == "b"


def test_agent_holds_no_leftover_connections_after_fuzzing(live):
    a_id, _, agent, legit = live
    deadline = time.monotonic() + 10  # truncated frames end when the fuzzer hangs up or misses heartbeats
    while len(agent.connections) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c.peer.device_id for c in agent.connections] == [a_id.device_id]  # only the legit one
    assert legit.hello()["name"] == "b"
