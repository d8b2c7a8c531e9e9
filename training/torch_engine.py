"""A torch chat engine for personalised models that have no GGUF: PAC side chains and PEFT LoRA.

PAC generation (ALGORITHMS.md section 1): the frozen backbone keeps its KV cache as usual; for
each new token the tap hooks hand its hidden states to the side chain, which is per token and so
needs no cache of its own; logits = LMHead(FinalNorm(h_L + a_last)). A PEFT model generates
through its own forward with the KV cache.

`PersonalLM` is the model-side part (prompt -> next-token logits, step by step), shared by chat
and by evaluation (`answer`, greedy). `TorchEngine` implements training.engines.ChatEngine:
sampling with temperature / top-p / repeat penalty, streaming text, cancel via threading.Event.

What is not here: chat history, the HTTP API (serving/), llama.cpp (training/engines.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core.errors import HearthError
from training.engines import ChatMessage, ReplyEnd, SamplingSettings, fit_messages, reply_budget

REPEAT_WINDOW = 64  # tokens the repeat penalty looks back over (as llama.cpp does by default)


class PersonalLM:
    """A backbone with an optional PAC side chain (or a PEFT model) that yields next-token logits."""

    def __init__(self, model: Any, tokenizer: Any, chain: Any = None):
        self.model, self.tokenizer, self.chain = model, tokenizer, chain
        stops = {tokenizer.eos_token_id}
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        stops.add(end_of_turn)
        self.stop_ids = {s for s in stops if s is not None}

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt as training rendered it (training.data): the chat template up to the
        generation prompt, tokenised without extra special tokens."""
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def next_logits(self, ids: list[int], past: Any) -> tuple[torch.Tensor, Any]:
        """Feed `ids` after what `past` already holds; the logits after the last one."""
        input_ids = torch.tensor([ids], dtype=torch.long)
        if self.chain is not None:
            from training.parallel_adapters import backbone_taps, head_logits

            taps, past = backbone_taps(self.model, self.chain.config, input_ids, past=past, use_cache=True)
            return head_logits(self.model, self.chain, taps[0, -1]), past
        out = self.model(input_ids=input_ids, cache=past, use_cache=True)
        return out.logits[0, -1].float(), out.cache

    def generate(self, prompt: list[int], settings: SamplingSettings, cancel: threading.Event | None = None,
                 ) -> Iterator[int]:
        """Token ids of the reply, one at a time, until a stop token, max_tokens or cancel."""
        generator = torch.Generator().manual_seed(settings.seed if settings.seed is not None else 0)
        seen = list(prompt)
        logits, past = self.next_logits(prompt, None)
        for _ in range(settings.max_tokens):
            if cancel is not None and cancel.is_set():
                return
            token = sample(logits, seen[-REPEAT_WINDOW:], settings, generator)
            if token in self.stop_ids:
                return
            yield token
            seen.append(token)
            logits, past = self.next_logits([token], past)

    def answer(self, question: str, max_tokens: int = 48) -> str:
        """The greedy reply to one question (for evaluation)."""
        settings = SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens)
        ids = list(self.generate(self.prompt_ids([ChatMessage("user", question)]), settings))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def answers(self, questions: list[str], max_tokens: int = 48, batch_size: int = 16) -> list[str]:
        """Greedy replies to many questions, a batch at a time (left padding; RoPE attention
        depends on relative positions only, so the padding shifts nothing but rounding)."""
        replies: list[str] = []
        for start in range(0, len(questions), batch_size):
            replies.extend(self._greedy_batch(questions[start : start + batch_size], max_tokens))
        return replies

    def _greedy_batch(self, questions: list[str], max_tokens: int) -> list[str]:
        prompts = [self.prompt_ids([ChatMessage("user", q)]) for q in questions]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits, past = self._batch_logits(ids, mask, None)
        for _ in range(max_tokens):
            tokens = torch.argmax(logits, dim=-1)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    if token in self.stop_ids:
                        done[row] = True
                    else:
                        out[row].append(token)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            logits, past = self._batch_logits(tokens[:, None], mask, past)
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]

    def _batch_logits(self, ids: torch.Tensor, mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        if self.chain is not None:
            from training.parallel_adapters import backbone_taps, head_logits

            taps, past = backbone_taps(self.model, self.chain.config, ids, mask, past=past, use_cache=True)
            return head_logits(self.model, self.chain, taps[:, -1]), past
        result = self.model(input_ids=ids, attention_mask=mask, cache=past, use_cache=True)
        return result.logits[:, -1].float(), result.cache


def sample(logits: torch.Tensor, recent: list[int], settings: SamplingSettings, generator: torch.Generator) -> int:
    logits = logits.clone()
    if settings.repeat_penalty and settings.repeat_penalty != 1.0 and recent:
        index = torch.tensor(sorted(set(recent)), dtype=torch.long)
        values = logits[index]
        logits[index] = torch.where(values > 0, values / settings.repeat_penalty, values * settings.repeat_penalty)
    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if 0 < settings.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < settings.top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def open_personal_lm(folder: Path, manifest: Any) -> PersonalLM:
    """Load a personalised model folder (format "pac" or "peft") on its base, for chat.

    A PAC model's float32 backbone runs in bfloat16 where the processor computes it natively
    (AVX512-BF16 or AMX): decoding reads half the bytes per token, about 1.5x faster with the same
    household recall (`hearth bench training --methods pac_cache`, docs/serving.md). Elsewhere
    bfloat16 would be emulated, slower than float32, so the backbone stays float32."""
    from training.model_store import resolve_base
    from training.trainer import load_backbone, load_side_chain

    resolve_base(manifest)     # gone: say which model needs it, before anything loads
    quant = str(manifest.details.get("quant", "none")) if manifest.details else "none"
    backbone = load_backbone(manifest.base, quant)
    if manifest.format == "pac":
        if quant == "none" and native_bf16():
            backbone.model.to(torch.bfloat16)    # the side chain stays float32 (its inputs are cast)
        return PersonalLM(backbone.model, backbone.tokenizer, load_side_chain(folder))
    if manifest.format == "peft":
        from training.lora import load_adapter

        model = load_adapter(backbone.model, folder)
        model.eval()
        return PersonalLM(model, backbone.tokenizer)
    raise HearthError(f"{folder}: the torch engine serves 'pac' and 'peft' models, not '{manifest.format}'")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this processor computes bfloat16 natively (x86 AVX512-BF16 or AMX; Linux tells)."""
    try:
        text = cpuinfo.read_text("utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TorchEngine:
    """training.engines.ChatEngine for a PersonalLM."""

    def __init__(self, lm: PersonalLM, name: str, context_length: int = 2048, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.lm, self.name, self.context_length = lm, name, context_length

    def count_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        return self.lm.prompt_ids(messages)

    def fit_context(self, messages: list[ChatMessage], max_tokens: int) -> list[int]:
        """The newest turns that fit with room for `max_tokens`, forgotten as llama.cpp's engine
        forgets them (`engines.fit_messages`)."""
        return fit_messages(self.prompt_tokens, self.count_tokens, messages, self.context_length - max_tokens)

    def stream(self, messages: list[ChatMessage], settings: SamplingSettings,
               cancel: threading.Event | None = None, end: ReplyEnd | None = None) -> Iterator[str]:
        max_tokens = reply_budget(settings.max_tokens, self.context_length)
        prompt = self.fit_context(messages, max_tokens)
        capped = SamplingSettings(settings.temperature, settings.top_p, settings.repeat_penalty, max_tokens,
                                  settings.seed, list(settings.stop))
        tokens: list[int] = []
        shown = ""
        for token in self.lm.generate(prompt, capped, cancel):
            tokens.append(token)
            text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            for stop in capped.stop:
                cut = text.find(stop)
                if cut >= 0:
                    if cut > len(shown):
                        yield text[len(shown):cut]
                    return
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        if end is not None and len(tokens) >= max_tokens:
            end.finish = "length"

    def close(self) -> None:
        self.lm = None  # type: ignore[assignment]
