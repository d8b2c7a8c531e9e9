"""`hearth unpair DEVICE`: forget a paired device (and ask it to forget this one).

`--json` prints {"unpaired": true, "id", "name"}.
"""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("unpair", help="forget a paired device")
    p.add_argument("device", help="device name or id prefix")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from mesh.service import MeshService

    device = MeshService().unpair(args.device)
    if args.json:
        print(json.dumps({"unpaired": True, "id": device.id, "name": device.name}, indent=2))
    else:
        print(f"Unpaired {device.name} ({device.id[:7]}); it can no longer connect.")
    return 0
