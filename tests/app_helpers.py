"""Helpers for the app's tests (tests/test_app_*.py): a private home, the app on real services."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

SIZE = (120, 36)   # every pilot test and snapshot uses this terminal size


def write_config(home: Path, **sections: dict) -> None:
    """A config.toml in `home` (HEARTH_HOME) with these sections."""
    from core.config import _toml_value

    lines = []
    for section, body in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in body.items()]
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text("\n".join(lines) + "\n")


def stories_chat(stories_gguf: Path, **extra) -> dict:
    """[chat] settings for the 260K-parameter stories model: fast, one thread, greedy."""
    return {"model": str(stories_gguf), "threads": 1, "max_tokens": 48, "temperature": 0.0,
            "context_length": 512, **extra}


def make_app(start_mesh: bool = False, devices=None, train_device: str | None = None):
    from app.hearth_app import HearthApp
    from app.services import build_services

    services = build_services(devices=devices)
    if train_device is not None:
        services.train.this_device = train_device
    return HearthApp(services, start_mesh=start_mesh, theme="textual-dark")


async def wait_until(pilot, predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)


async def settle(pilot, app) -> None:
    """Let the workers started so far finish and the screen repaint."""
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
    await asyncio.sleep(0)


def run_async(test):
    """Run an async test function in a fresh event loop (no async plugin needed)."""
    import functools

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper
