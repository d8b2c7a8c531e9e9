"""`hearth bench training`: PAC against PEFT LoRA and full fine-tuning, side by side in one run.

Every method trains the default model on the same data (the household facts plus a per-intent
subset of CLINC150, as one chat JSONL) for the same epochs, each in its own subprocess so that its
peak resident memory is its own. Methods: PAC with the activation cache, PAC without it, PAC with
the cache on an NF4 backbone, PAC with the cache but without the anchor (training/anchor.py: what
it costs, and what it keeps), LoRA r=8 on q,v, LoRA r=16 on all linear layers, and full
fine-tuning (only `--full-steps` steps, its time extrapolated to all epochs and flagged so).

Per method: end-to-end training wall time (after the model is loaded, cache filling included),
time per epoch, peak resident memory while training (the high-water mark is reset after loading,
so the load is excluded; the load's own peak and the whole-process peak, the memory a device
needs, are reported too), final training loss, household recall (paraphrased questions, greedy),
general recall before and after (`assets/eval/general_questions.jsonl`, greedy: what personalising
costs in what the base knew) and CLINC150 intent accuracy on held-out `val` rows (intent names
generated as text). Ratios: `speedup_vs_lora` (faster LoRA's wall / PAC-with-cache's),
`memory_ratio_vs_lora` (PAC NF4 training peak / the smaller LoRA training peak). For PAC with the cache, chat speed as the torch engine serves it:
decode tokens/s in float32 and, where the processor has native bfloat16, in bfloat16
(`chat_bf16_speedup`), with household recall in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import HearthError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLINC_PROMPT = "Which intent is this request? {text}"


@dataclass
class Method:
    key: str
    title: str
    method: str
    quant: str = "none"
    cache: bool = True
    lora_rank: int = 16
    lora_targets: str = "all-linear"
    anchor: float | None = None    # PAC: the anchor's weight (training/anchor.py); None: the product's


METHODS = [
    Method("pac_cache", "PAC + cache", "pac"),
    Method("pac_no_cache", "PAC, no cache", "pac", cache=False),
    Method("pac_nf4_cache", "PAC + cache, NF4 backbone", "pac", quant="nf4"),
    Method("pac_cache_no_anchor", "PAC + cache, no anchor", "pac", anchor=0.0),
    Method("lora_r8_qv", "LoRA r=8 q,v", "lora", lora_rank=8, lora_targets="q_proj,v_proj"),
    Method("lora_r16_all", "LoRA r=16 all linear", "lora", lora_rank=16),
    Method("full", "full fine-tuning", "full"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for every method (at least 3)")
    parser.add_argument("--clinc-intents", type=int, default=10, help="CLINC150 intents in the subset")
    parser.add_argument("--clinc-train", type=int, default=6, help="training rows per intent")
    parser.add_argument("--clinc-eval", type=int, default=10, help="held-out val rows per intent")
    parser.add_argument("--full-steps", type=int, default=6, help="steps full fine-tuning really runs")
    parser.add_argument("--methods", default=",".join(m.key for m in METHODS), help="comma-separated subset")
    parser.add_argument("--data-dir", default=str(SHARED / "data"), help="the shared data folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per method (default 2)")
    parser.add_argument("--pac-lr", type=float, help="peak learning rate of the PAC methods (default: the product's)")
    parser.add_argument("--lora-lr", type=float, help="peak learning rate of the LoRA methods (default: the product's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="every method's job seed: initialisation and batch order (default 0)")
    parser.add_argument("--plot", help="write a PNG of time and memory per method")


def run(args: argparse.Namespace) -> dict:
    if args.epochs < 3:
        raise HearthError("--epochs: the benchmark runs at least 3 epochs")
    data_dir = Path(args.data_dir)
    by_key = {m.key: m for m in METHODS}
    wanted = [by_key[k] for k in args.methods.split(",") if k in by_key]  # in the order asked
    if not wanted:
        raise HearthError(f"--methods: none of {args.methods} (choose from {', '.join(m.key for m in METHODS)})")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hearth-bench-training-") as tmp:
        work = Path(tmp)
        train_file, eval_file, counts = build_data(data_dir, work, args.clinc_intents, args.clinc_train,
                                                   args.clinc_eval)
        results = {}
        for i, method in enumerate(wanted):
            print(f"[bench training] {method.title} ...", file=sys.stderr, flush=True)
            config = {"method": asdict(method), "model": args.model, "epochs": args.epochs,
                      "train_file": str(train_file), "eval_file": str(eval_file),
                      "household_eval": str(data_dir / "household" / "eval.jsonl"),
                      "full_steps": args.full_steps, "eval_before": i == 0,
                      # its own: two methods on one backbone would share the activation cache
                      "home": str(work / "home" / method.key),
                      "threads": args.threads, "pac_lr": args.pac_lr,
                      "lora_lr": args.lora_lr, "seed": args.seed}
            results[method.key] = _run_worker(config, work / f"{method.key}.json")
            print(f"[bench training] {method.key}: {json.dumps(results[method.key])}", file=sys.stderr, flush=True)
    report = summarise(results, args, counts)
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    # The machine may be shared: the 1-minute load average says how contended the run was.
    report["load_average_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    if args.plot:
        plot(report, Path(args.plot))
    return report


def build_data(data_dir: Path, work: Path, intents: int, per_train: int, per_eval: int):
    """One chat JSONL: the household facts + a CLINC150 subset; and the held-out CLINC rows."""
    household = (data_dir / "household" / "train.jsonl").read_text("utf-8").splitlines()
    clinc = json.loads((data_dir / "clinc150" / "clinc150_train_val.json").read_text("utf-8"))
    names = sorted({intent for _, intent in clinc["train"]})
    chosen = random.Random(0).sample(names, min(intents, len(names)))
    eval_rows = []
    lines = [line for line in household if line.strip()]
    for intent in chosen:
        eval_rows += [[t, intent] for t, i in clinc["val"] if i == intent][:per_eval]
        for text in [t for t, i in clinc["train"] if i == intent][:per_train]:
            lines.append(json.dumps({"prompt": CLINC_PROMPT.format(text=text), "response": intent}))
    random.Random(1).shuffle(lines)
    train_file, eval_file = work / "train.jsonl", work / "clinc_eval.json"
    train_file.write_text("\n".join(lines) + "\n", "utf-8")
    eval_file.write_text(json.dumps(eval_rows), "utf-8")
    return train_file, eval_file, {"train_samples": len(lines), "household_train": len(household),
                                   "clinc_intents": len(chosen), "clinc_train": len(lines) - len(household),
                                   "clinc_eval": len(eval_rows)}


def _run_worker(config: dict, result_file: Path) -> dict:
    env = dict(os.environ, HEARTH_HOME=config["home"])
    command = [sys.executable, "-m", "training.bench_training", json.dumps(config), str(result_file)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not result_file.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker failed ({done.returncode}): {tail[:300]}"}
    return json.loads(result_file.read_text("utf-8"))


def general_questions() -> list[tuple[str, str]]:
    """General questions of our own that the base model mostly answers (`assets/eval`): what a
    method's personalisation costs in general knowledge."""
    from importlib import resources

    from training.evaluate import read_fact_questions

    with resources.as_file(resources.files("assets").joinpath("eval/general_questions.jsonl")) as path:
        return read_fact_questions(path)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak seen after it is training's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(config: dict, result_file: Path) -> None:
    """One method in its own process: load, train, evaluate, write the result JSON."""
    import torch

    from training.evaluate import fact_recall, intent_accuracy, read_fact_questions
    from training.job import JobSpec
    from training.torch_engine import PersonalLM
    from training.trainer import load_backbone, train

    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    method = Method(**config["method"])
    t0 = time.perf_counter()
    backbone = load_backbone(config["model"], method.quant)
    load_s = time.perf_counter() - t0
    load_peak = _vm_hwm_mb()   # before the reset below: what loading alone needed
    questions = read_fact_questions(Path(config["household_eval"]))
    general = general_questions()
    clinc_rows = [(CLINC_PROMPT.format(text=t), i) for t, i in json.loads(Path(config["eval_file"]).read_text())]
    out: dict = {"title": method.title, "load_s": round(load_s, 1)}
    if config["eval_before"]:
        base = PersonalLM(backbone.model, backbone.tokenizer)
        out["household_recall_before"] = fact_recall(base, questions).hits
        out["general_recall_before"] = fact_recall(base, general).hits
        out["clinc_accuracy_before"] = intent_accuracy(base, clinc_rows).rate
    targets: list[str] | str = method.lora_targets.split(",") if "," in method.lora_targets else method.lora_targets
    spec = JobSpec(name=f"bench-{method.key}", data=[config["train_file"]], model=config["model"],
                   method=method.method, epochs=config["epochs"], quant=method.quant, cache=method.cache,
                   lr={"pac": config.get("pac_lr"), "lora": config.get("lora_lr")}.get(method.method),
                   lora_rank=method.lora_rank, lora_targets=targets, seed=int(config.get("seed", 0)),
                   max_steps=config["full_steps"] if method.method == "full" else None,
                   **({"anchor": method.anchor} if method.anchor is not None else {}))
    reset = _reset_peak_rss()
    result = train(spec, backbone=backbone, save=False, checkpoint_every_s=1e9)
    train_peak = _vm_hwm_mb() if reset else None
    out["peak_rss_train_mb"] = round(train_peak, 1) if train_peak is not None else None
    out["peak_rss_load_mb"] = round(load_peak, 1) if load_peak is not None else None
    # The reset clears ru_maxrss as well, so the whole process's peak is the larger of the two.
    peaks = [p for p in (load_peak, train_peak) if p is not None]
    out["peak_rss_process_mb"] = round(max(peaks), 1) if peaks else round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    full_steps = result.steps_per_epoch * spec.epochs
    ran = len(result.losses)
    out["steps_run"] = ran
    out["steps_per_epoch"] = result.steps_per_epoch
    out["extrapolated"] = ran < full_steps
    out["wall_s"] = round(result.wall_s * full_steps / ran, 2) if ran else None
    out["epoch_s"] = ([round(s, 2) for s in result.epoch_s] if not out["extrapolated"]
                      else [round(result.wall_s / ran * result.steps_per_epoch, 2)] * spec.epochs)
    out["cache_fill_s"] = round(result.cache_s, 2)
    out["final_loss"] = round(result.final_loss, 4) if result.final_loss is not None else None
    out["trainable_parameters"] = result.trainable_parameters
    out["peak_lr"] = spec.learning_rate   # decayed to zero over the job (job.scheduled_lr)
    module = result.module
    if method.method == "pac":
        lm = PersonalLM(backbone.model, backbone.tokenizer, module)
    else:
        module.eval()
        lm = PersonalLM(module, backbone.tokenizer)
    out["household_recall_after"] = fact_recall(lm, questions).hits
    out["household_questions"] = len(questions)
    out["general_recall_after"] = fact_recall(lm, general).hits
    out["general_questions"] = len(general)
    out["clinc_accuracy"] = round(intent_accuracy(lm, clinc_rows).rate, 4)
    if method.key == "pac_cache":
        out.update(_chat_speed(lm, questions))
    result_file.write_text(json.dumps(out), "utf-8")


