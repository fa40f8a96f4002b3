"""Guards at run time, for one request: input checks over the user's texts, and an output guard per choice
that a stream's text is fed through.

Built-in validators are called directly (a detector pass costs microseconds; a guardrails-ai ``Guard``
call costs about 2 ms: ``bench/guardrails`` measures both), through the same code for a stream and a
whole answer (one chunk, then the end). Extra validators a user configured by import path run through a
``Guard`` with guardrails-ai's telemetry off, on whole texts: on output they hold the answer back until it
is complete, like the JSON check.

Every validator that ran leaves an ``Outcome``: its action ('pass' when it found nothing), the spans it
found, the time it took.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tollway.guardrails.detectors import Finder, Span, finders, redact, spans_of
from tollway.guardrails.injection import score
from tollway.guardrails.leak import LeakDetector
from tollway.guardrails.policy import INPUT_ACTIONS, Resolved
from tollway.guardrails.structure import check_json
from tollway.guardrails.terms import term_finders
from tollway.guardrails.window import Window

SPAN_VALIDATORS = ("pii", "secrets", "terms", "leak")
STOPS = ("block", "fallback")


@dataclass(slots=True)
class Outcome:
    validator: str
    action: str  # 'pass', or the policy's action for a failure ('redact', 'block', 'fallback', 'log')
    spans: int = 0
    ms: float = 0.0
    detail: str | None = None  # what failed: span kinds, the injection rules, the JSON problem


class Record:
    """Per validator: spans found, time spent, the action taken (the strongest, if several)."""

    _RANK = {"pass": 0, "log": 1, "redact": 2, "fallback": 3, "block": 4}

    def __init__(self, names: Iterable[str]) -> None:
        self.outcomes = {name: Outcome(name, "pass") for name in names}

    def time(self, name: str, started: float) -> None:
        self.outcomes[name].ms += (time.perf_counter() - started) * 1000

    def fail(self, name: str, action: str, spans: int = 1, detail: str | None = None) -> None:
        outcome = self.outcomes[name]
        outcome.spans += spans
        if self._RANK[action] > self._RANK[outcome.action]:
            outcome.action = action
        if detail and (outcome.detail is None or detail not in outcome.detail):
            outcome.detail = detail if outcome.detail is None else f"{outcome.detail}; {detail}"

    def all(self) -> list[Outcome]:
        return list(self.outcomes.values())


def validator_of(kind: str) -> str:
    if kind == "secret":
        return "secrets"
    if kind in ("term", "competitor") or kind.startswith("topic:"):
        return "terms"
    if kind == "system_prompt":
        return "leak"
    return "pii"


@dataclass(slots=True)
class _Timed:
    """A finder whose time is charged to its validator."""

    inner: Finder
    record: Record
    validator: str

    @property
    def kind(self) -> str:
        return self.inner.kind

    def find(self, text: str) -> list[Span]:
        started = time.perf_counter()
        try:
            return self.inner.find(text)
        finally:
            self.record.time(self.validator, started)

    def holds(self, text: str) -> int:
        started = time.perf_counter()
        try:
            return self.inner.holds(text)
        finally:
            self.record.time(self.validator, started)


@lru_cache(maxsize=256)
def _terms(terms: tuple[str, ...], competitors: tuple[str, ...],
           topics: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[Finder, ...]:
    return tuple(term_finders(terms, competitors, dict(topics)))


@lru_cache(maxsize=256)
def _leak(system: tuple[str, ...]) -> LeakDetector | None:
    return LeakDetector.of(system)


def span_finders(policy: Resolved, actions: Mapping[str, str], system: tuple[str, ...] = ()) -> list[Finder]:
    """The detectors of the span validators ``actions`` runs (compiled lists are cached)."""
    found: list[Finder] = []
    if "pii" in actions:
        found += finders(policy.pii_kinds)
    if "secrets" in actions:
        found += finders(("secret",))
    if "terms" in actions:
        found += _terms(policy.terms, policy.competitors, policy.topics)
    if "leak" in actions and (leak := _leak(system)) is not None:
        found.append(leak)
    return found


# -- extra validators (guardrails-ai, by import path) ---------------------------------------------
class Extra:
    """A configured guardrails-ai validator, run through a quiet ``Guard``: 'fix' for redact, else
    'noop' (the policy decides what a failure does)."""

    def __init__(self, name: str, cls: type, args: Mapping[str, Any]) -> None:
        self.name, self.cls, self.args = name, cls, dict(args)
        self._guards: dict[str, Any] = {}

    def _guard(self, on_fail: str) -> Any:
        guard = self._guards.get(on_fail)
        if guard is None:
            from tollway.guardrails.validators import quiet_guard

            guard = self._guards[on_fail] = quiet_guard(self.cls(**self.args, on_fail=on_fail))
        return guard

    def check(self, text: str, action: str) -> tuple[bool, str | None, str | None]:
        """(passed, the fixed text for 'redact', why it failed)."""
        outcome = self._guard("fix" if action == "redact" else "noop").validate(text)
        summaries = [s for s in outcome.validation_summaries or [] if s.validator_status == "fail"]
        why = "; ".join(str(s.failure_reason) for s in summaries if s.failure_reason) or None
        if not summaries and outcome.validation_passed:
            return True, None, None
        fixed = outcome.validated_output if isinstance(outcome.validated_output, str) else None
        return False, fixed, why


# -- input ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class InputResult:
    texts: list[str]  # the user's texts, redacted where the policy said so
    outcomes: list[Outcome]
    stop: Outcome | None = None  # a validator whose action (block or fallback) refuses the request


AT_RETRIEVAL = ("passage_injection",)  # input-side validators that run on retrieved passages, not here


def check_input(policy: Resolved, texts: list[str], extras: Mapping[str, Extra], tools: list[str] | None = None
                ) -> InputResult:
    """The user's ``texts`` (and the request's tool results, ``tools``, for ``tool_injection``)."""
    actions = policy.input
    record = Record(n for n in actions if (n in extras or n in INPUT_ACTIONS) and n not in AT_RETRIEVAL)
    out = list(texts)
    if "length" in actions and policy.max_input_chars is not None:
        started = time.perf_counter()
        total = sum(len(t) for t in texts)
        if total > policy.max_input_chars:
            record.fail("length", actions["length"], detail=f"{total} characters > {policy.max_input_chars}")
        record.time("length", started)
    if "injection" in actions:
        started = time.perf_counter()
        worst = max((score(t, learned=policy.injection_model) for t in texts), key=lambda v: v.score, default=None)
        if worst is not None and worst.blocked(policy.injection_threshold):
            record.fail("injection", actions["injection"], spans=len(worst.rules),
                        detail=f"score {worst.score}: {', '.join(worst.rules)}")
        record.time("injection", started)
    if "tool_injection" in actions and tools:
        started = time.perf_counter()
        worst = max((score(t, learned=policy.injection_model) for t in tools), key=lambda v: v.score)
        if worst.blocked(policy.injection_threshold):
            record.fail("tool_injection", actions["tool_injection"], spans=len(worst.rules),
                        detail=f"a tool result, score {worst.score}: {', '.join(worst.rules)}")
        record.time("tool_injection", started)
    spanned = {n: a for n, a in actions.items() if n in SPAN_VALIDATORS}
    if spanned:
        timed: list[Finder] = [_Timed(f, record, validator_of(f.kind)) for f in span_finders(policy, spanned)]
        for i, text in enumerate(out):
            spans = spans_of(text, timed)
            for span in spans:
                name = validator_of(span.kind)
                record.fail(name, actions[name], detail=span.kind)
            out[i] = redact(text, [s for s in spans if actions[validator_of(s.kind)] == "redact"])
    for name, extra in extras.items():
        if name not in actions:
            continue
        started = time.perf_counter()
        for i, text in enumerate(out):
            passed, fixed, why = extra.check(text, actions[name])
            if not passed:
                record.fail(name, actions[name], detail=why)
                if actions[name] == "redact" and fixed is not None:
                    out[i] = fixed
        record.time(name, started)
    outcomes = record.all()
    stop = next((o for o in outcomes if o.action == "block"), None) or \
        next((o for o in outcomes if o.action == "fallback"), None)
    return InputResult(out, outcomes, stop)


@dataclass(frozen=True, slots=True)
class PassageScreen:
    """``passage_injection``: each retrieved passage scored before it is packed."""

    action: str  # 'drop' or 'log'
    threshold: float
    learned: bool = False  # the policy's injection_model

    @classmethod
    def of(cls, policy: Resolved | None) -> PassageScreen | None:
        action = policy.input.get("passage_injection") if policy is not None else None
        return cls(action, policy.injection_threshold, policy.injection_model) \
            if action and policy is not None else None

    @property
    def key(self) -> str:
        """What a cached answer's context depended on (part of the response cache key)."""
        return f"passage_injection={self.action}@{self.threshold}" + ("+model" if self.learned else "")

    def reason(self, text: str) -> str | None:
        """Why ``text`` is flagged (None: it is not)."""
        verdict = score(text, learned=self.learned)
        return f"injection score {verdict.score}: {', '.join(verdict.rules)}" \
            if verdict.blocked(self.threshold) else None


