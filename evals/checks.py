"""Checks against one answer. Deterministic ones are pure functions here; the judge needs a model call,
so the runner makes it and this module builds its messages and reads its score."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import regex

from tollway.evals.golden import (
    Check,
    Contains,
    Exact,
    JSONCheck,
    Judge,
    Numeric,
    Refusal,
    Regex,
    RetrievalRecall,
)
from tollway.jsontypes import SchemaUnchecked, best_schema_error

REGEX_TIMEOUT_S = 1.0  # a regex check that backtracks longer than this on one answer fails


@dataclass(frozen=True, slots=True)
class Answer:
    """What a run got for one item."""

    content: str = ""
    payload: dict[str, Any] | None = None  # the chat.completion, with its ``tollway`` object
    status: int = 200
    error: str | None = None

    @property
    def finish_reason(self) -> str | None:
        choices = (self.payload or {}).get("choices") or []
        return choices[0].get("finish_reason") if choices and isinstance(choices[0], dict) else None

    @property
    def sources(self) -> list[dict[str, Any]]:
        retrieval = ((self.payload or {}).get("tollway") or {}).get("retrieval") or {}
        return [s for s in retrieval.get("sources") or [] if isinstance(s, dict)]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool | None  # None: not judged (a skipped judge)
    score: float | None = None  # 0..1 where the check scores
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "score": self.score, "detail": self.detail}


REFUSAL = regex.compile(
    r"\b(?:I(?:'m| am) (?:sorry|afraid)[^.\n]{0,40}\b(?:can(?:'|no)t|cannot|unable|not able|won'?t)|"
    r"I (?:can(?:'|no)t|cannot|won'?t|will not|am unable to|'m unable to|am not able to|'m not able to|must decline"
    r"|have to decline|do not feel comfortable|don'?t feel comfortable)\b(?:[^.\n]{0,30}\b(?:help|assist|provide|"
    r"do|share|comply|answer|fulfil|support|create|write|give))?|"
    r"(?:as an ai|as a language model)[^.\n]{0,60}\b(?:can(?:'|no)t|cannot|unable|not able|don'?t)|"
    r"(?:against|violates?) (?:my|the|our) (?:guidelines|policies|policy|principles|content policy)|"
    r"I'?m not (?:able|allowed|permitted) to)", regex.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def is_refusal(answer: Answer) -> bool:
    if answer.finish_reason == "content_filter":
        return True
    return bool(REFUSAL.search(answer.content[:600]))


def name_of(check: Check) -> str:
    return check.name or check.type


def evaluate(check: Check, answer: Answer) -> CheckResult:
    """A deterministic check; the judge is the runner's (``judge_messages`` / ``judge_score``)."""
    try:
        passed, score, detail = _evaluate(check, answer)
    except TimeoutError:  # a failure whichever way the check reads (negated too): it decided nothing
        assert isinstance(check, Regex)
        return CheckResult(name_of(check), False, None, f"pattern {check.pattern!r} took over {REGEX_TIMEOUT_S:g}s on "
                                                         "this answer; counted as failed")
    if check.negate and passed is not None:
        passed = not passed
        detail = f"negated: {detail}"
    return CheckResult(name_of(check), passed, score, detail)


