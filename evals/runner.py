"""Runs a golden set against a target (a prompt reference and/or a model) through a ``complete`` function
the gateway supplies (its own chat path, in process), with bounded concurrency; then the aggregate, the
comparison of two runs, and the gate's decision.

An item passes when its request succeeded and every check that could be judged passed; a judge that gave
no score (a weak judge model) is reported as skipped, not as a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tollway.evals.checks import (
    Answer,
    CheckResult,
    evaluate,
    judge_messages,
    judge_score,
    judge_variables,
    name_of,
)
from tollway.evals.golden import GoldenSet, Item, Judge
from tollway.evals.stats import Paired, mcnemar, paired_bootstrap

Complete = Callable[[dict[str, Any]], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Target:
    """What a run asks: a prompt (``NAME``, ``NAME@VERSION`` or ``NAME@LABEL``) and/or a model."""

    prompt: str | None = None
    model: str | None = None

    def prompt_ref(self, variables: dict[str, Any] | None, labels: Callable[[str], bool]) -> dict[str, Any] | None:
        if self.prompt is None:
            return None
        name, _, ref = self.prompt.partition("@")
        key = "label" if not ref or labels(ref) else "version"
        return {"name": name, key: ref or "production", "variables": variables or {}}


def parse_prompt_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@dataclass(slots=True)
class ItemResult:
    item_id: str
    passed: bool
    checks: list[CheckResult]
    answer: str = ""
    score: float | None = None  # mean of the checks' scores, where any check scores
    request_id: str | None = None
    status: int = 200
    error: str | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    versions: dict[str, str | None] = field(default_factory=dict)  # prompt version, model, index version

    def as_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "passed": self.passed, "score": self.score,
                "checks": [c.as_json() for c in self.checks], "answer": self.answer, "request_id": self.request_id,
                "status": self.status, "error": self.error, "cost_usd": self.cost_usd,
                "latency_ms": round(self.latency_ms, 1), **self.versions}


def request_body(item: Item, target: Target, labels: Callable[[str], bool], tags: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(item.messages or []), **item.params,
                            "metadata": {"tags": tags}}
    prompt = target.prompt_ref(item.variables, labels)
    if prompt is not None:
        body["prompt"] = prompt
    body["model"] = target.model or ("prompt" if prompt is not None else "auto")
    if item.retrieval is not None:
        body["retrieval"] = item.retrieval
    return body


def _question(item: Item, body: dict[str, Any]) -> str:
    parts = [f"{m.get('role')}: {m.get('content')}" for m in item.messages or []]
    if item.variables:
        parts.append(f"(prompt {body.get('prompt', {}).get('name')} with {item.variables})")
    return "\n".join(parts)


async def run_item(item: Item, target: Target, complete: Complete, *, labels: Callable[[str], bool],
                   tags: list[str]) -> ItemResult:
    body = request_body(item, target, labels, tags)
    started = time.perf_counter()
    answer = await complete(body)
    latency = (time.perf_counter() - started) * 1000
    info = (answer.payload or {}).get("tollway") or {}
    versions = {"prompt_version": (info.get("prompt") or {}).get("version"),
                "model": info.get("model") or (answer.payload or {}).get("model"),
                "index_version": (info.get("retrieval") or {}).get("index_version")}
    cost = float(info.get("cost_usd") or 0)
    if answer.status != 200:
        return ItemResult(item.id, False, [], "", None, info.get("request_id"), answer.status, answer.error,
                          cost, latency, versions)
    results = []
    for check in item.checks:
        if isinstance(check, Judge):
            result, judge_cost = await _judge(check, item, body, answer, complete, labels, tags)
            cost += judge_cost
            results.append(result)
        else:
            results.append(evaluate(check, answer))
    judged = [r for r in results if r.passed is not None]
    scores = [r.score for r in results if r.score is not None]
    return ItemResult(item.id, all(r.passed for r in judged), results, answer.content,
                      sum(scores) / len(scores) if scores else None, info.get("request_id"), 200, None, cost,
                      latency, versions)


async def _judge(check: Judge, item: Item, body: dict[str, Any], answer: Answer, complete: Complete,
                 labels: Callable[[str], bool], tags: list[str]) -> tuple[CheckResult, float]:
    question = _question(item, body)
    request: dict[str, Any] = {"model": check.model, "temperature": 0, "max_tokens": 200,
                               "metadata": {"tags": [*tags, "eval-judge"]}}
    if check.prompt is not None:
        request["prompt"] = Target(prompt=check.prompt).prompt_ref(judge_variables(check, question, answer.content),
                                                                   labels)
        request["messages"] = []
        if check.model == "auto":
            request["model"] = "prompt"
    else:
        request["messages"] = judge_messages(check, question, answer.content)
    verdict = await complete(request)
    cost = float(((verdict.payload or {}).get("tollway") or {}).get("cost_usd") or 0)
    name = name_of(check)
    if verdict.status != 200:
        return CheckResult(name, None, None, f"judge skipped: its call failed ({verdict.error})"), cost
    score = judge_score(verdict.content)
    if score is None:
        return CheckResult(name, None, None, f"judge skipped: no score in its answer (a weak judge model?): "
                                             f"{verdict.content[:80]!r}"), cost
    passed = score >= check.min_score
    if check.negate:
        passed = not passed
    return CheckResult(name, passed, score, f"judge score {score:.2f} (min {check.min_score})"), cost


async def run_set(golden: GoldenSet, target: Target, complete: Complete, *, concurrency: int = 4,
                  labels: Callable[[str], bool] = lambda ref: False, tags: list[str] | None = None,
                  on_item: Callable[[ItemResult], Awaitable[None]] | None = None) -> list[ItemResult]:
    gate = asyncio.Semaphore(max(1, concurrency))
    tags = tags or ["eval"]

    async def one(item: Item) -> ItemResult:
        async with gate:
            result = await run_item(item, target, complete, labels=labels, tags=tags)
        if on_item is not None:
            await on_item(result)
        return result

    return list(await asyncio.gather(*(one(i) for i in golden.items)))


# -- aggregates, comparisons, gates ------------------------------------------------------------
def summary(results: list[ItemResult]) -> dict[str, Any]:
    checks: dict[str, dict[str, int]] = {}
    for r in results:
        for c in r.checks:
            entry = checks.setdefault(c.name, {"passed": 0, "failed": 0, "skipped": 0})
            entry["passed" if c.passed else "skipped" if c.passed is None else "failed"] += 1
    scores = [r.score for r in results if r.score is not None]
    passed = sum(r.passed for r in results)
    return {"items": len(results), "passed": passed, "pass_rate": round(passed / len(results), 4) if results else 0,
            "errors": sum(r.status != 200 for r in results),
            "mean_score": round(sum(scores) / len(scores), 4) if scores else None, "checks": checks,
            "judge_skipped": sum(c["skipped"] for name, c in checks.items() if "judge" in name),
            "cost_usd": round(sum(r.cost_usd for r in results), 8)}


@dataclass(frozen=True, slots=True)
class Comparison:
    items: int
    regressions: list[str]  # passed in A, failed in B
    improvements: list[str]
    pass_rate_a: float
    pass_rate_b: float
    passes: Paired
    scores: Paired | None

    def as_json(self, alpha: float = 0.05) -> dict[str, Any]:
        return {"items": self.items, "regressions": self.regressions, "improvements": self.improvements,
                "pass_rate": {"a": self.pass_rate_a, "b": self.pass_rate_b}, "alpha": alpha,
                "passes": {**self.passes.as_json(), "significant": self.passes.significant(alpha)},
                "scores": None if self.scores is None else {**self.scores.as_json(),
                                                            "significant": self.scores.significant(alpha)}}


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> Comparison:
    """Two runs' per-item results (``{item_id: {"passed", "score"}}``), paired on their common items."""
    common = sorted(set(a) & set(b))
    pa, pb = [bool(a[i]["passed"]) for i in common], [bool(b[i]["passed"]) for i in common]
    scored = [i for i in common if a[i].get("score") is not None and b[i].get("score") is not None]
    scores = paired_bootstrap([float(a[i]["score"]) for i in scored], [float(b[i]["score"]) for i in scored]) \
        if scored else None
    return Comparison(
        items=len(common),
        regressions=[i for i in common if a[i]["passed"] and not b[i]["passed"]],
        improvements=[i for i in common if b[i]["passed"] and not a[i]["passed"]],
        pass_rate_a=round(sum(pa) / len(common), 4) if common else 0.0,
        pass_rate_b=round(sum(pb) / len(common), 4) if common else 0.0,
        passes=mcnemar(pa, pb), scores=scores)


