"""Evaluation of personalised models: fact recall on paraphrased questions, intent accuracy.

- `fact_recall`: for each `{"question", "must_contain"}` line of an eval JSONL, the greedy answer
  must contain the fact (case-insensitive). This is the household fixture's measure.
- `intent_accuracy`: CLINC150-style rows `(text, intent)`; the greedy answer, stripped, must equal
  the intent name.

What is not here: training, and the data files (read from wherever the caller points).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import HearthError
from training.torch_engine import PersonalLM


@dataclass
class Score:
    hits: int
    total: int

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0


def read_fact_questions(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append((str(record["question"]), str(record["must_contain"])))
        except (ValueError, KeyError, TypeError):
            raise HearthError(f"{path}:{number}: expected {{\"question\": ..., \"must_contain\": ...}}") from None
    return rows


def fact_recall(lm: PersonalLM, questions: list[tuple[str, str]], max_tokens: int = 28) -> Score:
    replies = lm.answers([q for q, _ in questions], max_tokens)
    hits = sum(1 for (_, fact), reply in zip(questions, replies) if fact.lower() in reply.lower())
    return Score(hits, len(questions))


def intent_accuracy(lm: PersonalLM, rows: list[tuple[str, str]], max_tokens: int = 12) -> Score:
    replies = lm.answers([text for text, _ in rows], max_tokens)
    hits = sum(1 for (_, intent), reply in zip(rows, replies) if reply.strip().lower() == intent.lower())
    return Score(hits, len(rows))
