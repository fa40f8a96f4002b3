"""Sequential tests and distribution distances for drift detection (groundwork for the live quality loop).

- ``BernoulliSPRT``: Wald's sequential probability ratio test of a pass rate, H0: p = p0 against a
  specified drop H1: p = p1 < p0, with error rates alpha and beta; its expected sample sizes (Wald's
  approximations) say what an optimal detector needs.
- ``BernoulliCUSUM``: Page's CUSUM, the SPRT's ratio restarted at zero, for a drop that may start at any
  time in steady traffic (the fastest detector for a given rate of false alarms).
- ``BernoulliMSPRT``: a mixture SPRT (normal mixture over the effect, on the centred observations), an
  always-valid test of "the rate is no longer p0" when no drop is specified: looking after every sample
  does not inflate its false-alarm rate (Johari, Pekelis and Walsh's construction).
- ``psi``: the population stability index of two categorical (or binned) distributions.
- ``ks``: the two-sample Kolmogorov-Smirnov test, exact (scipy's numbers, without loading scipy: 60 MB of a
  gateway's memory) for continuous distributions (lengths, tokens, cost per request).
- ``hypergeom_sf``: the hypergeometric tail (Fisher's exact test's one-sided p-value).
- ``conditional_llr``: one block of two arms' samples, the log-likelihood ratio of how its failures fell
  between them (Fisher's noncentral hypergeometric against the central one): the step of a two-sample
  sequential test whose null needs no estimate of the common rate.

Pure; the live loop feeds them per route.
"""

from __future__ import annotations

import math
from collections import Counter, deque
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

    def update(self, passed: bool, ceiling: float | None = None) -> str | None:
        """One scored sample; the decision once a boundary is crossed (then the test restarts). ``ceiling``:
        the most the ratio may stand at after it (evidence arriving faster than the caller allows)."""
        self.n += 1
        self.llr += self._pass if passed else self._fail
        if ceiling is not None and self.llr > ceiling:
            self.llr = ceiling
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
class BernoulliCUSUM:
    """Page's CUSUM for a drop of a pass rate from p0 to p1 that may start at any time: the SPRT's
    log-likelihood ratio, restarted at zero whenever it falls below it (an SPRT with its lower boundary
    at zero, so it never spends samples climbing out of an accepted "no drop"). It signals at ``h``,
    chosen for an average run of ``arl0`` samples between false alarms on unchanged traffic (Siegmund's
    approximation, conservative for Bernoulli steps: their overshoot lengthens the run). Lorden and
    Moustakides: for that false-alarm rate no test finds the drop sooner in the worst case."""

    p0: float
    p1: float
    arl0: float = 80_000.0
    llr: float = 0.0
    run: int = 0  # samples since the statistic last stood at zero (the evidence of a signal)
    run_passes: int = 0  # passes among them
    h: float = field(init=False)
    _pass: float = field(init=False)
    _fail: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.p1 < self.p0 < 1:
            raise ValueError("need 0 < p1 < p0 < 1")
        if self.arl0 <= 1:
            raise ValueError("arl0 must exceed 1")
        self._pass = math.log(self.p1 / self.p0)
        self._fail = math.log((1 - self.p1) / (1 - self.p0))
        self.h = cusum_threshold(self.arl0, self.kl0())

    def kl0(self) -> float:
        """The information per sample against H1 while nothing changed, KL(p0 || p1)."""
        return -(self.p0 * self._pass + (1 - self.p0) * self._fail)

    def kl1(self) -> float:
        """The information per sample for H1 once the drop happened, KL(p1 || p0)."""
        return self.p1 * self._pass + (1 - self.p1) * self._fail

    def update(self, passed: bool, ceiling: float | None = None) -> bool:
        """One scored sample; True when the statistic reaches ``h`` (then it restarts from zero).
        ``ceiling``: the most the statistic may stand at after it (see ``RiseLimit``)."""
        self.llr = max(0.0, self.llr + (self._pass if passed else self._fail))
        if ceiling is not None and self.llr > ceiling:
            self.llr = ceiling
        if self.llr > 0:
            self.run += 1
            self.run_passes += passed
        else:
            self.run = self.run_passes = 0
        return self.llr >= self.h

    def restart(self) -> None:
        self.llr, self.run, self.run_passes = 0.0, 0, 0

    def expected_delay(self) -> float:
        """Siegmund's approximation of the mean samples from a drop (statistic at zero) to the signal."""
        return (self.h + math.exp(-self.h) - 1) / self.kl1()


