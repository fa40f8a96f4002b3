"""What the quality monitor watches: a scored live sample as the monitor reads it (``Row``), and one
watch over a route (``Watch``): a canary against the model it stands in for, a moved or split prompt label
against its previous version, or a route against its own trailing baseline."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tollway.evals import DriftSettings, Finding, RouteTest, Scored, SteadyWatch
from tollway.jsontypes import JSON
from tollway.routing import Rollout

SAMPLE_COLUMNS = ("id, tenant_id, model, rollout_of, prompt_name, prompt_label, prompt_version, passed, refusal,"
           " guard_failed, output_chars, tokens, cost_usd, retrieval_score, judge_score")


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    tenant_id: int
    model: str
    rollout_of: str | None
    prompt_name: str | None
    prompt_label: str | None
    prompt_version: str | None
    scored: Scored


def row_of(r: Sequence[Any]) -> Row:
    return Row(int(r[0]), int(r[1]), r[2], r[3], r[4], r[5], r[6],
               Scored(passed=r[7], refusal=bool(r[8]), guard_failed=bool(r[9]), output_chars=float(r[10]),
                      tokens=float(r[11]), cost=float(r[12]), retrieval=r[13], judge=r[14]))


@dataclass(slots=True)
class Watch:
    key: str
    kind: str  # 'canary', 'prompt', 'steady'
    subject: str  # what an alert is about, in words
    rate_key: str
    tenant_id: int | None
    candidate: Callable[[Row], bool]
    baseline: Callable[[Row], bool] | None = None  # None: a steady watch (its own trailing baseline)
    settings: DriftSettings = field(default_factory=DriftSettings)
    rollout: Rollout | None = None
    prompt: JSON | None = None  # tenant, name, label, version, previous, change, split, progressive
    base: deque[Scored] = field(default_factory=deque)
    waiting: list[Scored] = field(default_factory=list)  # candidate samples before the baseline was ready
    test: RouteTest | None = None
    steady: SteadyWatch | None = None
    done: bool = False
    fed_at: float = field(default_factory=time.monotonic)  # when its last sample came

    def feed(self, row: Row) -> list[Finding]:
        if self.steady is not None:
            if not self.candidate(row):
                return []
            self.fed_at = time.monotonic()
            return self.steady.observe(row.scored)
        if self.baseline is not None and self.baseline(row):
            self.base.append(row.scored)
        if not self.candidate(row):
            return []
        if self.test is None:
            self.waiting.append(row.scored)
            if len(self.base) < self.settings.baseline_samples:
                del self.waiting[:-self.settings.baseline_max]
                return []
            self.test = RouteTest(self.base, self.settings)
            found = [f for s in self.waiting for f in self.test.update(s)]
            self.waiting = []
            return found
        return self.test.update(row.scored)

    def progress(self) -> float:
        if self.steady is not None:
            return self.steady.progress()
        return 0.0 if self.test is None else self.test.progress()

    def state(self) -> JSON:
        test = self.steady.test if self.steady is not None else self.test
        return {"watch": self.key, "kind": self.kind, "subject": self.subject, "progress": round(self.progress(), 4),
                "samples": 0 if test is None else test.n, "baseline_samples": len(
                    self.steady.baseline if self.steady is not None else self.base),
                "detectors": [] if test is None else test.detectors}
