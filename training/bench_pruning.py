"""`hearth bench pruning`: what structured pruning costs in quality, and what LoRA recovery wins back.

In one run: perplexity on held-out text (the end of the data file, never trained or calibrated
on) of the default model before pruning, right after pruning (importance from calibration
activations on the start of the file), and after LoRA recovery on the middle of the file, the
recovered adapter merged into the pruned weights as an export would hold them.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly_open_qa" / "open_qa_train.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to prune (default: the bundled default)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL of chats or Guanaco text (default: dolly open QA)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of heads and channels to remove")
    p.add_argument("--steps", type=int, default=60, help="LoRA recovery steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for recovery")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--heldout", type=int, default=64, help="held-out samples (from the end of the file)")
    p.add_argument("--threads", type=int, default=0)


def perplexity(model: Any, batches: list[Any]) -> float:
    """exp of the mean next-token loss over every labelled token of `batches`."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            labels = batch.labels[:, 1:]
            mask = labels != -100
            loss = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
            total += float(loss)
            count += int(mask.sum())
    return math.exp(total / max(count, 1))


def run(args: argparse.Namespace) -> dict:
    import torch

    from training.data import collate, load_examples
    from training.engines import default_threads
    from training.lora import LoraSettings, build_lora_model, lora_step, merge_adapter
    from training.model_store import load_torch, resolve
    from training.pruning import activation_importance, parameter_count, prune

    torch.set_num_threads(args.threads or default_threads())
    torch.manual_seed(0)
    model, tokenizer = load_torch(resolve(args.model))
    examples = load_examples(Path(args.data), tokenizer, 128)
    if len(examples) < args.heldout + 64:
        from core.errors import HearthError

        raise HearthError(f"{args.data}: {len(examples)} samples, too few for calibration, training and held-out")
    pad = tokenizer.pad_token_id
    bs = args.batch_size
    heldout = examples[-args.heldout:]
    calibration = examples[:32]
    training = examples[32:-args.heldout]
    eval_batches = [collate(heldout[i:i + 8], pad) for i in range(0, len(heldout), 8)]

    before = perplexity(model, eval_batches)
    params_before = parameter_count(model)
    start = time.perf_counter()
    scores = activation_importance(model, [vars(collate(calibration[i:i + bs], pad)) for i in range(0, 32, bs)])
    plan = prune(model, scores, args.ratio)
    prune_s = time.perf_counter() - start
    after_pruning = perplexity(model, eval_batches)

    lora = build_lora_model(model, LoraSettings(rank=args.rank))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        index = (step * bs) % max(1, len(training) - bs)
        losses.append(lora_step(lora, optimizer, collate(training[index:index + bs], pad)))
    recovery_s = time.perf_counter() - start
    merged = merge_adapter(lora)
    after_recovery = perplexity(merged, eval_batches)

    return {
        "benchmark": "pruning",
        "model": args.model,
        "data": str(args.data),
        "heldout_samples": len(heldout),
        "requested_ratio": args.ratio,
        "heads_removed": round(plan.head_ratio, 4),
        "channels_removed": round(plan.channel_ratio, 4),
        "parameters_before": params_before,
        "parameters_after": parameter_count(merged),
        "perplexity_before": round(before, 3),
        "perplexity_after_pruning": round(after_pruning, 3),
        "perplexity_after_recovery": round(after_recovery, 3),
        # How much of the perplexity that pruning lost recovery won back (1.0 = all of it).
        "recovered_fraction": round((after_pruning - after_recovery) / max(after_pruning - before, 1e-9), 3),
        "recovery": {"steps": args.steps, "batch_size": bs, "rank": args.rank, "lr": args.lr,
                     "first_loss": round(losses[0], 3) if losses else None,
                     "last_loss": round(losses[-1], 3) if losses else None,
                     "seconds": round(recovery_s, 1)},
        "pruning_seconds": round(prune_s, 1),
    }
