"""`hearth train --devices all|NAME,...`: the pooled half of `hearth train` (see train.py).

Finds and connects the paired devices (mesh.job_parts), shows the plan before the job starts
(devices, shares, predicted step time, and which devices receive the job's data), then runs
training.pooled.train_pooled. Not a command of its own: train.py calls `run_pooled`.
"""

from __future__ import annotations

import json
import sys


def run_pooled(args, spec, report):
    from mesh.job_parts import connect_job_peers, reconnect
    from mesh.service import MeshService
    from training.pooled import JobDevice, train_pooled

    service = MeshService(serve=False, interfaces=args.interface).start()
    try:
        peers = connect_job_peers(service, args.devices, args.wait)
        devices = [JobDevice(service.config.name)] + [JobDevice(name, peer) for name, peer in peers]

        def show(plan) -> None:
            if args.json:
                receivers = sorted({n for u in plan.units if u.share for n in u.devices})
                print(json.dumps({"phase": "plan", "message": plan.describe(), "shares": plan.shares,
                                  "receivers": receivers, "epoch1_step_s": plan.epoch1_step_s,
                                  "later_step_s": plan.later_step_s}), flush=True)
            else:
                print(plan.describe(), file=sys.stderr, flush=True)

        try:
            pooled = train_pooled(spec, devices, resume=args.resume, on_event=report, on_plan=show,
                                  rejoin=lambda name: reconnect(service, name),
                                  checkpoint_every_s=args.checkpoint_every)
        finally:
            for _, peer in peers:
                peer.close()
        return pooled.result
    finally:
        service.stop()