def _evaluate(check: Check, answer: Answer) -> tuple[bool | None, float | None, str]:
    text = answer.content
    if isinstance(check, Exact):
        a, b = (text.strip(), check.value.strip()) if check.strip else (text, check.value)
        if not check.case_sensitive:
            a, b = a.casefold(), b.casefold()
        return a == b, None, "equal" if a == b else f"expected {check.value!r}"
    if isinstance(check, Contains):
        wanted = [check.value] if check.value is not None else list(check.values or [])
        hay = text if check.case_sensitive else text.casefold()
        found = [w for w in wanted if (w if check.case_sensitive else w.casefold()) in hay]
        ok = bool(found) if check.mode == "any" else len(found) == len(wanted)
        missing = [w for w in wanted if w not in found]
        return ok, len(found) / len(wanted), "all found" if not missing else f"missing {missing}"
    if isinstance(check, Regex):
        flags = sum({"i": regex.I, "m": regex.M, "s": regex.S, "x": regex.X}[f] for f in check.flags)
        # an eval set's pattern is a client's: bounded in time like every client input (``evaluate``)
        ok = regex.search(check.pattern, text, flags, timeout=REGEX_TIMEOUT_S) is not None
        return ok, None, "matched" if ok else f"no match for {check.pattern!r}"
    if isinstance(check, Numeric):
        numbers = [float(n.replace(",", "")) for n in _NUMBER.findall(text)]
        if not numbers:
            return False, None, "no number in the answer"
        room = check.tolerance * abs(check.value) if check.relative else check.tolerance
        best = min(numbers, key=lambda n: abs(n - check.value))
        ok = abs(best - check.value) <= room
        return ok, None, f"closest number {best:g} vs {check.value:g} ± {room:g}"
    if isinstance(check, JSONCheck):
        return _json(text, check.schema_)
    if isinstance(check, Refusal):
        refused = is_refusal(answer)
        return refused == check.expected, None, "refused" if refused else "answered"
    if isinstance(check, RetrievalRecall):
        cited = {str(s.get(k)) for s in answer.sources for k in ("source", "document_id", "title") if s.get(k)}
        hits = [d for d in check.documents if d in cited]
        share = len(hits) / len(check.documents)
        return share >= check.min, share, f"cited {len(hits)}/{len(check.documents)} expected documents"
    raise TypeError(f"not a deterministic check: {check.type}")


def _json(text: str, schema: dict[str, Any] | None) -> tuple[bool, None, str]:
    try:
        value = orjson.loads(text.strip())
    except orjson.JSONDecodeError:
        return False, None, "not valid JSON"
    if schema is None:
        return True, None, "valid JSON"
    try:
        error = best_schema_error(schema, value)
    except SchemaUnchecked as exc:
        return False, None, f"schema: {exc}"
    if error is None:
        return True, None, "valid JSON matching the schema"
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return False, None, f"schema: {where}: {error.message}"


# -- the judge ----------------------------------------------------------------------------------
JUDGE_SYSTEM = ("You are a strict grader. Read the rubric, the conversation and the answer. Reply with only a JSON "
                'object: {"score": <0 to 10>, "reason": "<one sentence>"}. 10 fully meets the rubric, 0 not at all.')


def judge_messages(check: Judge, question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Rubric:\n{check.rubric}\n\nConversation:\n{question}\n\nAnswer:\n{answer}"}]


def judge_variables(check: Judge, question: str, answer: str) -> dict[str, str]:
    """What a versioned judge prompt is rendered with (it declares these variables)."""
    return {"rubric": check.rubric, "question": question, "answer": answer}


_SCORE = regex.compile(r"\"?score\"?\s*[:=]\s*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?|(?<!\d)(\d+(?:\.\d+)?)\s*/\s*(10|100)\b",
                       regex.IGNORECASE)


def judge_score(text: str) -> float | None:
    """The judge's score as 0..1, or None when its output has none (a weak judge)."""
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            data = orjson.loads(text[start:end + 1])
            if isinstance(data, dict) and isinstance(data.get("score"), int | float):
                return _scale(float(data["score"]), None)
        except orjson.JSONDecodeError:
            pass
    m = _SCORE.search(text)
    if m is None:
        return None
    if m.group(1) is not None:
        return _scale(float(m.group(1)), float(m.group(2)) if m.group(2) else None)
    return _scale(float(m.group(3)), float(m.group(4)))


def _scale(value: float, out_of: float | None) -> float | None:
    scale = out_of or (1.0 if value <= 1 else 10.0 if value <= 10 else 100.0 if value <= 100 else None)
    if scale is None or value < 0 or value > scale:
        return None
    return round(value / scale, 4)