class RiseLimit:
    """How fast a sequential statistic may climb in time: at most ``limit`` above where it stood
    ``span_s`` seconds before. A drop that lasts climbs at its own pace until the limit binds, then
    ``limit`` per ``span_s``; a burst of failures lasting minutes (an upstream hiccup, the sampling rate
    raised by the first of them) adds at most ``limit`` per span, however many samples it brings. Samples
    with no time are not limited.

    "Where it stood" is, with ``peak`` (the default), the highest it stood in the span before the last
    one; without, its value at the last sample at least a span old. The limit cuts a climb's upward
    swings but not its downward ones, so held to a single point a real drop sampled densely (hundreds of
    samples an hour, each swing of the hour's sum some units) kept falling back from its cap and took
    hours longer to reach the threshold; a burst's climb from the peak of the hour before it is still at
    most ``limit`` per span."""

    __slots__ = ("before", "limit", "older", "peak", "recent", "span_s")

    def __init__(self, limit: float, span_s: float = 3600.0, *, peak: bool = True) -> None:
        self.limit, self.span_s, self.peak = limit, span_s, peak
        self.recent: deque[tuple[float, float]] = deque()  # (time, value) of the last span
        self.older: deque[tuple[float, float]] = deque()  # the span before it: its running maxima (peak)
        self.before = 0.0  # the value at the last sample older than the span (a fresh statistic: zero)

    def ceiling(self, at: float | None, value: float) -> float | None:
        """The statistic stands at ``value`` when a sample of time ``at`` comes: the most it may stand at
        after that sample."""
        if at is None:
            return None
        recent, older = self.recent, self.older
        recent.append((at, value))
        while recent[0][0] < at - self.span_s:
            self.before = (left := recent.popleft())[1]
            if self.peak:  # a deque of decreasing values: its first is the span's highest
                while older and older[-1][1] <= left[1]:
                    older.pop()
                older.append(left)
        if not self.peak:
            return self.before + self.limit
        while older and older[0][0] < at - 2 * self.span_s:
            older.popleft()
        return (older[0][1] if older else self.before) + self.limit

    def reset(self) -> None:
        self.recent.clear()
        self.older.clear()
        self.before = 0.0


def cusum_threshold(arl0: float, kl0: float) -> float:
    """The CUSUM threshold h with (e^h - h - 1) / KL(p0 || p1) = arl0 (Siegmund), by bisection."""
    target = arl0 * kl0
    lo, hi = 0.0, 1.0
    while math.exp(hi) - hi - 1 < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.exp(mid) - mid - 1 < target else (lo, mid)
    return hi


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


EXACT_KS_MAX = 10_000  # scipy's bound for its exact two-sample test ('auto'); above it, scipy's asymptotic one


