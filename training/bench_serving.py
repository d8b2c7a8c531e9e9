"""`hearth bench serving`: how fast the family's model answers, and how close that is to the limit.

In one run, on this machine:
- memory read bandwidth (large numpy reads on the decoder's threads, best of several), the
  ceiling of memory-bound decoding;
- the default model unpruned, pruned 30% and pruned 50%, all written by our GGUF export and
  quantised the same way by llama.cpp (q8_0 unless told: what `hearth export` writes for a
  family's trained model, the model the chat serves once it is theirs): time to first token and decode tokens/s (greedy, a fixed
  number of tokens, end-of-sequence ignored);
- transformers `generate` on the same unpruned model (float32, as training and the torch engine
  hold it), the baseline llama.cpp is compared to; all four take turns run by run;
- the memory-bandwidth bound: bandwidth / bytes of weights read per token (every matrix once;
  the tied embedding is read whole as the LM head).

Speed does not depend on which units are pruned, so units are chosen by weight magnitude here;
quality after pruning is measured by `hearth bench pruning`.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any


PAUSE_S = 1.0
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and her cat."}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to measure (default: the bundled default)")
    p.add_argument("--quant", default="q8_0", choices=("f16", "q8_0", "q4_1", "q4_k_m"),
                   help="weight type of every llama.cpp variant (default q8_0, the type a family's trained "
                        "model is exported and served at; q4_1 is the bundled base's)")
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded per run")
    p.add_argument("--runs", type=int, default=5, help="runs per variant, taking turns (the best is reported)")
    p.add_argument("--threads", type=int, default=0, help="threads for both engines (0: every core)")


@dataclass
class DecodeResult:
    variant: str
    engine: str
    weight_bytes: int
    ttft_s: float
    decode_tokens_per_s: float
    bandwidth_bound_tokens_per_s: float
    fraction_of_bandwidth_bound: float
    heads: int
    intermediate_size: int


def measure_bandwidth(threads: int, size_mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory, the best of `repeats` passes over an
    array far larger than any cache, on `threads` threads (the decoder's own count).

    Read-only, because decoding a token reads the weights and writes almost nothing. A copy
    (the STREAM convention, and this benchmark's measure until 2026-12-05) counts read + write
    and reports 15-20% less here: the processor reads each written line before writing it,
    traffic the copy's byte count leaves out. The bound must be the highest rate the memory
    gives, or the fraction of it flatters the decoder."""
    import numpy as np

    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    slices = np.array_split(data, max(1, threads))
    best = float("inf")
    for _ in range(repeats):
        # numpy's sum releases the GIL, so the threads read in parallel.
        workers = [threading.Thread(target=part.sum) for part in slices]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def measure_copy_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large array copy (read + write counted), the best of `repeats`:
    reported beside the read rate only so that runs before 2026-12-05 can be compared."""
    import numpy as np

    src = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of weights read per decoded token: every tensor, except that an untied token
    embedding is only looked up (one row), not read."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def llama_cpp_decoder(llm: Any, prompt: str, tokens: int) -> Callable[[], tuple[float, float]]:
    """One greedy run of `tokens` tokens on a loaded llama.cpp model: (time to first token, decode
    tokens/s). End-of-sequence is ignored, so every run decodes the same number of tokens."""

    def once() -> tuple[float, float]:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        start = time.perf_counter()
        first = last = start
        count = 0
        for _token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            count += 1
            now = time.perf_counter()
            if count == 1:
                first = now
            last = now
            if count == tokens:
                break
        return first - start, (count - 1) / max(last - first, 1e-9)

    return once


def transformers_decoder(model: Any, ids: list[int], tokens: int) -> Callable[[], tuple[float, float]]:
    """One greedy `generate` of `tokens` tokens (EOS ignored): (time to first token, decode tokens/s),
    the first token timed by a separate one-token `generate`."""
    import torch

    input_ids = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=model.config.eos_token_id)

    def once() -> tuple[float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
            total = time.perf_counter() - start
        return ttft, (tokens - 1) / max(total - ttft, 1e-9)

    return once


def take_turns(runners: dict[str, Callable[[], tuple[float, float]]], runs: int) -> dict[str, tuple[float, float]]:
    """name -> (best time to first token, best decode tokens/s) over `runs` rounds in which every
    runner runs once, in turn: whatever else the machine does slows them alike, and the best run
    is the machine's capability rather than its neighbours' load. Round 0 warms up, uncounted."""
    best = {name: (float("inf"), 0.0) for name in runners}
    for round_index in range(runs + 1):
        for name, once in runners.items():
            # A pause between turns: both engines' worker threads spin for a while after their
            # work, and would otherwise take the cores from the next runner.
            time.sleep(PAUSE_S)
            ttft, speed = once()
            if round_index:
                best[name] = (min(best[name][0], ttft), max(best[name][1], speed))
    return best


def run(args: argparse.Namespace) -> dict:
    import torch

    from training.engines import default_threads
    from training.export_gguf import quantize_gguf, tokenizer_pre_name, write_gguf
    from training.model_store import load_torch, resolve
    from training.pruning import magnitude_importance, prune

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    # Other programs competing for the cores distort every figure here: record how busy it was.
    load_before = os.getloadavg()[0]
    bandwidth = measure_bandwidth(threads)
    copy_bandwidth = measure_copy_bandwidth()
    ref = resolve(args.model)
    base, tokenizer = load_torch(ref)
    pre = tokenizer_pre_name(ref)
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    scores = magnitude_importance(base)

    results: list[DecodeResult] = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-serving-") as tmp:
        paths, shapes = {}, {}
        for variant, ratio in (("unpruned", 0.0), ("pruned30", 0.3), ("pruned50", 0.5)):
            model = base if ratio == 0 else copy.deepcopy(base)
            if ratio:
                prune(model, scores, ratio)
            shapes[variant] = (model.config.num_attention_heads, model.config.intermediate_size)
            f16 = Path(tmp) / f"{variant}-f16.gguf"
            write_gguf(model, tokenizer, f16, f"{args.model}-{variant}", "f16", pre)
            paths[variant] = f16
            if args.quant != "f16":
                paths[variant] = Path(tmp) / f"{variant}-{args.quant}.gguf"
                quantize_gguf(f16, paths[variant], args.quant, threads)
                f16.unlink()
            if model is not base:
                del model
        from llama_cpp import Llama

        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        llms = {v: Llama(str(p), n_ctx=512, n_threads=threads, n_batch=512, verbose=False) for v, p in paths.items()}
        try:
            runners = {v: llama_cpp_decoder(llm, prompt, args.tokens) for v, llm in llms.items()}
            runners["transformers"] = transformers_decoder(base, ids, args.tokens)
            timings = take_turns(runners, args.runs)
        finally:
            for llm in llms.values():
                llm.close()
        for variant, path in paths.items():
            weight_bytes = gguf_weight_bytes(path)
            ttft, speed = timings[variant]
            bound = bandwidth / weight_bytes
            results.append(DecodeResult(variant, f"llama.cpp {args.quant}", weight_bytes, ttft, speed, bound,
                                        speed / bound, *shapes[variant]))

    ttft, speed = timings["transformers"]
    torch_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    torch_bound = bandwidth / torch_bytes
    baseline = DecodeResult("unpruned", "transformers float32", torch_bytes, ttft, speed, torch_bound,
                            speed / torch_bound, base.config.num_attention_heads, base.config.intermediate_size)

    by = {r.variant: r for r in results}
    speedup30 = by["pruned30"].decode_tokens_per_s / by["unpruned"].decode_tokens_per_s
    ideal30 = by["unpruned"].weight_bytes / by["pruned30"].weight_bytes
    speedup50 = by["pruned50"].decode_tokens_per_s / by["unpruned"].decode_tokens_per_s
    ideal50 = by["unpruned"].weight_bytes / by["pruned50"].weight_bytes
    return {
        "benchmark": "serving",
        "model": args.model,
        "quant": args.quant,
        "threads": threads,
        "tokens": args.tokens,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "copy_bandwidth_gb_s": round(copy_bandwidth / 1e9, 2),
        "llama_cpp": [_rounded(asdict(r)) for r in results],
        "transformers": _rounded(asdict(baseline)),
        "pruned30_decode_speedup": round(speedup30, 3),
        "pruned30_ideal_speedup": round(ideal30, 3),
        "pruned30_efficiency": round(speedup30 / ideal30, 3),
        "pruned50_decode_speedup": round(speedup50, 3),
        "pruned50_ideal_speedup": round(ideal50, 3),
        "pruned50_efficiency": round(speedup50 / ideal50, 3),
        "llamacpp_vs_transformers": round(by["unpruned"].decode_tokens_per_s / baseline.decode_tokens_per_s, 2),
        "fraction_of_bandwidth_bound": round(by["unpruned"].fraction_of_bandwidth_bound, 3),
        "targets": {"pruned30_efficiency": 0.9, "llamacpp_vs_transformers": 5.0, "fraction_of_bandwidth_bound": 0.5},
    }


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
