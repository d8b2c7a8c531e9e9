"""`hearth models`: the base models of the catalog and the personalised ones."""

from __future__ import annotations

import argparse
import json


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="base and personalised models")
    actions = p.add_subparsers(dest="models_action", metavar="ACTION")
    ls = actions.add_parser("list", help="list the models (the default)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    pull = actions.add_parser("pull", help="download a catalog model or hub id into the cache")
    pull.add_argument("model")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if getattr(args, "models_action", None) == "pull":
        return _pull(args.model)
    return _list(bool(getattr(args, "json", False)))


def model_rows() -> list[dict]:
    """One row per model: the stable shape of `hearth models list --json`."""
    from training.catalog import DEFAULT_MODEL
    from training.model_store import list_models

    rows = []
    for m in list_models():
        if m.catalog is not None:
            entry = m.catalog
            rows.append({
                "name": entry.name,
                "type": "base",
                "title": entry.title,
                "parameters": entry.parameters,
                "size_mb": entry.size_mb,
                "license": entry.license,
                "min_memory_gb": entry.min_memory_gb,
                "hub_id": entry.hub_id,
                "available": m.available,
                "path": str(m.path) if m.path else None,
                "default": entry.name == DEFAULT_MODEL,
            })
        else:
            model = m.personal
            assert model is not None
            rows.append({
                "name": model.name,
                "type": "personal",
                "title": f"{model.method} on {model.base}",
                "base": model.base,
                "method": model.method,
                "format": model.format,
                "parameters": model.parameters,
                "pruning_ratio": model.pruning_ratio,
                "created": model.created,
                "available": m.available,       # adapters whose base has gone cannot run
                "base_of": m.base_of,           # models that run on it (a pruned base)
            })
    return rows


def _list(as_json: bool) -> int:
    rows = model_rows()
    if as_json:
        print(json.dumps({"models": rows}, indent=2))
        return 0
    print(f"{'NAME':<22} {'TYPE':<9} {'PARAMS':>7} {'STATE':<12} DETAILS")
    for row in rows:
        if row["type"] == "base":
            state = "ready" if row["available"] else "downloadable"
            params = row["parameters"]
            details = f"{row['title']}, {row['size_mb']} MB, needs {row['min_memory_gb']:g} GB, {row['license']}"
            if row["default"]:
                details += " (default)"
        else:
            state = "ready" if row["available"] else "base missing"
            params = f"{row['parameters'] / 1e6:.0f}M" if row["parameters"] else "?"
            details = f"{row['method']} on {row['base']}"
            if row["pruning_ratio"]:
                details += f", pruned {row['pruning_ratio']:.0%}"
            if row["base_of"]:
                details += f", base of {', '.join(row['base_of'])}"
        print(f"{row['name']:<22} {row['type']:<9} {params:>7} {state:<12} {details}")
    return 0


def _pull(model: str) -> int:
    print(fetch(model).path)
    return 0


def fetch(model: str):
    """The ModelRef of `model`, downloaded first if it is a hub model not here yet. Commands call
    it before they load a model, so that Ctrl-C stops a download at once: huggingface_hub
    downloads in worker threads that Python waits for at exit, so a KeyboardInterrupt alone let
    the download run on to its end; and a process killed outright leaves its partial file in the
    cache for ever. While it downloads, SIGINT and SIGTERM delete this run's partial files, say
    so, and leave without waiting for the threads."""
    import os
    import signal
    import sys

    from training.hub import partial_files
    from training.model_store import ensure_local, resolve

    ref = resolve(model)
    if ref.kind != "hub":
        return ref
    hub_id = ref.hub_id or ref.text
    partial_before = partial_files(hub_id)

    def stop(signum, _frame) -> None:
        for path in partial_files(hub_id) - partial_before:
            path.unlink(missing_ok=True)
        # On a line of its own: the progress bar's line is left unfinished.
        print(f"\nhearth: download of {model} stopped (files already complete are kept)",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return ensure_local(ref)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
