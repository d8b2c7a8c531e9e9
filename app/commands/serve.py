"""`hearth serve [--model M] [--port P]`: the OpenAI-compatible chat API for programs on this computer.

Listens on 127.0.0.1 only; every request needs the bearer token of `serve.token` in the config
(made on first serve). A personalised model retrained or exported while it is served is loaded
again before the next reply. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible chat API on 127.0.0.1", description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", help="model to serve (default: chat.model of the config)")
    p.add_argument("--port", type=int, help="port (default: serve.port of the config; 0 = any free port)")
    return p


def run(args: argparse.Namespace) -> int:
    from app.commands.models import fetch
    from core.config import load_config
    from core.errors import HearthError
    from serving.api import ApiSettings, ChatServer, ensure_token
    from serving.reload import Reload
    from training.engines import SamplingSettings, open_engine

    config = load_config()
    chat = config.section("chat")
    port = args.port if args.port is not None else int(config.get("serve.port"))
    if not 0 <= port <= 65535:
        raise HearthError(f"--port must be 0-65535, got {port}")
    token, made = ensure_token()
    model = args.model or chat["model"]
    print(f"Loading {model}...", file=sys.stderr, flush=True)
    fetch(model)

    def note(message: str, loaded: bool) -> None:
        print(message, file=sys.stderr, flush=True)

    reload = Reload(model, lambda: open_engine(model, int(chat["context_length"]), int(chat["threads"])), note)
    engine = reload.open()
    try:
        server = ChatServer(engine, ApiSettings(token, engine.name, port, SamplingSettings.from_config(chat)), reload)
    except OSError as exc:
        engine.close()
        raise HearthError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None
    if made:
        print(f"Made a bearer token and saved it as serve.token in {config.path}: {token}", file=sys.stderr)
    else:
        print(f"Bearer token: serve.token in {config.path}", file=sys.stderr)
    print(f"Serving {engine.name} at {server.url} (OpenAI chat completions). Ctrl-C stops.", file=sys.stderr)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()   # cancels and waits for replies in progress: the engine must outlive them
        server.engine.close()   # the one it serves now (a reload closed the ones before)
    return 0
