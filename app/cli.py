"""The `hearth` command line.

Each sub-command lives in `app/commands/<name>.py` with `register(subparsers)` and `run(args)`.
Modules here import nothing heavy at import time, so `hearth --help` answers at once; torch,
transformers and llama.cpp load inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from app import __version__

# Order is the order of `hearth --help`. Add a module here when its command really works.
COMMAND_MODULES = [
    "app.commands.chat",
    "app.commands.models",
    "app.commands.train",
    "app.commands.prune",
    "app.commands.export",
    "app.commands.serve",
    "app.commands.bench",
    "app.commands.worker",
    "app.commands.devices",
    "app.commands.pair",
    "app.commands.unpair",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth",
        description="Hearth: a private household assistant. Run with no command to open the app.",
    )
    parser.add_argument("--version", action="version", version=f"hearth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        command = module.register(sub)
        command.set_defaults(_run=module.run)
    return parser


def entry() -> None:
    """The `hearth` program (console script and `python -m app`): `main` as a process."""
    from core.paths import keep_private

    keep_private()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    from core.errors import HearthError

    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        run = _default_run
    try:
        code = run(args)
    except HearthError as exc:
        print(f"hearth: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(code or 0)


def _default_run(args: argparse.Namespace) -> int:
    """`hearth` with no command: the app once it exists; until then, chat in the terminal."""
    try:
        app_module = importlib.import_module("app.commands.ui")
    except ModuleNotFoundError:
        from app.commands import chat

        return chat.run(chat.register(argparse.ArgumentParser().add_subparsers()).parse_args([]))
    return app_module.run(args)


if __name__ == "__main__":
    entry()
