"""Averaging a tensor across the devices of a job, over the mesh (data-parallel adapters).

A direct reduce-scatter + all-gather, suited to a household's 2-4 devices, pipelined in pieces:

- the flat tensor is cut into one chunk per rank, and each chunk into pieces of about
  `piece_bytes`;
- reduce-scatter: every rank sends chunk p, piece by piece, to rank p;
- as soon as rank p holds piece i from everyone it averages it (own + others in rank order,
  then / N) and sends the averaged piece to everyone (all-gather), while the rest of the
  reduce-scatter is still on the wire.

Each rank sends and receives 2 (N-1)/N of the tensor, as a ring all-reduce does, in two steps
instead of 2 (N-1); the pieces keep both directions of every link, the encryption on one side
and the decryption and adding on the other busy at the same time, instead of one phase waiting
for the other. Every element is averaged by exactly one rank, so all ranks get bit-identical
results. Everything travels as ordinary `coll.part` requests on the paired devices'
mutual-TLS connections (a rank sends on its own connection to each peer; a piece is a
safetensors frame, checked like any other). Received pieces land in buffers the group reuses
from round to round (Connection.payload_buffers), so a round allocates nothing per piece.

    group = MeshGroup(rank, {other_rank: PeerClient, ...}, registry)   # the same on every rank
    mean = group.average(tensor)            # a new tensor
    group.average(tensor, out=tensor)       # in place

One averaging at a time per group (rounds are numbered). This module does not decide who is in
the group or when to average; the coordinator does.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.client import PeerClient
from mesh.errors import MeshError
from mesh.frames import Frame
from mesh.handlers import HandlerRegistry, Request
from mesh.transport import Connection

PART_TYPE = "coll.part"
REDUCE, GATHER = 1, 2                # the two phases, as sent in the `phase` field
DEFAULT_PIECE_BYTES = 2 << 20        # `hearth bench transport`: best wall time of 1, 2, 4, 8 MiB (docs/mesh.md)


class MeshGroup:
    def __init__(self, rank: int, peers: dict[int, PeerClient], registry: HandlerRegistry, timeout: float = 120.0,
                 piece_bytes: int = DEFAULT_PIECE_BYTES):
        self.rank = rank
        self.peers = dict(peers)  # may be filled in after construction (the handler must exist first)
        self.timeout = timeout
        self.piece_bytes = max(int(piece_bytes), 1 << 12)
        self._round = 0
        self._inbox: dict[tuple[int, int, int, int], Any] = {}
        self._cond = threading.Condition()
        # One sending thread per peer: a peer's pieces go out in order on its connection, and
        # a slow peer never holds up the others.
        self._senders: dict[int, ThreadPoolExecutor] = {}
        # (phase, src, piece) -> receive buffer, reused every round; `_busy` holds the keys whose
        # buffer carries a piece not yet consumed (such a key gets a fresh buffer instead).
        self._buffers: dict[tuple[int, int, int], bytearray] = {}
        self._busy: set[tuple[int, int, int]] = set()
        self._lock = threading.Lock()
        registry.register(PART_TYPE, self._receive, {"round": int, "phase": int, "src": int, "piece": int})

    @property
    def size(self) -> int:
        return len(self.peers) + 1

    # receiving (reader and handler threads)

    def _rank_of(self, device_id: str) -> int | None:
        for rank, client in list(self.peers.items()):
            if client.peer.device_id == device_id:
                return rank
        return None

    def _receive(self, request: Request) -> dict:
        f = request.fields
        if not request.tensors or set(request.tensors) != {"x"} or f["phase"] not in (REDUCE, GATHER):
            raise MeshError("coll.part: bad part")
        # The sender's rank must be the one its TLS identity holds in this group (checked again
        # when the part is taken: a fast peer's parts may arrive before `peers` is filled in).
        sender = self._rank_of(request.peer.device_id)
        if f["src"] == self.rank or (sender is not None and sender != f["src"]):
            raise MeshError("coll.part: the sender is not that rank of this group")
        conn = request.connection
        if conn is not None and PART_TYPE not in conn.payload_buffers:
            conn.payload_buffers[PART_TYPE] = self._payload_buffer  # later pieces land in reused buffers
        with self._cond:
            self._inbox[(f["round"], f["phase"], f["src"], f["piece"])] = (request.peer.device_id, request.tensors["x"])
            self._cond.notify_all()
        return {}

    def _payload_buffer(self, conn: Connection, frame: Frame, nbytes: int) -> memoryview | None:
        f = frame.fields
        phase, src, piece = f.get("phase"), f.get("src"), f.get("piece")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (phase, src, piece)):
            return None
        if phase not in (REDUCE, GATHER) or not 0 <= piece < 1 << 20 or self._rank_of(conn.peer.device_id) != src:
            return None
        key = (phase, src, piece)
        with self._lock:
            if key in self._busy:
                return None
            buffer = self._buffers.get(key)
            if buffer is None or len(buffer) < nbytes:
                buffer = self._buffers[key] = bytearray(nbytes)
            self._busy.add(key)
        return memoryview(buffer)[:nbytes]

    def _take(self, round_: int, phase: int, src: int, piece: int) -> Any:
        key = (round_, phase, src, piece)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._inbox, self.timeout):
                raise MeshError(f"rank {src} sent no part {piece} (phase {phase}) for round {round_} in {self.timeout:g} s")
            device_id, part = self._inbox.pop(key)
        if self.peers[src].peer.device_id != device_id:
            raise MeshError(f"a part claiming to come from rank {src} came from another device")
        return part

    def _done_with(self, phase: int, src: int, piece: int) -> None:
        with self._lock:
            self._busy.discard((phase, src, piece))

    # sending

    def _send(self, peer: int, phase: int, piece: int, part: Any) -> Any:
        sender = self._senders.get(peer)
        if sender is None:
            sender = self._senders[peer] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mesh-coll-{peer}")
        fields = {"round": self._round, "phase": phase, "src": self.rank, "piece": piece}
        return sender.submit(self.peers[peer].conn.submit, PART_TYPE, fields, {"x": part})

    def _pieces(self, begin: int, end: int, element_size: int) -> list[tuple[int, int]]:
        count = max(1, -(-(end - begin) * element_size // self.piece_bytes))
        step = -(-(end - begin) // count)
        return [(b, min(b + step, end)) for b in range(begin, end, step)] or [(begin, end)]

    # the collective

    def average(self, tensor: Any, out: Any = None) -> Any:
        """The element-wise mean of `tensor` over all ranks (same shape and dtype on every rank).

        The result goes to `out` when given (same shape and dtype; may be `tensor` itself),
        else to a new tensor; `tensor` is left as it was unless it is `out`.
        """
        import torch

        self._round += 1
        flat = tensor.detach().reshape(-1)
        if out is None:
            out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        if out.shape != tensor.shape or out.dtype != tensor.dtype or not out.is_contiguous():
            raise ValueError("average: out must be a contiguous tensor of the input's shape and dtype")
        result = out.detach().view(-1)
        ranks = sorted([self.rank, *self.peers])
        chunk_of = dict(zip(ranks, _split(flat.numel(), self.size)))
        pieces = {r: self._pieces(*chunk_of[r], flat.element_size()) for r in ranks}
        sent = []
        # Reduce-scatter: every piece of chunk p goes to rank p.
        for p in self.peers:
            for i, (b, e) in enumerate(pieces[p]):
                sent.append(self._send(p, REDUCE, i, flat[b:e]))
        # Average the pieces this rank owns as they arrive; pass each on at once (all-gather).
        for i, (b, e) in enumerate(pieces[self.rank]):
            mine = result[b:e]
            first = True
            for p in sorted(self.peers):
                part = self._take(self._round, REDUCE, p, i)
                if part.dtype != flat.dtype or part.numel() != e - b:
                    raise MeshError(f"rank {p} sent a part of the wrong size or type")
                if first:
                    torch.add(flat[b:e], part.reshape(-1), out=mine)
                    first = False
                else:
                    mine += part.reshape(-1)
                self._done_with(REDUCE, p, i)
            if first:  # no peers
                mine.copy_(flat[b:e])
            mine /= self.size
            for p in self.peers:
                sent.append(self._send(p, GATHER, i, mine))
        # Everyone else's averaged pieces.
        for p in self.peers:
            for i, (b, e) in enumerate(pieces[p]):
                part = self._take(self._round, GATHER, p, i)
                if part.dtype != flat.dtype or part.numel() != e - b:
                    raise MeshError(f"rank {p} sent a part of the wrong size or type")
                result[b:e].copy_(part.reshape(-1))
                self._done_with(GATHER, p, i)
        for future in sent:
            future.result(self.timeout).result(self.timeout)
        return out

    def close(self) -> None:
        for sender in self._senders.values():
            sender.shutdown(wait=False, cancel_futures=True)
        self._buffers.clear()


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """[begin, end) of `parts` nearly equal chunks of range(n) (the first n % parts one longer)."""
    size, extra = divmod(n, parts)
    bounds, begin = [], 0
    for k in range(parts):
        end = begin + size + (1 if k < extra else 0)
        bounds.append((begin, end))
        begin = end
    return bounds
