"""`hearth train --federated --devices all|NAME,...`: the federated half of `hearth train`.

Finds and connects the paired devices (mesh.job_parts), says what will travel before anything
does, then runs training.federated.train_federated. With --data, this device also takes part,
training on that data in place. Not a command of its own: train.py calls `run_federated`.
"""

from __future__ import annotations

import json
import sys


def run_federated(args, report) -> int:
    from core.errors import HearthError
    from mesh.job_parts import connect_job_peers, reconnect
    from mesh.service import MeshService
    from app.commands.models import fetch
    from training.catalog import DEFAULT_MODEL
    from training.fed_parts import FedSpec
    from training.federated import FedDevice, train_federated
    from training.part_fields import local_data

    if not args.devices:
        raise HearthError("--federated needs --devices all|NAME,... (the devices that hold the family's data)")
    spec = FedSpec(name=args.out, model=args.model or DEFAULT_MODEL, rounds=args.rounds,
                   target_sparsity=args.sparsity, local_steps=args.local_steps, batch_size=args.batch_size,
                   lr=args.lr if args.lr is not None else FedSpec.lr, seed=args.seed, quorum=args.quorum,
                   deadline_s=args.deadline)
    spec.validate()
    fetch(spec.model)
    local = local_data(args.data) if args.data else None
    service = MeshService(serve=False, interfaces=args.interface).start()
    try:
        peers = connect_job_peers(service, args.devices, args.wait)
        devices = ([FedDevice(service.config.name)] if local else []) + [FedDevice(n, p) for n, p in peers]
        names = [d.name for d in devices]
        notice = (f"Federated job {spec.name} on {', '.join(names)}: each device trains on its own data; "
                  "only adapter updates, pruning masks and losses travel.")
        if args.json:
            print(json.dumps({"phase": "plan", "message": notice, "devices": names, "receivers": []}), flush=True)
        else:
            print(notice, file=sys.stderr, flush=True)
        try:
            result = train_federated(spec, devices, local=local, resume=args.resume, on_event=report,
                                     rejoin=lambda name: reconnect(service, name))
        finally:
            for _, peer in peers:
                peer.close()
    finally:
        service.stop()
    if not args.json:
        loss = f"{result.final_loss:.3f}" if result.final_loss is not None else "?"
        print(f"Trained {spec.name} (federated, {result.steps} rounds, final loss {loss}, "
              f"{result.head_ratio:.0%} of heads and {result.channel_ratio:.0%} of MLP channels pruned) in "
              f"{result.wall_s:.0f} s: chat with `hearth chat --model {spec.name}`", file=sys.stderr)
    return 0
