"""`hearth bench transport`: the mesh's transport against its plaintext baselines, on loopback.

1. Moving one tensor (default 40 MB) over our mutual-TLS transport (a request to a paired agent)
   vs the same bytes over a plain TCP socket and over a bare TLS socket with our contexts. Every
   receiver reads into a fresh buffer per transfer (the mesh's receiver must: the tensor it hands
   over lives there). Seconds from the first byte sent to the receiver's answer; medians.
2. Averaging a 10M-parameter float32 vector across 2 and 3 processes with MeshGroup.average
   (mutual TLS 1.3, collective.py) vs torch.distributed gloo all_reduce + divide (plaintext,
   unauthenticated: gloo's TLS transport is not built into this torch) on the same machine, in
   the same run, timed the same way (`_timed_rounds`): in place on a preallocated tensor, every
   rank released by one barrier, 5 averagings back to back per timed round, median over
   `--repeats` rounds, a round ending when the slowest rank is done; one untimed warm-up round
   each. Both sides run torch with 1 intra-op thread per process; besides, gloo runs its own
   I/O thread and ours a reader thread per connection and a sender thread per peer.
   Throughput = parameter bytes / seconds per averaging; `allreduce_vs_gloo` = ours / gloo
   (the lower of the process counts; target: at least 0.7 while encrypted). `cpu_s` is the CPU
   time of one averaging summed over the ranks: on a loaded machine it says more than wall time.

Every rank is a fresh process; the mesh ranks are paired by writing each other's certificates to
their trust stores (the pairing ceremony is not what is measured).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-mb", type=float, default=40.0, help="size of the moved tensor (default 40)")
    parser.add_argument("--params", type=int, default=10_000_000, help="float32 parameters averaged (default 10M)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side (default 7)")
    parser.add_argument("--world", default="2,3", help="process counts for averaging (default 2,3)")


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    result: dict = {"cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
                    "tensor_mb": args.tensor_mb, "params": args.params, "repeats": args.repeats,
                    "averagings_per_round": INNER}
    result["tensor_transfer"] = _tensor_transfer(int(args.tensor_mb * 1e6) // 4, args.repeats)
    averaging = {}
    for world in (int(w) for w in str(args.world).split(",") if w.strip()):
        both = _spawn(world, args.params, args.repeats)
        ours, gloo = both["mesh"], both["gloo"]
        bytes_ = args.params * 4
        averaging[str(world)] = {
            "mesh_s": ours["seconds"], "gloo_s": gloo["seconds"],
            "mesh_mb_s": round(bytes_ / ours["seconds"] / 1e6, 1), "gloo_mb_s": round(bytes_ / gloo["seconds"] / 1e6, 1),
            "allreduce_vs_gloo": round(gloo["seconds"] / ours["seconds"], 3),
            "mesh_cpu_s": ours["cpu_s"], "gloo_cpu_s": gloo["cpu_s"],
            "cpu_gloo_vs_mesh": round(gloo["cpu_s"] / ours["cpu_s"], 3),
            "mesh_correct": ours["correct"], "gloo_correct": gloo["correct"],
        }
    result["averaging"] = averaging
    result["allreduce_vs_gloo"] = min(v["allreduce_vs_gloo"] for v in averaging.values()) if averaging else None
    result["target_allreduce_vs_gloo"] = 0.7
    return result


# --- 1. one tensor --------------------------------------------------------------------------------

def _tensor_transfer(numel: int, repeats: int) -> dict:
    import torch

    from mesh.agent import Agent, AgentConfig
    from mesh.client import PeerClient
    from mesh.frames import encode_tensors
    from mesh.transport import client_context, server_context

    tensor = torch.randn(numel)
    nbytes = numel * 4
    with tempfile.TemporaryDirectory() as tmp:
        (a_id, a_trust), (b_id, b_trust) = _paired_pair(Path(tmp))
        agent = Agent(AgentConfig(name="b", interfaces=["127.0.0.1"], advertise=False, max_frame=nbytes + (8 << 20)),
                      b_id, b_trust).start()
        try:
            with PeerClient.connect(b_id.device_id, [("127.0.0.1", agent.port)], a_id, a_trust,
                                    max_frame=nbytes + (8 << 20)) as peer:
                peer.request("mesh.sink", {}, tensors={"x": tensor}, timeout=120)  # warm up
                ours = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    reply = peer.request("mesh.sink", {}, tensors={"x": tensor}, timeout=120)
                    ours.append(time.perf_counter() - start)
                    assert reply.fields["bytes"] == nbytes
        finally:
            agent.stop()
        payload = encode_tensors({"x": tensor})  # the same bytes, in the clear
        plain = _socket_transfer(payload, repeats)
        # The same bytes over a bare TLS socket with our contexts: the cost of TLS alone.
        tls = _socket_transfer(payload, repeats, (server_context(b_id, a_id.cert_pem), client_context(a_id, b_id.cert_der)))
    ours_s, plain_s, tls_s = statistics.median(ours), statistics.median(plain), statistics.median(tls)
    return {"bytes": nbytes, "mtls_s": round(ours_s, 4), "plain_tcp_s": round(plain_s, 4), "bare_tls_s": round(tls_s, 4),
            "mtls_mb_s": round(nbytes / ours_s / 1e6, 1), "plain_tcp_mb_s": round(nbytes / plain_s / 1e6, 1),
            "bare_tls_mb_s": round(nbytes / tls_s / 1e6, 1), "mtls_vs_plain": round(plain_s / ours_s, 3),
            "mtls_vs_bare_tls": round(tls_s / ours_s, 3)}


def _socket_transfer(payload: bytes, repeats: int, contexts=None) -> list[float]:
    """Seconds to send `payload` and get a 1-byte ack, over plain TCP or (contexts) bare TLS."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    size = len(payload)

    def serve() -> None:
        conn, _ = server.accept()
        if contexts:
            conn = contexts[0].wrap_socket(conn, server_side=True)
        with conn:
            for _ in range(repeats + 1):
                # A fresh buffer each time, as the mesh's receiver allocates one per frame (the
                # tensor it hands over lives in it).
                view = memoryview(bytearray(size))
                got = 0
                while got < size:
                    got += conn.recv_into(view[got:], size - got)
                conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    times = []
    sock = socket.create_connection(("127.0.0.1", port))
    if contexts:
        sock = contexts[1].wrap_socket(sock)
    with sock:
        for i in range(repeats + 1):
            start = time.perf_counter()
            sock.sendall(payload)
            sock.recv(1)
            if i:
                times.append(time.perf_counter() - start)
    thread.join(10)
    server.close()
    return times


