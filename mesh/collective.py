"""Averaging a tensor across the devices of a job, over the mesh (data-parallel adapters).

A direct reduce-scatter + all-gather, suited to a household's 2-4 devices: the flat tensor is
cut into one chunk per rank; every rank sends chunk p to rank p (phase 1), each rank averages the
chunk it owns, then sends its averaged chunk to everyone (phase 2). Each rank sends and receives
2 (N-1)/N of the tensor, as a ring all-reduce does, in two steps instead of 2 (N-1). All of it
travels as ordinary requests on the paired devices' mutual-TLS connections.

    group = MeshGroup(rank, {other_rank: PeerClient, ...}, registry)   # the same on every rank
    mean = group.average(tensor)

This module does not decide who is in the group or when to average; the coordinator does.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.client import PeerClient
from mesh.errors import MeshError
from mesh.handlers import HandlerRegistry, Request

PART_TYPE = "coll.part"


class MeshGroup:
    def __init__(self, rank: int, peers: dict[int, PeerClient], registry: HandlerRegistry, timeout: float = 120.0):
        self.rank = rank
        self.peers = dict(peers)  # may be filled in after construction (the handler must exist first)
        self.timeout = timeout
        self._round = 0
        self._inbox: dict[tuple[int, int, int], Any] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-coll")
        registry.register(PART_TYPE, self._receive, {"round": int, "phase": int, "src": int})

    @property
    def size(self) -> int:
        return len(self.peers) + 1

    def _receive(self, request: Request) -> dict:
        f = request.fields
        if not request.tensors or "x" not in request.tensors or f["src"] == self.rank:
            raise MeshError("coll.part: bad part")
        with self._cond:
            self._inbox[(f["round"], f["phase"], f["src"])] = request.tensors["x"]
            self._cond.notify_all()
        return {}

    def _take(self, key: tuple[int, int, int]) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._inbox, self.timeout):
                raise MeshError(f"rank {key[2]} sent no part for round {key[0]} in {self.timeout:g} s")
            return self._inbox.pop(key)

    def _send_all(self, parts: dict[int, Any], phase: int) -> list:
        return [self._pool.submit(self.peers[p].request, PART_TYPE,
                                  {"round": self._round, "phase": phase, "src": self.rank}, {"x": part},
                                  None, self.timeout)
                for p, part in parts.items()]

    def average(self, tensor: Any) -> Any:
        """The element-wise mean of `tensor` over all ranks (same shape and dtype on every rank)."""
        import torch

        self._round += 1
        ranks = sorted([self.rank, *self.peers])
        flat = tensor.detach().reshape(-1)
        chunks = dict(zip(ranks, torch.tensor_split(flat, self.size)))
        # Phase 1 (reduce-scatter): rank p owns chunk p.
        sent = self._send_all({p: chunks[p] for p in self.peers}, 1)
        mine = chunks[self.rank].clone()
        for p in self.peers:
            mine += self._take((self._round, 1, p))
        mine /= self.size
        for future in sent:
            future.result()
        # Phase 2 (all-gather): everyone gets every averaged chunk.
        sent = self._send_all({p: mine for p in self.peers}, 2)
        out = {self.rank: mine}
        for p in self.peers:
            out[p] = self._take((self._round, 2, p))
        for future in sent:
            future.result()
        return torch.cat([out[r] for r in ranks]).reshape(tensor.shape)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
