"""`hearth pair DEVICE`: pair with a device (name, id prefix, or HOST:PORT).

Shows the 6-digit code; the other device's person accepts if theirs matches. Unless --yes, this
side confirms too (y/N read from stdin, so scripts can answer). Exit 0 when paired, 1 when not.
`--json` prints {"paired", "id", "name", "code", "message"}.
"""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pair", help="pair with a device (shows a code to compare)")
    p.add_argument("device", help="device name, id prefix, or HOST:PORT")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS", help="how long to look for it (default 5)")
    p.add_argument("--yes", action="store_true", help="do not ask to confirm the code on this side")
    p.add_argument("--interface", action="append", metavar="ADDRESS", help="IPv4 address to use (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    return p


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import threading

    from mesh.pairing import PAIRING_EXPIRY_S
    from mesh.service import MeshService

    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    with MeshService(interfaces=args.interface) as service:
        if ":" not in args.device:
            service.wait_for(args.device, args.wait)
        pairing = service.pair(args.device, confirm_locally=not args.yes)
        pairing.code_ready.wait(30)
        if pairing.code:
            say(f"Pairing with {pairing.peer_name or args.device}")
            say(f"Code: {pairing.code}")
            say("Accept on the other device if it shows the same code.")
            if not args.yes:
                say("Does the other device show the same code? [y/N]")

                def confirm() -> None:
                    line = sys.stdin.readline()
                    (pairing.accept if line.strip().lower() in ("y", "yes") else pairing.reject)()

                threading.Thread(target=confirm, daemon=True).start()
        result = pairing.wait(PAIRING_EXPIRY_S * 2 + 30)
    if args.json:
        device = result.device
        print(json.dumps({"paired": result.paired, "id": device.device_id if device else pairing.peer_id or None,
                          "name": device.name if device else pairing.peer_name or None, "code": pairing.code,
                          "message": result.message}, indent=2))
    elif result.paired:
        print(f"Paired with {result.device.name} ({result.device.device_id[:7]}).")
    else:
        print(f"Not paired: {result.message}", file=sys.stderr)
    return 0 if result.paired else 1