def _paired_pair(root: Path):
    from mesh.identity import load_or_create_identity
    from mesh.trust import TrustStore

    a = load_or_create_identity(root / "a"), TrustStore(root / "a-trust")
    b = load_or_create_identity(root / "b"), TrustStore(root / "b-trust")
    a[1].add(b[0].cert_der, "b", "laptop", ["127.0.0.1"])
    b[1].add(a[0].cert_der, "a", "laptop", ["127.0.0.1"])
    return a, b


# --- 2. averaging -------------------------------------------------------------------------------

INNER = 5  # averagings per timed round
SIDES = ("mesh", "gloo")


def _spawn(world: int, params: int, repeats: int) -> dict:
    """{"mesh": ..., "gloo": ...}: seconds and CPU seconds per averaging, medians over the rounds."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ports = [_free_port() for _ in range(world + 1)]
        results = ctx.Queue()
        barrier = ctx.Barrier(world)  # starts every timed round together, on both sides
        procs = [ctx.Process(target=_rank, args=(rank, world, params, repeats, tmp, ports, results, barrier))
                 for rank in range(world)]
        for p in procs:
            p.start()
        outs = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(30)
    errors = [o for o in outs if "error" in o]
    if errors:
        raise RuntimeError(errors[0]["error"])
    summary = {}
    for side in SIDES:
        # One averaging is done when the slowest rank is done; CPU time is summed over the ranks.
        per_round = [max(o[side]["times"][i] for o in outs) for i in range(repeats)]
        cpu = [sum(o[side]["cpu"][i] for o in outs) for i in range(repeats)]
        summary[side] = {"seconds": round(statistics.median(per_round), 4), "cpu_s": round(statistics.median(cpu), 4),
                         "correct": all(o[side]["correct"] for o in outs)}
    return summary


def _timed_rounds(averages: dict, x, repeats: int, barrier, inner: int = INNER) -> dict:
    """{side: {"times", "cpu"}}: wall and CPU seconds per in-place averaging, per timed round.

    Both sides run in the same processes and take turns round by round (which one goes first
    alternates), so load from elsewhere on the machine falls on both alike. A turn: y is refilled
    from x (not timed), every rank waits at one barrier, then averages `inner` times back to back;
    the turn's time / `inner` is one averaging, which spreads the ranks' uneven wake-up from the
    barrier over several averagings. The first round warms up (buffers) and is not counted.
    """
    y = x.clone()
    out = {side: {"times": [], "cpu": []} for side in averages}
    order = list(averages)
    for i in range(repeats + 1):
        for side in (order if i % 2 else order[::-1]):
            y.copy_(x)
            barrier.wait()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                averages[side](y)
            if i:
                out[side]["times"].append((time.perf_counter() - start) / inner)
                out[side]["cpu"].append((time.process_time() - start_cpu) / inner)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_tensor(rank: int, params: int):
    import torch

    return torch.arange(params, dtype=torch.float32) * 1e-6 + rank


def _rank(rank, world, params, repeats, tmp, ports, results, barrier) -> None:
    """One rank of both sides: a mesh agent in a MeshGroup, and a gloo process group."""
    import traceback

    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        group, close_mesh = _mesh_member(rank, world, Path(tmp), ports)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[world]}", rank=rank, world_size=world)
        x = _rank_tensor(rank, params)
        expected = torch.arange(params, dtype=torch.float32) * 1e-6 + (world - 1) / 2
        correct = {"mesh": bool(torch.allclose(group.average(x), expected))}  # also warms up
        y = x.clone()
        dist.all_reduce(y)
        y /= world
        correct["gloo"] = bool(torch.allclose(y, expected))

        def gloo_average(y):
            dist.all_reduce(y)
            y /= world

        timed = _timed_rounds({"mesh": lambda y: group.average(y, out=y), "gloo": gloo_average}, x, repeats, barrier)
        group.average(x)  # a last round so no rank leaves while another still waits
        dist.barrier()
        dist.destroy_process_group()
        results.put({"rank": rank, **{side: {**timed[side], "correct": correct[side]} for side in SIDES}})
        time.sleep(1.0)
        close_mesh()
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def _mesh_member(rank: int, world: int, root: Path, ports: list[int]):
    """This rank's agent, connections and MeshGroup (paired with every other rank); (group, close)."""
    from mesh.agent import Agent, AgentConfig
    from mesh.client import PeerClient
    from mesh.collective import MeshGroup
    from mesh.identity import load_or_create_identity
    from mesh.trust import TrustStore

    os.environ["HEARTH_HOME"] = str(root / f"home{rank}")
    # Rank 0 makes every identity first; the others wait for the files.
    marker = root / "ids-ready"
    if rank == 0:
        for r in range(world):
            load_or_create_identity(root / f"id{r}")
        marker.write_text("ok")
    while not marker.exists():
        time.sleep(0.05)
    ids = [load_or_create_identity(root / f"id{r}") for r in range(world)]
    trust = TrustStore(root / f"trust{rank}")
    for r in range(world):
        if r != rank:
            trust.add(ids[r].cert_der, f"rank{r}", "desktop", ["127.0.0.1"], ports[r])
    # Default frame limit: the group sends pieces of a few MiB, whatever the tensor's size.
    agent = Agent(AgentConfig(name=f"rank{rank}", port=ports[rank], interfaces=["127.0.0.1"], advertise=False),
                  ids[rank], trust)
    group = MeshGroup(rank, {}, agent.handlers)
    agent.start()
    peers = {}
    for r in range(world):
        if r == rank:
            continue
        for _ in range(200):
            try:
                peers[r] = PeerClient.connect(ids[r].device_id, [("127.0.0.1", ports[r])], ids[rank], trust)
                break
            except Exception:
                time.sleep(0.05)
    group.peers = peers

    def close() -> None:
        for peer in peers.values():
            peer.close()
        group.close()
        agent.stop()

    return group, close
