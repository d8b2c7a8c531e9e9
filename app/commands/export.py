"""`hearth export MODEL --gguf [--quant q8_0|f16|f32|q4_k_m|q4_1] [--output PATH]`: one GGUF file for llama.cpp.

Adapters are merged into the weights first; models with parallel adapters (PAC) cannot be merged
and are refused (they chat through the torch engine). Prints the file's path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a model as a GGUF file (merged, quantised by llama.cpp)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="model to export (personalised model, catalog name, folder or GGUF file)")
    p.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the only format so far)")
    # No default here: training.export_gguf.DEFAULT_QUANT is the one (importing it would make
    # every `hearth` command load numpy).
    p.add_argument("--quant", choices=("f16", "f32", "q8_0", "q4_k_m", "q4_1"),
                   help="weight type (default q8_0: keeps what training taught at half f16's size; "
                        "quantised by llama.cpp's own quantiser)")
    p.add_argument("--output", help="file to write (default: in the data dir)")
    return p


def run(args: argparse.Namespace) -> int:
    from app.commands.models import fetch
    from training.export_gguf import DEFAULT_QUANT, export_model

    fetch(args.model)
    result = export_model(args.model, args.quant or DEFAULT_QUANT, Path(args.output) if args.output else None)
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    print(result.path)
    return 0