def ks(baseline: Sequence[float], current: Sequence[float]) -> KS:
    """Two-sample, two-sided Kolmogorov-Smirnov test: the statistic and p-value ``scipy.stats.ks_2samp``
    gives (exact up to 10,000 samples a side, as scipy's 'auto' is; a unit test holds the two together),
    computed here because importing scipy.stats costs a gateway ~60 MB of memory for this one test. Above
    that size scipy's asymptotic distribution is used (scipy is imported then)."""
    import numpy as np

    a, b = np.sort(np.asarray(baseline, dtype=float)), np.sort(np.asarray(current, dtype=float))
    n1, n2 = len(a), len(b)
    if min(n1, n2) == 0:
        raise ValueError("ks needs two non-empty samples")
    both = np.concatenate([a, b])
    diffs = np.searchsorted(a, both, side="right") / n1 - np.searchsorted(b, both, side="right") / n2
    d = float(max(np.clip(-diffs.min(), 0, 1), diffs.max()))
    if max(n1, n2) > EXACT_KS_MAX:
        from scipy import stats

        return KS(d, float(stats.ks_2samp(a, b).pvalue))
    g = math.gcd(n1, n2)
    lcm = (n1 // g) * n2
    h = round(d * lcm)  # the statistic on the lattice of attainable values, as scipy rounds it
    d = h / lcm
    return KS(d, 1.0 if h == 0 else _ks_outside(n1, n2, g, h))


def _ks_outside(m: int, n: int, g: int, h: int) -> float:
    """P(D >= h / lcm(m, n)) for two samples of ``m`` and ``n`` under H0: one minus the share of the
    binom(m + n, n) lattice paths from (0, 0) to (m, n) that stay strictly inside |x / m - y / n| < h / lcm,
    i.e. |(n / g) x - (m / g) y| < h (Hodges' method). A column of path counts is the running sum of the
    previous column over the band, kept scaled (its logarithm apart) so it never overflows."""
    import numpy as np

    if m > n:  # iterate over the shorter side, the columns along the longer one
        m, n = n, m
    mg, ng = m // g, n // g
    counts = np.zeros(n + 1)
    counts[0] = 1.0
    log_scale = 0.0
    below = 0  # the previous column's band starts here
    for x in range(m + 1):
        # the band of this column: ng x - h < mg y < ng x + h (it only moves up as x grows)
        lo = max((ng * x - h) // mg + 1, 0)
        hi = min(-((-ng * x - h) // mg) - 1, n)  # ceil((ng x + h) / mg) - 1
        if lo > hi:
            return 1.0
        counts[below:lo] = 0.0  # under the band now: no path passes there
        band = np.cumsum(counts[lo:hi + 1])
        top = float(band[-1])  # a running sum of non-negative counts: its last is its largest
        if top == 0.0:
            return 1.0
        counts[lo:hi + 1] = band / top
        log_scale += math.log(top)
        below = lo
    if counts[n] == 0.0:
        return 1.0
    log_binom = math.lgamma(m + n + 1) - math.lgamma(m + 1) - math.lgamma(n + 1)
    inside_share = math.exp(math.log(counts[n]) + log_scale - log_binom)
    return min(max(1.0 - inside_share, 0.0), 1.0)


def _log_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _log_sum_exp(terms: list[float]) -> float:
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def hypergeom_sf(k: int, total: int, marked: int, drawn: int) -> float:
    """P(X >= k) for X the marked items among ``drawn`` taken from ``total`` of which ``marked`` are marked
    (scipy's ``hypergeom.sf(k - 1, total, marked, drawn)``): the sum of the upper tail's terms."""
    low, high = max(k, 0, drawn - (total - marked)), min(marked, drawn)
    if low > high:
        return 0.0

    base = _log_choose(total, drawn)
    terms = [_log_choose(marked, x) + _log_choose(total - marked, drawn - x) - base for x in range(low, high + 1)]
    return min(1.0, math.exp(_log_sum_exp(terms)))


def conditional_llr(x: int, n: int, held_n: int, failures: int, log_odds_ratio: float) -> float:
    """One block of a two-arm comparison: ``n`` samples of the arm under test, ``held_n`` of the other,
    ``failures`` in all, ``x`` of them in the arm under test. Given those margins, ``x`` follows the
    hypergeometric law when both arms fail alike, whatever their common rate, and Fisher's noncentral
    hypergeometric law when the tested arm's odds of failing are ``exp(log_odds_ratio)`` times the other's.
    Returns the log of the second's probability over the first's. A block whose margins leave one
    outcome (no failure, or one arm empty) returns 0: it says nothing."""
    low, high = max(0, failures - held_n), min(n, failures)
    if low >= high:
        return 0.0
    central = [_log_choose(n, k) + _log_choose(held_n, failures - k) for k in range(low, high + 1)]
    shifted = [c + k * log_odds_ratio for c, k in zip(central, range(low, high + 1), strict=True)]
    return x * log_odds_ratio - _log_sum_exp(shifted) + _log_sum_exp(central)


@dataclass(slots=True)
class Bonferroni:
    """A route's false-alarm budget spent across its detectors: each gets ``alpha / detectors``."""

    alpha: float
    detectors: int
    per: dict[str, float] = field(default_factory=dict)

    def share(self, name: str) -> float:
        self.per[name] = self.alpha / max(self.detectors, 1)
        return self.per[name]
