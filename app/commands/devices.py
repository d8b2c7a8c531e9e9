"""`hearth devices`: the Hearth devices heard on the network, and the paired ones.

`--json` prints {"self": {"id", "name"}, "devices": [DEVICE...]} where each DEVICE is
{"id", "short_id", "name", "kind", "addresses", "port", "paired", "state", "accepts_pairing",
"last_seen"} (state: seen, updated, gone, manual, offline). See docs/mesh.md.
"""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("devices", help="devices on the network, paired or not")
    p.add_argument("--json", action="store_true", help="machine-readable output (shape in docs/mesh.md)")
    p.add_argument("--wait", type=float, default=2.0, metavar="SECONDS", help="how long to listen (default 2)")
    p.add_argument("--interface", action="append", metavar="ADDRESS", help="IPv4 address to listen on (repeatable)")
    p.add_argument("--add", metavar="HOST:PORT", help="also ask the device at this address (where multicast is blocked)")
    return p


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from core.errors import HearthError
    from mesh.identity import short_id
    from mesh.service import MeshService

    if args.wait < 0:
        raise HearthError("--wait must be zero or more seconds")
    with MeshService(interfaces=args.interface) as service:
        if args.add:
            host, _, port = args.add.rpartition(":")
            if not host or not port.isdigit():
                raise HearthError(f"--add: expected HOST:PORT, got {args.add!r}")
            service.add_address(host, int(port))
        time.sleep(args.wait)
        devices = service.devices()
        me = {"id": service.device_id, "name": service.config.name}
    if args.json:
        print(json.dumps({"self": me, "devices": [d.to_json() for d in devices]}, indent=2))
        return 0
    print(f"This device: {me['name']} ({short_id(me['id'])})")
    if not devices:
        print("No other Hearth devices heard.")
        return 0
    print(f"{'NAME':<20} {'ID':<8} {'KIND':<8} {'PAIRED':<7} {'STATE':<8} ADDRESS")
    for d in devices:
        where = f"{d.addresses[0]}:{d.port}" if d.addresses else "-"
        print(f"{d.name:<20} {short_id(d.id):<8} {d.kind:<8} {'yes' if d.paired else 'no':<7} {d.state:<8} {where}")
    return 0
