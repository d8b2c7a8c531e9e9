"""`hearth bench NAME`: the benchmarks, each side by side with its baseline in one run.

Each benchmark module has `add_arguments(parser)` and `run(args) -> dict`; the dict is printed as
JSON with `--json`, or as indented text. Ratios against the baseline are in the dict.
"""

from __future__ import annotations

import argparse
import importlib
import json

# name -> (module, one-line description). Add a line when a benchmark really runs.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "training": ("training.bench_training", "PAC (cache, no cache, NF4) vs PEFT LoRA vs full fine-tuning: time, memory, accuracy; PAC chat speed, float32 vs bfloat16"),
    "federated": ("training.bench_federated", "FedSpine vs HetLoRA / uniform pruning / random on a simulated fleet"),
    "serving": ("training.bench_serving", "llama.cpp decode: unpruned vs pruned 30%/50% vs transformers, against the bandwidth bound"),
    "pruning": ("training.bench_pruning", "perplexity before pruning, after pruning 30% and after LoRA recovery"),
    "transport": ("mesh.bench_transport", "mesh transport: mutual TLS vs plain TCP, mesh averaging vs gloo all_reduce"),
    "startup": ("app.bench_startup", "time to the app's first frame under a pty, vs a bare Textual app and `hearth --help`"),
    "mesh": ("training.bench_mesh", "pooled PAC training: 1 device vs 2 over a 100 Mbit/s link, predicted vs measured step"),
}


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks, side by side with their baselines")
    names = p.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    for name, (module_name, about) in BENCHMARKS.items():
        # argparse formats help with %: escape it.
        b = names.add_parser(name, help=about.replace("%", "%%"), description=about)
        b.add_argument("--json", action="store_true", help="print the result as JSON")
        b.add_argument("--output", help="also write the JSON result to this file")
        b.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(b)
    return p


def run(args: argparse.Namespace) -> int:
    from core.atomic import atomic_write_text

    module = importlib.import_module(args._bench_module)
    result = module.run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        atomic_write_text(__import__("pathlib").Path(args.output), text + "\n")
    print(text if args.json else _as_text(result))
    return 0


def _as_text(value, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:")
                lines.append(_as_text(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {item}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(_as_text(item, indent) if isinstance(item, (dict, list)) else f"{pad}- {item}" for item in value)
    return f"{pad}{value}"
