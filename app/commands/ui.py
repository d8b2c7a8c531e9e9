"""`hearth` with no command: open the app (app/hearth_app.py) on this device's services."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    return sub.add_parser("app", help="open the app (the same as `hearth` with no command)")


def run(args: argparse.Namespace) -> int:
    from core.locks import device_lock

    # Before anything loads: a second window on the same device is refused in a line at once.
    with device_lock("the app"):
        from app.hearth_app import HearthApp
        from app.services import build_services

        services = build_services()
        app = HearthApp(services)
        app.run()
        return app.return_code or 0