# -- output -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Piece:
    text: str  # may go to the client now
    stop: str | None = None  # 'block' or 'fallback': the answer ends here (for 'fallback', ``text`` ends
    # with the fallback message); 'length': truncated by a redacting length guard


@dataclass(slots=True)
class OutputPlan:
    """What the output guards of one request need, shared by its choices."""

    policy: Resolved
    system: tuple[str, ...] = ()  # the system text a 'leak' guard protects
    wants_json: bool = False  # the request asked for JSON
    schema: dict[str, Any] | None = None
    extras: Mapping[str, Extra] = field(default_factory=dict)
    record: Record = field(init=False)

    def __post_init__(self) -> None:
        names = [n for n in self.policy.output if n in SPAN_VALIDATORS or n in self.extras
                 or (n == "json" and self.wants_json) or (n == "length" and self.policy.max_output_chars)]
        self.record = Record(names)

    @property
    def idle(self) -> bool:
        return not self.record.outcomes

    def guard(self, *, reasoning: bool = False) -> ChoiceGuard:
        """A choice's guard; ``reasoning``: for the reasoning text a model sends beside its answer, through the
        span validators only (the JSON, extra and length checks are the answer's)."""
        return ChoiceGuard(self, reasoning=reasoning)


class ChoiceGuard:
    """One choice's text through the output guards: a held-back window for the span validators, a count
    for the length limit, the whole text for JSON and extra validators."""

    def __init__(self, plan: OutputPlan, *, reasoning: bool = False) -> None:
        self.plan = plan
        actions = plan.policy.output
        record = plan.record
        spanned = {n: a for n, a in actions.items() if n in SPAN_VALIDATORS}
        found: list[Finder] = [_Timed(f, record, validator_of(f.kind))
                               for f in span_finders(plan.policy, spanned, plan.system)]
        self.whole = [] if reasoning else [n for n in record.outcomes if n == "json" or n in plan.extras]
        self.window = Window(found, self._act, whole=bool(self.whole))
        self.limit = plan.policy.max_output_chars if "length" in record.outcomes and not reasoning else None
        self.released = 0
        self.stopped: str | None = None

    def _act(self, span: Span) -> str:
        name = validator_of(span.kind)
        action = self.plan.policy.output[name]
        self.plan.record.fail(name, action, detail=span.kind.split(":")[0])
        return "stop" if action in STOPS else "redact" if action == "redact" else "log"

    def feed(self, text: str) -> Piece:
        if self.stopped:
            return Piece("")
        release = self.window.feed(text)
        return self._out(release.text, self._action(release.stop))

    def end(self) -> Piece:
        if self.stopped:
            return Piece("")
        release = self.window.end()
        if self.whole and release.stop is None:
            return self._whole(release.text)
        return self._out(release.text, self._action(release.stop))

    def _action(self, stop: Span | None) -> str | None:
        return None if stop is None else self.plan.policy.output[validator_of(stop.kind)]

    def _whole(self, text: str) -> Piece:
        """The held whole answer through JSON and the extra validators, then the length limit."""
        actions, record = self.plan.policy.output, self.plan.record
        if "json" in self.whole:
            started = time.perf_counter()
            verdict = check_json(text, self.plan.schema)
            record.time("json", started)
            if not verdict.ok:
                action = actions["json"]
                if action == "redact" and verdict.repaired is None:
                    action = "block"  # nothing to repair it into
                record.fail("json", action, detail=verdict.problem)
                if action in STOPS:
                    return self._stop(action, "")
                if action == "redact":
                    text = verdict.repaired or text
        for name in self.whole:
            extra = self.plan.extras.get(name)
            if extra is None:
                continue
            started = time.perf_counter()
            passed, fixed, why = extra.check(text, actions[name])
            record.time(name, started)
            if not passed:
                record.fail(name, actions[name], detail=why)
                if actions[name] in STOPS:
                    return self._stop(actions[name], "")
                if actions[name] == "redact" and fixed is not None:
                    text = fixed
        return self._out(text, None)

    def _out(self, text: str, stop: str | None) -> Piece:
        if self.limit is not None and self.released + len(text) > self.limit:
            action = self.plan.policy.output["length"]
            self.plan.record.fail("length", action, detail=f"more than {self.limit} characters")
            if action == "redact":
                self.stopped = "length"
                return Piece(text[:self.limit - self.released], "length")
            if action in STOPS:
                return self._stop(action, "")
        if stop is not None:
            return self._stop(stop, text)
        self.released += len(text)
        return Piece(text)

    def _stop(self, action: str, before: str) -> Piece:
        """The answer ends: text already released stays (a stream cannot take it back) and so does the
        clean text just before the failing span; an answer nothing of which went out yet is replaced
        whole (by nothing for 'block', by the fallback message for 'fallback')."""
        self.stopped = action
        keep = before if self.released else ""
        if action == "fallback":
            message = self.plan.policy.fallback_message
            return Piece(f"{keep}\n\n{message}" if keep else message, "fallback")
        return Piece(keep, "block")