CHAT_TOKENS = 96
CHAT_PROMPT = "Tell me a long story about the house, the garden and the family."


def _chat_speed(lm, questions) -> dict:
    """Chat with the trained PAC model as the torch engine serves it: decode tokens/s in float32,
    then with the backbone in bfloat16 where the processor computes it natively (what
    `torch_engine.open_personal_lm` does), and household recall in bfloat16."""
    import torch

    from training.engines import ChatMessage, SamplingSettings
    from training.evaluate import fact_recall
    from training.torch_engine import native_bf16

    def rate() -> float:
        settings = SamplingSettings(temperature=0.7, repeat_penalty=1.0, max_tokens=CHAT_TOKENS, seed=3)
        prompt = lm.prompt_ids([ChatMessage("user", CHAT_PROMPT)])
        best = 0.0
        for _ in range(2):                     # the better of two: the first warms the caches
            tokens, start = 0, None
            for _token in lm.generate(prompt, settings):
                start = start or time.perf_counter()
                tokens += 1
            if tokens > 1:
                best = max(best, (tokens - 1) / (time.perf_counter() - start))
        return round(best, 1)

    out = {"chat_decode_tokens_per_s_float32": rate(), "chat_bf16_native": native_bf16()}
    if out["chat_bf16_native"]:
        lm.model.to(torch.bfloat16)
        out["chat_decode_tokens_per_s_bfloat16"] = rate()
        out["chat_bf16_speedup"] = round(out["chat_decode_tokens_per_s_bfloat16"]
                                         / out["chat_decode_tokens_per_s_float32"], 2)
        out["household_recall_after_bfloat16"] = fact_recall(lm, questions).hits
    return out


