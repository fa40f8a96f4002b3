"""Sequential tests and distribution distances for drift detection (groundwork for the live quality loop).

- ``BernoulliSPRT``: Wald's sequential probability ratio test of a pass rate, H0: p = p0 against a
  specified drop H1: p = p1 < p0, with error rates alpha and beta; its expected sample sizes (Wald's
  approximations) say what an optimal detector needs.
- ``BernoulliMSPRT``: a mixture SPRT (normal mixture over the effect, on the centred observations), an
  always-valid test of "the rate is no longer p0" when no drop is specified: looking after every sample
  does not inflate its false-alarm rate (Johari, Pekelis and Walsh's construction).
- ``psi``: the population stability index of two categorical (or binned) distributions.
- ``ks``: the two-sample Kolmogorov-Smirnov test (scipy) for continuous distributions (lengths, tokens,
  cost per request).

Pure; the live loop feeds them per route.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class BernoulliSPRT:
    p0: float  # the baseline pass rate
    p1: float  # the drop worth detecting (p1 < p0)
    alpha: float = 0.01  # false alarm
    beta: float = 0.05  # missed drop
    llr: float = 0.0
    n: int = 0
    decision: str | None = None  # 'drop' (H1), 'no_drop' (H0), or None: keep sampling
    decided_llr: float = 0.0  # the ratio and sample count when the last decision was made (its evidence)
    decided_n: int = 0
    upper: float = field(init=False)  # log boundaries: reject H0 above, accept it below
    lower: float = field(init=False)
    _pass: float = field(init=False)  # the log-likelihood ratio a passed / failed sample adds
    _fail: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.p1 < self.p0 < 1:
            raise ValueError("need 0 < p1 < p0 < 1")
        self._pass = math.log(self.p1 / self.p0)
        self._fail = math.log((1 - self.p1) / (1 - self.p0))
        self.upper = math.log((1 - self.beta) / self.alpha)
        self.lower = math.log(self.beta / (1 - self.alpha))

    def update(self, passed: bool) -> str | None:
        """One scored sample; the decision once a boundary is crossed (then the test restarts)."""
        self.n += 1
        self.llr += self._pass if passed else self._fail
        if self.llr >= self.upper:
            self.decision = "drop"
        elif self.llr <= self.lower:
            self.decision = "no_drop"
        else:
            return None
        self.decided_llr, self.decided_n = self.llr, self.n
        decided, self.llr, self.n = self.decision, 0.0, 0
        return decided

    def expected_samples(self, under: str = "h1") -> float:
        """Wald's approximation of the expected sample size under H1 (a real drop) or H0."""
        p = self.p1 if under == "h1" else self.p0
        drift = p * self._pass + (1 - p) * self._fail
        a, b = self.alpha, self.beta
        if under == "h1":
            return (b * self.lower + (1 - b) * self.upper) / drift
        return ((1 - a) * self.lower + a * self.upper) / drift


@dataclass(slots=True)
class BernoulliMSPRT:
    """Always-valid test of H0: p = p0 with a normal mixture (variance ``tau2``) over the shift of the
    mean; rejects when the mixture likelihood ratio reaches 1/alpha (Ville's inequality)."""

    p0: float
    alpha: float = 0.01
    tau2: float = 0.0025  # prior variance of the shift: about a 5-point change
    n: int = 0
    total: float = 0.0  # sum of (x - p0)
    rejected: bool = False

    def update(self, passed: bool) -> bool:
        self.n += 1
        self.total += (1.0 if passed else 0.0) - self.p0
        self.rejected = self.rejected or self.log_ratio() >= math.log(1 / self.alpha)
        return self.rejected

    def log_ratio(self) -> float:
        sigma2 = self.p0 * (1 - self.p0)
        n, s = self.n, self.total
        return 0.5 * math.log(sigma2 / (sigma2 + n * self.tau2)) + \
            (self.tau2 * s * s) / (2 * sigma2 * (sigma2 + n * self.tau2))

    def p_value(self) -> float:
        """The always-valid p-value so far (the smallest alpha that would have rejected)."""
        return min(1.0, math.exp(-self.log_ratio())) if self.n else 1.0


def psi(expected: Iterable[str], actual: Iterable[str], *, floor: float = 1e-4) -> float:
    """Population stability index of two categorical samples (categories missing on one side get
    ``floor``): below 0.1 stable, 0.1-0.25 a shift, above 0.25 a large one (the usual reading)."""
    e, a = Counter(expected), Counter(actual)
    ne, na = sum(e.values()), sum(a.values())
    if not ne or not na:
        raise ValueError("both samples need values")
    out = 0.0
    for category in set(e) | set(a):
        pe, pa = max(e[category] / ne, floor), max(a[category] / na, floor)
        out += (pa - pe) * math.log(pa / pe)
    return out


@dataclass(frozen=True, slots=True)
class KS:
    statistic: float
    p_value: float


def ks(baseline: Sequence[float], current: Sequence[float]) -> KS:
    """Two-sample Kolmogorov-Smirnov test (scipy's, exact where it can be)."""
    from scipy import stats

    result = stats.ks_2samp(baseline, current)
    return KS(float(result.statistic), float(result.pvalue))


@dataclass(slots=True)
class Bonferroni:
    """A route's false-alarm budget spent across its detectors: each gets ``alpha / detectors``."""

    alpha: float
    detectors: int
    per: dict[str, float] = field(default_factory=dict)

    def share(self, name: str) -> float:
        self.per[name] = self.alpha / max(self.detectors, 1)
        return self.per[name]
