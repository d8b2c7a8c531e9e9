"""Personal training data: files -> tokenised examples whose loss covers the assistant's words only.

Reads four shapes of data:
- a JSONL of chats in OpenAI `messages` form (`{"messages": [{"role": ..., "content": ...}, ...]}`);
- a JSONL of `{"prompt": ..., "response": ...}` pairs;
- a JSONL of Guanaco-style `{"text": "### Human: ... ### Assistant: ..."}`;
- a folder of `.txt` / `.md` notes, chunked into windows for plain causal LM training.

Chats are rendered with the base model's chat template, one message at a time, so that the token
ids of a prompt are exactly the ones the chat engine feeds the model at inference. Labels are -100
everywhere except on assistant replies (and their end-of-turn marker).

A bad line raises a HearthError naming the file and line before anything is trained. This module
never logs or prints the text it reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import HearthError

IGNORE = -100                     # label of a token that carries no loss
NOTE_SUFFIXES = (".txt", ".md")
_GUANACO = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


@dataclass
class Conversation:
    """One chat or one note, before tokenising. `source` is "file:line" for error messages."""

    source: str
    messages: list[dict[str, str]] | None = None   # chats
    text: str | None = None                        # notes (plain text, loss on every token)


@dataclass
class Example:
    """One tokenised training sample."""

    input_ids: list[int]
    labels: list[int]             # IGNORE where no loss is taken
    source: str

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class Batch:
    """Padded tensors for a batch of examples (right padding)."""

    input_ids: Any        # LongTensor [B, T]
    attention_mask: Any   # LongTensor [B, T]
    labels: Any           # LongTensor [B, T]


# --- reading files ---------------------------------------------------------------------------

def read_conversations(path: Path) -> list[Conversation]:
    """Every conversation in `path` (a JSONL file or a folder of notes), or a HearthError."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_notes(path)
    if not path.is_file():
        raise HearthError(f"{path}: no such file or folder")
    if path.suffix.lower() in NOTE_SUFFIXES:
        return _read_note_file(path)
    found = []
    # utf-8-sig: files saved by Windows editors start with a byte-order mark, which is no JSON.
    with open(path, encoding="utf-8-sig", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise HearthError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        found.append(_parse_line(path, number, line))
    if not found:
        raise HearthError(f"{path}: no training examples")
    return found


def source_path(path: str | Path) -> Path:
    """A source as one file or folder, however it was typed ("~/notes", "notes/", a link): how
    jobs, manifests and the config keep it, so that two spellings of one folder compare equal."""
    return Path(path).expanduser().resolve()


def read_sources(paths: Sequence[str | Path]) -> list[Conversation]:
    """Every conversation of every source, in the order given: a job learns from a notes folder
    and the chats taught in the app together (retrained on one of them alone, a model forgets
    the other)."""
    return [conversation for source in read_each_source(paths) for conversation in source]


def read_each_source(paths: Sequence[str | Path]) -> list[list[Conversation]]:
    """The conversations of each source apart. Every source is checked before any is used. A
    source given twice, or a file inside a folder also given, is refused: its text would be
    learnt twice as hard."""
    if not paths:
        raise HearthError("no training data given")
    seen: list[Path] = []
    found = []
    for path in paths:
        resolved = source_path(path)
        for earlier in seen:
            if resolved == earlier:
                raise HearthError(f"{path}: given twice as training data")
            for inner, outer in ((resolved, earlier), (earlier, resolved)):
                if _read_with(inner, outer):
                    raise HearthError(f"{inner}: inside {outer}, which is also given as training data")
        seen.append(resolved)
        found.append(read_conversations(resolved))
    return found


def _read_with(inner: Path, outer: Path) -> bool:
    """Whether reading folder `outer` reads `inner` too (a folder reads its .txt/.md notes only,
    so a JSONL of chats kept among the notes is a source of its own)."""
    if not outer.is_dir() or not inner.is_relative_to(outer):
        return False
    return inner.is_dir() or inner.suffix.lower() in NOTE_SUFFIXES


def _parse_line(path: Path, number: int, line: str) -> Conversation:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise HearthError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise HearthError(f"{where}: expected a JSON object")
    if "messages" in record:
        return Conversation(where, messages=_check_messages(where, record["messages"]))
    if "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HearthError(f"{where}: field 'prompt' must be a non-empty string")
        if not isinstance(response, str) or not response.strip():
            raise HearthError(f"{where}: field 'response' must be a non-empty string")
        return Conversation(where, messages=[
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise HearthError(f"{where}: field 'text' must be a string")
        return Conversation(where, messages=_split_guanaco(where, text))
    raise HearthError(f"{where}: expected a 'messages', 'prompt'/'response' or 'text' field")


def _check_messages(where: str, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise HearthError(f"{where}: field 'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise HearthError(f"{where}: messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise HearthError(f"{where}: messages[{i}].role must be system, user or assistant")
        if not isinstance(content, str):
            raise HearthError(f"{where}: messages[{i}].content must be a string")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise HearthError(f"{where}: no assistant message to learn from")
    return checked


def _split_guanaco(where: str, text: str) -> list[dict[str, str]]:
    parts = _GUANACO.split(text)
    # parts = [before, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise HearthError(f"{where}: 'text' must look like '### Human: ... ### Assistant: ...'")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role.lower() == "human" else "assistant",
                         "content": content.strip()})
    return _check_messages(where, messages)


def _read_notes(folder: Path) -> list[Conversation]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in NOTE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise HearthError(f"{folder}: no .txt or .md notes in this folder")
    found = []
    for file in files:
        found.extend(_read_note_file(file))
    return found


def _read_note_file(path: Path) -> list[Conversation]:
    try:
        text = path.read_text("utf-8-sig")     # a byte-order mark is no part of the note
    except UnicodeDecodeError as exc:
        # Named with what to do: one old note in another encoding stops a whole folder.
        raise HearthError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8, "
                          "or move it out of the folder") from None
    except OSError as exc:
        raise HearthError(f"{path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        return []
    return [Conversation(f"{path}:1", text=text)]


# --- tokenising ------------------------------------------------------------------------------

def tokenize(conversations: list[Conversation], tokenizer: Any, max_length: int = 512) -> list[Example]:
    """Tokenise with the tokenizer's chat template; loss on assistant tokens only.

    Chats longer than `max_length` tokens are cut at the end; notes are split into windows of
    `max_length` tokens (loss on every token).
    """
    if getattr(tokenizer, "chat_template", None) is None and any(c.messages for c in conversations):
        raise HearthError("the base model's tokenizer has no chat template: train it on notes, not chats")
    examples: list[Example] = []
    for conv in conversations:
        if conv.messages is not None:
            example = _tokenize_chat(conv, tokenizer, max_length)
            if example.trained_tokens:
                examples.append(example)
        elif conv.text is not None:
            examples.extend(_tokenize_note(conv, tokenizer, max_length))
    if not examples:
        files = dict.fromkeys(c.source.rsplit(":", 1)[0] for c in conversations)
        raise HearthError(f"{', '.join(files) or 'the data'}: nothing to learn (every answer is empty or starts "
                          f"after the first {max_length} tokens of its chat)")
    return examples


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize_chat(conv: Conversation, tokenizer: Any, max_length: int) -> Example:
    """Render message by message; each new piece of text is tokenised on its own, which is how the
    chat engine sees a prompt (rendered up to the generation prompt) before the reply."""
    assert conv.messages is not None
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(conv.messages):
        if message["role"] == "assistant":
            prompt = _render(tokenizer, conv.messages[:i], True) if i else ""
            _extend(ids, labels, tokenizer, _new_text(conv, done, prompt), train=False)
            done = prompt
        full = _render(tokenizer, conv.messages[: i + 1], False)
        _extend(ids, labels, tokenizer, _new_text(conv, done, full), train=message["role"] == "assistant")
        done = full
    return Example(ids[:max_length], labels[:max_length], conv.source)


def _new_text(conv: Conversation, done: str, now: str) -> str:
    if not now.startswith(done):
        raise HearthError(f"{conv.source}: the chat template does not render this chat incrementally")
    return now[len(done):]


def _extend(ids: list[int], labels: list[int], tokenizer: Any, text: str, train: bool) -> None:
    if not text:
        return
    new = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.extend(new)
    labels.extend(new if train else [IGNORE] * len(new))


def _tokenize_note(conv: Conversation, tokenizer: Any, max_length: int) -> list[Example]:
    assert conv.text is not None
    ids = tokenizer(conv.text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    chunks = []
    for start in range(0, len(ids), max_length):
        window = ids[start : start + max_length]
        if len(window) > 1:
            chunks.append(Example(window, list(window), conv.source))
    return chunks


def load_examples(path: Path, tokenizer: Any, max_length: int = 512) -> list[Example]:
    """Read and tokenise `path` (all lines checked before any is used)."""
    return tokenize(read_conversations(path), tokenizer, max_length)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded tensors; labels -100 on padding."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids, mask, labels)


def examples_fingerprint(examples: list[Example]) -> str:
    """A hash of the token ids and labels (what the activation cache and checkpoints key on)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()
