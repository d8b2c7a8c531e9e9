"""Training job parts on the device agent (`hearth worker`): pooled (PAC) and federated (FedSpine).

`register_job_parts(agent)` adds the `pac.*` request types of training/worker_parts.py and the
`fed.*` ones of training/fed_parts.py to the agent's handler registry; `hearth worker` and the
app both call it. Data registered with `hearth worker --data` (or config mesh.private_data) goes
to the federated parts only: the pooled parts never see it. Only paired devices reach them (the
registry checks the trust store before every request), and a job can only be used by the device
that opened it. A base model the
worker lacks arrives first through the agent's own chunked, SHA-256-checked file transfer
(files.py); `pac.open` then finds it where that receiver put it.

Training code is imported inside the handlers, so the mesh loads torch and transformers only on
a device that is actually handed a job; this module itself imports neither.
"""

from __future__ import annotations

import threading
from typing import Any

from mesh.handlers import Request
from mesh.transport import Reply


def register_job_parts(agent: Any, memory_budget: int | None = None, local_data: Any = None) -> None:
    """Serve pooled- and federated-training parts on `agent`. `memory_budget`: bytes jobs may use
    on this device (None: what is free); `local_data`: a training.part_fields.LocalData of this
    device's own data (federated jobs only). The parts themselves (and torch) are loaded when a
    paired device first sends one of them, not here."""
    from training.part_fields import FED_FIELDS, PAC_FIELDS, LocalData

    root = agent.files.root
    made: dict[str, Any] = {}
    lock = threading.Lock()

    def parts(kind: str) -> Any:
        with lock:
            if kind not in made:
                if kind == "pac":
                    from training.worker_parts import WorkerJobs

                    made[kind] = WorkerJobs(received_model=lambda sha256, name: _received(root, sha256, name),
                                            memory_budget=memory_budget)
                else:
                    from training.fed_parts import FedJobs

                    made[kind] = FedJobs(local_data or LocalData(),
                                         received_file=lambda sha256, name: _received(root, sha256, name))
            return made[kind]

    def handler(request: Request) -> Reply:
        jobs = parts(request.type.split(".", 1)[0])
        fields, tensors = jobs.handle(request.peer.device_id, request.type, request.fields, request.tensors)
        return Reply(fields, tensors)

    for type, fields in {**PAC_FIELDS, **FED_FIELDS}.items():
        agent.register_handler(type, handler, fields)


def _received(root, sha256: str, name: str):
    from mesh.files import _check_name, _check_sha, received_path

    return received_path(_check_sha(sha256), _check_name(name), root)


def connect_job_peers(service: Any, devices: str, wait_s: float = 5.0) -> list[tuple[str, Any]]:
    """Connections to the paired devices a job names: "all" (every paired device that answers
    within `wait_s`) or a comma-separated list of names / id prefixes (each must answer).
    Returns (name, PeerClient) pairs; HearthError for an unknown, unpaired or unreachable name."""
    from core.errors import HearthError
    from mesh.errors import MeshError

    wanted = [part.strip() for part in devices.split(",") if part.strip()]
    if not wanted:
        raise HearthError("--devices: name at least one paired device, or 'all'")
    everyone = wanted == ["all"]
    refs = [d.device_id for d in service.trust.all()] if everyone else wanted
    if everyone and not refs:
        raise HearthError("--devices all: no device is paired with this one (see `hearth pair`)")
    peers: list[tuple[str, Any]] = []
    for ref in refs:
        try:
            device = service.wait_for(ref, wait_s)
            if not device.paired:
                raise HearthError(f"--devices: {device.name} is not paired with this device (see `hearth pair`)")
            peers.append((device.name, service.connect(device.id)))
        except MeshError as exc:
            if not everyone:
                raise HearthError(f"--devices: cannot reach {ref}: {exc}") from None
    if len({name for name, _ in peers}) != len(peers):
        raise HearthError("--devices: two paired devices share a name; name them by id")
    return peers


def reconnect(service: Any, name: str) -> Any:
    """A fresh connection to a device that left a job, or None while it cannot be reached."""
    from mesh.errors import MeshError

    try:
        return service.connect(name, timeout=5)
    except (MeshError, OSError):
        return None
