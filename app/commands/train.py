"""`hearth train`: personalise a model on your own data (PAC side chain or PEFT LoRA).

With --federated --devices, the family's devices train on their own data instead (FedSpine; see
train_federated.py and docs/federated.md): no data leaves any device.

A progress bar on a terminal; with --json, one JSON object per line (phase, step, total_steps,
epoch, loss, samples_per_s, eta_s), the last one with phase "done". After a crash or a kill,
the same command with --resume carries on from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import threading

from training.job_defaults import DEFAULT_EPOCHS, DEFAULT_LR, QUANT_MODES


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="personalise a model on your data (PAC or LoRA)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", metavar="PATH",
                   help="JSONL of chats (messages), prompt/response pairs or '### Human:' text; or a folder of .txt/.md "
                        "notes. Repeatable: the model learns every source together (a model retrained on one forgets the other)")
    p.add_argument("--method", choices=["pac", "lora"], default="pac",
                   help="pac: parallel adapters with an activation cache (fast); lora: PEFT LoRA (mergeable)")
    p.add_argument("--model", default=None,
                   help="base model (default: the catalog's default); a pruned model (hearth prune) trains as its recovery")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default: {pac} for pac, {lora} for lora)".format(**DEFAULT_EPOCHS))
    p.add_argument("--out", "--name", dest="out", required=True,
                   help="name of the personalised model (see `hearth models list`)")
    p.add_argument("--quant", choices=QUANT_MODES, default="none",
                   help="load the frozen backbone quantised (bitsandbytes) to save memory")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, decayed to zero over the job (default: {pac:g} pac, {lora:g} lora)".format(**DEFAULT_LR))
    p.add_argument("--batch-size", type=int, default=4, help="samples per step (default 4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, all linear layers)")
    p.add_argument("--no-cache", action="store_true", help="PAC: run the backbone every epoch instead of caching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted job with the same --out")
    p.add_argument("--json", action="store_true", help="JSON progress events, one per line")
    p.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                   help="checkpoint at least this often (and at every epoch's end); default 30")
    p.add_argument("--devices", metavar="all|NAME,...",
                   help="pooled training (PAC): also use these paired devices (see docs/pooled.md)")
    p.add_argument("--interface", action="append", metavar="ADDRESS",
                   help="with --devices: IPv4 address to find devices on (repeatable; default: all)")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="with --devices: how long to look for the devices (default 5)")
    fed = p.add_argument_group("federated training (--federated --devices ...; docs/federated.md)")
    fed.add_argument("--federated", action="store_true",
                     help="each device trains on its own data (`hearth worker --data`); only adapter updates travel")
    fed.add_argument("--rounds", type=int, default=8, help="federated rounds (default 8)")
    fed.add_argument("--sparsity", type=float, default=0.3,
                     help="fraction of attention heads and MLP channels pruned from the family model (default 0.3)")
    fed.add_argument("--local-steps", type=int, default=10, help="LoRA steps per device per round (default 10)")
    fed.add_argument("--quorum", type=float, default=1.0,
                     help="a round closes once this fraction of its devices answered (default 1: all)")
    fed.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                     help="a round closes this long after it opens at the latest (default: none)")
    return p


def run(args: argparse.Namespace) -> int:
    from core.errors import HearthError
    from training.model_store import check_model_name

    check_model_name(args.out)
    if args.resume:
        from core.paths import hearth_paths

        # A mistyped name must not quietly start a new job (a job dir without a checkpoint yet,
        # from a crash in its first minute, does start over: nothing was lost).
        if not (hearth_paths().jobs_dir / args.out).is_dir():
            raise HearthError(f"--resume: no interrupted job named {args.out}; run without --resume to start it")
    if args.federated:
        from app.commands.train_federated import run_federated

        report = _JsonReport() if args.json else _BarReport()
        try:
            return run_federated(args, report)
        finally:
            report.close()
    if not args.data:
        raise HearthError("--data is required (except with --federated, where each device brings its own)")
    from app.commands.models import fetch
    from training.catalog import DEFAULT_MODEL
    from training.data import source_path
    from training.job import JobSpec
    from training.trainer import train

    spec = JobSpec(
        name=args.out, data=[str(source_path(d)) for d in args.data], model=args.model or DEFAULT_MODEL, method=args.method,
        epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.method],
        quant=args.quant, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        cache=not args.no_cache, lora_rank=args.rank,
    )
    fetch(spec.model)
    report = _JsonReport() if args.json else _BarReport()
    try:
        if args.devices:
            from app.commands.train_pooled import run_pooled

            result = run_pooled(args, spec, report)
        else:
            result = train(spec, resume=args.resume, on_event=report, checkpoint_every_s=args.checkpoint_every)
    finally:
        report.close()
    if not args.json:
        loss = f"{result.final_loss:.3f}" if result.final_loss is not None else "?"
        print(f"Trained {spec.name} ({spec.method}, {result.steps} steps, final loss {loss}) in "
              f"{result.wall_s:.0f} s: chat with `hearth chat --model {spec.name}`", file=sys.stderr)
    return 0


class _JsonReport:
    """One JSON line per event. Pooled and federated jobs report from several threads at once
    (the base model goes to every device in parallel): one write per line, under a lock, or two
    events could share a line (`print` writes the text and its newline separately)."""

    def __init__(self):
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            sys.stdout.write(event.to_json() + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        pass


class _BarReport:
    """tqdm on a terminal; a line per epoch otherwise."""

    def __init__(self):
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.last_epoch = 0
        self._lock = threading.Lock()   # events come from several threads in pooled and federated jobs

    def __call__(self, event) -> None:
        with self._lock:
            self._report(event)

    def _report(self, event) -> None:
        if event.phase in ("load", "cache"):
            print(event.message, file=sys.stderr, flush=True)
            return
        if event.phase == "devices":      # pooled and federated: a device left, rejoined, ...
            print(event.message, file=sys.stderr, flush=True)
            return
        if event.phase != "train":
            return
        # A federated round that no device finished has no loss.
        loss = f"{event.loss:.3f}" if event.loss is not None else "?"
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event.total_steps, initial=event.step - 1, unit="step", file=sys.stderr)
            self.bar.update(1)
            self.bar.set_postfix(epoch=event.epoch, loss=loss)
        elif event.epoch != self.last_epoch and event.step % max(1, event.total_steps // 20) == 0:
            print(f"step {event.step}/{event.total_steps} epoch {event.epoch} loss {loss}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
