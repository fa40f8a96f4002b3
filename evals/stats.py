"""Paired tests for comparing two runs over the same items: judge scores are noisy, so a difference is
real only if the items that changed say so, not two means side by side.

- pass/fail: McNemar's exact test, the two-sided binomial test on the discordant pairs (items that pass
  in one run and fail in the other);
- scores: a paired bootstrap of the mean difference (items resampled with replacement), its 95% interval
  and a two-sided p-value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from math import comb


@dataclass(frozen=True, slots=True)
class Paired:
    test: str
    n: int  # items compared
    difference: float  # b minus a: pass rate, or mean score
    p_value: float
    low: float | None = None  # 95% interval of the difference (bootstrap)
    high: float | None = None

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha

    def as_json(self) -> dict[str, object]:
        return {"test": self.test, "n": self.n, "difference": round(self.difference, 4),
                "p_value": round(self.p_value, 6), "ci95": None if self.low is None else
                [round(self.low, 4), round(self.high or 0.0, 4)]}


def mcnemar(a: list[bool], b: list[bool]) -> Paired:
    """``a[i]``, ``b[i]``: whether item i passed in each run."""
    assert len(a) == len(b)
    worse = sum(1 for x, y in zip(a, b, strict=True) if x and not y)  # passed in a, failed in b
    better = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = worse + better
    if n == 0:
        p = 1.0
    else:
        k = min(worse, better)
        p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    diff = (sum(b) - sum(a)) / len(a) if a else 0.0
    return Paired("mcnemar_exact", len(a), diff, p)


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = 10_000, seed: int = 0) -> Paired:
    """``a[i]``, ``b[i]``: item i's score in each run."""
    assert len(a) == len(b)
    n = len(a)
    if n == 0:
        return Paired("paired_bootstrap", 0, 0.0, 1.0)
    deltas = [y - x for x, y in zip(a, b, strict=True)]
    observed = sum(deltas) / n
    rng = random.Random(seed)
    means = sorted(sum(deltas[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    if all(d == 0 for d in deltas):
        p = 1.0
    else:
        below = sum(1 for m in means if m <= 0) / resamples
        above = sum(1 for m in means if m >= 0) / resamples
        p = min(1.0, 2 * min(below, above))
    return Paired("paired_bootstrap", n, observed, max(p, 1 / resamples), low, high)