@dataclass(frozen=True, slots=True)
class GateThresholds:
    min_pass_rate: float = 0.8  # the candidate's own pass rate
    max_regression: float = 0.05  # the most the pass rate may drop against the current version
    alpha: float = 0.05  # a drop counts only if the paired test says it is real (unless require_significance off)
    require_significance: bool = True


def decide(candidate: dict[str, Any], comparison: Comparison | None, t: GateThresholds) -> tuple[bool, str]:
    """Whether the candidate may take the label, and why (in one line)."""
    rate = float(candidate["pass_rate"])
    reasons = []
    if rate < t.min_pass_rate:
        errors = int(candidate.get("errors") or 0)
        reasons.append(f"pass rate {rate:.0%} < {t.min_pass_rate:.0%}"
                       + (f" ({errors} of its requests failed: see the run)" if errors else ""))
    if comparison is not None:
        drop = comparison.pass_rate_a - comparison.pass_rate_b
        real = comparison.passes.significant(t.alpha) or not t.require_significance
        if drop > t.max_regression and real:
            reasons.append(f"pass rate fell {drop:.0%} against the current version (> {t.max_regression:.0%}, "
                           f"McNemar p={comparison.passes.p_value:.3g}; regressions: "
                           f"{', '.join(comparison.regressions[:5])})")
    if reasons:
        return False, "; ".join(reasons)
    against = "" if comparison is None else \
        f", current {comparison.pass_rate_a:.0%} (p={comparison.passes.p_value:.3g})"
    return True, f"pass rate {rate:.0%} (min {t.min_pass_rate:.0%}){against}"
