"""`hearth prune MODEL --ratio R [--data PATH ...] --out NAME`: a smaller model, heads and channels removed.

The result is a personalised model (plain safetensors + config) that transformers loads with no
custom code. It answers poorly until trained again: `hearth train --model NAME` trains on it (the
recovery), and `hearth export` of that model merges it into a GGUF for llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="remove attention heads and MLP channels (structured pruning)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="model to prune (catalog name, personalised model, .gguf or folder)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of heads and channels to remove, e.g. 0.3")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="calibration data (JSONL or notes folder; repeatable); without it, weight magnitudes decide")
    p.add_argument("--out", required=True, help="name of the pruned model")
    p.add_argument("--granularity", choices=("query", "group"), default="query",
                   help="query heads within KV groups (default) or whole KV groups")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from app.commands.models import fetch
    from training.model_store import check_model_name
    from training.pruning import prune_to_store

    check_model_name(args.out)   # before a download that a bad name would waste
    fetch(args.model)
    result = prune_to_store(args.model, args.ratio, args.out, [Path(d) for d in args.data or []], args.granularity)
    summary = {
        "name": result.name,
        "path": str(result.folder),
        "heads_removed": round(result.plan.head_ratio, 4),
        "channels_removed": round(result.plan.channel_ratio, 4),
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"pruned {args.model} -> {result.name}: {summary['heads_removed']:.0%} of heads, "
              f"{summary['channels_removed']:.0%} of MLP channels removed, "
              f"{result.parameters_before / 1e6:.1f}M -> {result.parameters_after / 1e6:.1f}M parameters")
        print(result.folder)
    # Measured on SmolLM2, 30%: pruned alone it babbles; 75 LoRA steps on 300 Dolly answers
    # bring "Paris" back (docs/serving.md). Weight magnitudes (no --data) keep much less.
    how = "" if args.data else " (chosen by weight size: --data with your notes keeps more)"
    print(f"note: a pruned model answers poorly until trained again{how}; train it on your data: "
          f"hearth train --model {result.name} --method lora --data PATH --out NAME", file=sys.stderr)
    return 0