def summarise(results: dict, args: argparse.Namespace, counts: dict) -> dict:
    before = next((r for r in results.values() if "household_recall_before" in r), {})
    for r in results.values():
        if before and "error" not in r:
            r.setdefault("household_recall_before", before.get("household_recall_before"))
            r.setdefault("general_recall_before", before.get("general_recall_before"))
    report: dict = {"model": args.model, "epochs": args.epochs, "seed": args.seed, "data": counts,
                    "threads": args.threads, "cpus": os.cpu_count(), "methods": results}
    pac = results.get("pac_cache", {})
    loras = [results[k] for k in ("lora_r8_qv", "lora_r16_all") if k in results and "error" not in results[k]]
    if pac.get("wall_s") and loras:
        faster = min(loras, key=lambda r: r["wall_s"])
        report["speedup_vs_lora"] = round(faster["wall_s"] / pac["wall_s"], 2)
        report["speedup_baseline"] = faster["title"]
        best = max(r["clinc_accuracy"] for r in loras)
        report["clinc_accuracy_gap_vs_lora_points"] = round(100 * (best - pac["clinc_accuracy"]), 1)
        # The technique's own speed: PAC + cache without the anchor (training/anchor.py), which
        # the default job adds to keep general knowledge.
        free = results.get("pac_cache_no_anchor", {})
        if free.get("wall_s"):
            report["speedup_vs_lora_without_anchor"] = round(faster["wall_s"] / free["wall_s"], 2)
    nf4 = results.get("pac_nf4_cache", {})
    lora_peaks = [r["peak_rss_train_mb"] for r in loras if r.get("peak_rss_train_mb")]
    if nf4.get("peak_rss_train_mb") and lora_peaks:
        report["memory_ratio_vs_lora"] = round(nf4["peak_rss_train_mb"] / min(lora_peaks), 3)
    report["targets"] = {"speedup_vs_lora": ">= 5", "memory_ratio_vs_lora": "<= 0.5",
                         "clinc_accuracy_gap_vs_lora_points": "<= 2"}
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["title"], r) for r in report["methods"].values() if "error" not in r]
    titles = [t for t, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    walls = [r["wall_s"] for _, r in rows]
    bars = left.barh(titles, walls, color=["#d95f02" if r["extrapolated"] else "#1b9e77" for _, r in rows])
    left.bar_label(bars, fmt="%.0f s")
    left.set_xlabel(f"training wall time, {report['epochs']} epochs (s; orange: extrapolated)")
    mems = [r["peak_rss_train_mb"] or 0 for _, r in rows]
    bars = right.barh(titles, mems, color="#7570b3")
    right.bar_label(bars, fmt="%.0f MB")
    right.set_xlabel("peak resident memory while training (MB)")
    right.set_yticklabels([])
    fig.suptitle(f"hearth bench training: {report['model']}, {report['data']['train_samples']} samples; "
                 f"PAC speed-up {report.get('speedup_vs_lora', '?')}x, memory ratio {report.get('memory_ratio_vs_lora', '?')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from core.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]), Path(sys.argv[2]))
