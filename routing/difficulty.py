"""How hard is a request? The signal behind model ``auto``: a score in [0, 1] that the tenant's
threshold (the quality/cost dial) compares against.

Two parts, both cheap enough for the hot path (tens of microseconds, no model server):

- **Rules on structure** set a floor: tools requested, code, mathematics, a long context or a
  structured-output request each say "the large model" on their own.
- **A learned classifier** reads the words: logistic regression over hashed word unigrams and
  bigrams plus length, trained by ``tollway.routing.difficulty_train`` on FreshQA (one-hop vs
  multi-hop questions, shipped inside the ``inspect-evals`` package) and stored as
  ``difficulty_model.json`` next to this module. Scoring is a sparse dot product.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import regex

from tollway.routing.tokens import OFF_LOOP_CHARS, content_texts

WORD = re.compile(r"[a-z0-9]+")
# The rules' signals run over the whole prompt: each pattern is linear in its length (a SQL query is a SELECT
# followed anywhere later by a FROM, found as two searches: as one pattern, ``SELECT.+FROM``, a prompt of the
# word "select" repeated backtracked quadratically, 17 s for 140 KB), and on a long prompt they are matched
# with the GIL released (the gateway assesses such a prompt in a worker thread).
CODE = regex.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\s*\w*\(|#include\s*<|=>|;\s*\n", regex.IGNORECASE)
SELECT, FROM = regex.compile(r"\bSELECT\b", regex.IGNORECASE), regex.compile(r"\bFROM\b", regex.IGNORECASE)
MATH = regex.compile(r"\\(frac|int|sum|sqrt|prod|lim)\b|\b(prove|integral|derivative|theorem|eigen\w*|matrix)\b"
                     r"|\d\s*[\^*/]\s*\d|[=<>]\s*-?\d+\s*[+\-*/^]", regex.IGNORECASE)


def has_code(text: str) -> bool:
    long = len(text) > OFF_LOOP_CHARS
    if CODE.search(text, concurrent=long) is not None:
        return True
    select = SELECT.search(text, concurrent=long)
    return select is not None and FROM.search(text, select.end() + 1, concurrent=long) is not None


def has_math(text: str) -> bool:
    return MATH.search(text, concurrent=len(text) > OFF_LOOP_CHARS) is not None


LONG_PROMPT_CHARS = 12_000  # roughly 3,000 tokens
FLOORS = {"tools": 0.8, "code": 0.7, "math": 0.7, "long": 0.6, "structured": 0.55}


def hashed_features(text: str, buckets: int) -> dict[int, float]:
    """Sparse features of one text: hashed word unigrams and bigrams (presence), then two dense ones
    at indices ``buckets`` (log word count) and ``buckets + 1`` (clauses joined by commas or 'and')."""
    lowered = text.lower()
    words = WORD.findall(lowered)
    features: dict[int, float] = {}
    for word in words:
        features[zlib.crc32(b"u" + word.encode()) % buckets] = 1.0
    for first, second in itertools.pairwise(words):
        features[zlib.crc32(f"b{first} {second}".encode()) % buckets] = 1.0
    features[buckets] = math.log1p(len(words))
    features[buckets + 1] = float(lowered.count(",") + lowered.count(" and "))
    return features


@dataclass(frozen=True, slots=True)
class DifficultyModel:
    buckets: int
    weights: tuple[float, ...]  # buckets + 2 entries
    bias: float
    metrics: dict[str, Any]

    def learned(self, text: str) -> float:
        z = self.bias + sum(self.weights[i] * v for i, v in hashed_features(text, self.buckets).items())
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DifficultyModel:
        return cls(buckets=int(data["buckets"]), weights=tuple(float(w) for w in data["weights"]),
                   bias=float(data["bias"]), metrics=dict(data.get("metrics", {})))


@cache
def load_model() -> DifficultyModel:
    raw = (resources.files("tollway.routing") / "difficulty_model.json").read_text()
    return DifficultyModel.from_json(json.loads(raw))


@dataclass(frozen=True, slots=True)
class Difficulty:
    score: float
    learned: float
    signals: tuple[str, ...]  # the structural rules that fired

    def describe(self) -> str:
        return f"{self.score:.2f}" + (f"({'+'.join(self.signals)})" if self.signals else "")


def _content_text(content: object) -> str:
    return " ".join(content_texts(content))


def assess(messages: Sequence[Any], *, tools: bool = False, structured: bool = False,
           model: DifficultyModel | None = None) -> Difficulty:
    """Score a chat request. The learned part reads the last user message (the question being asked), at
    most its first ``LONG_PROMPT_CHARS`` characters; the rules look at the whole prompt."""
    model = model or load_model()
    texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    question = next((_content_text(m.get("content")) for m in reversed(messages)
                     if isinstance(m, dict) and m.get("role") == "user"), texts[-1] if texts else "")
    whole = "\n".join(texts)
    signals = []
    if tools:
        signals.append("tools")
    if has_code(whole):
        signals.append("code")
    if has_math(whole):
        signals.append("math")
    if len(whole) > LONG_PROMPT_CHARS:
        signals.append("long")
    if structured:
        signals.append("structured")
    learned = model.learned(question[:LONG_PROMPT_CHARS])  # a longer question is "long" anyway: bounded work
    score = max([learned, *(FLOORS[s] for s in signals)])
    return Difficulty(score=score, learned=learned, signals=tuple(signals))
