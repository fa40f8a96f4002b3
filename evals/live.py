"""Reference-free checks of one live answer: what can be judged without a golden answer.

- ``complete``: the answer has text and did not stop at the token limit.
- ``refusal``: it does not refuse (the golden sets' refusal detector).
- ``json_schema``: where the request asked for JSON (``response_format``), it is JSON, and valid against
  the schema it named.
- ``guards``: no output guard had to redact, withhold or replace it.
- ``grounded``: where retrieval supplied context, most of the answer's sentences are supported by it
  (half or more of a sentence's content words appear in the retrieved passages).

``passed`` is true when every check that applies passed. The judge's score and product feedback are
kept beside it, not folded in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tollway.evals.checks import Answer, is_refusal
from tollway.jsontypes import SchemaUnchecked, schema_errors

_WORD = re.compile(r"[^\W_]{3,}", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_STOP = frozenset("the and for that this with from are was were has have had not but you your our its they them"
                  " their there what which who will would can could should about into than then also been".split())
GROUNDED = 0.5  # share of supported sentences for ``grounded`` to pass


@dataclass(frozen=True, slots=True)
class LiveChecks:
    passed: bool | None
    refusal: bool
    guard_failed: bool
    grounded: float | None  # share of the answer's sentences the retrieved passages support
    retrieval_score: float | None  # the best retrieved passage's score
    checks: list[dict[str, Any]]


def _words(text: str) -> set[str]:
    return {w for w in (m.group().casefold() for m in _WORD.finditer(text)) if w not in _STOP}


def grounding(answer: str, passages: Sequence[str]) -> float | None:
    """Share of the answer's sentences with at least half of their content words in the passages."""
    support = set().union(*(_words(p) for p in passages)) if passages else set()
    sentences = [w for s in _SENTENCE.split(answer) if len(w := _words(s)) >= 3]
    if not sentences or not support:
        return None
    return sum(len(s & support) / len(s) >= 0.5 for s in sentences) / len(sentences)


def _json_check(text: str, response_format: Any) -> tuple[bool, str] | None:
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_object", "json_schema"):
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return False, f"not JSON: {exc}"[:200]
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if response_format["type"] == "json_object" or not isinstance(schema, dict):
        return isinstance(value, dict), "a JSON object" if isinstance(value, dict) else "JSON, but not an object"
    try:
        errors = sorted(schema_errors(schema, value), key=lambda e: list(e.path))
    except SchemaUnchecked as exc:
        return False, str(exc)
    return (not errors), "valid" if not errors else errors[0].message[:200]


def check_answer(answer: Answer, *, response_format: Any = None, guard_actions: Sequence[str] = (),
                 sources: Sequence[dict[str, Any]] = ()) -> LiveChecks:
    checks: list[dict[str, Any]] = []

    def add(name: str, passed: bool, detail: str) -> None:
        checks.append({"name": name, "passed": passed, "detail": detail})

    text = answer.content
    truncated = answer.finish_reason == "length"
    add("complete", bool(text.strip()) and not truncated,
        "empty answer" if not text.strip() else "stopped at the token limit" if truncated else "complete")
    refusal = is_refusal(answer)
    add("refusal", not refusal, "refused" if refusal else "answered")
    if (json_result := _json_check(text, response_format)) is not None:
        add("json_schema", *json_result)
    failed = [a for a in guard_actions if a in ("redact", "block", "fallback")]
    add("guards", not failed, f"guards: {', '.join(failed)}" if failed else "no guard intervened")
    grounded = None
    scores = [float(s["score"]) for s in sources if isinstance(s.get("score"), int | float)]
    if sources:
        grounded = grounding(text, [str(s.get("text") or "") for s in sources])
        if grounded is not None:
            add("grounded", grounded >= GROUNDED, f"{grounded:.0%} of sentences supported by the passages")
    return LiveChecks(passed=all(c["passed"] for c in checks), refusal=refusal, guard_failed=bool(failed),
                      grounded=grounded, retrieval_score=max(scores) if scores else None, checks=checks)
