"""Drift detection for one route: its detectors against a baseline window, and how hard to sample it.

A ``RouteTest`` holds every detector of a route and spends the route's false-alarm budget ``alpha``
across them (Bonferroni): half goes to the sequential test of the pass rate, the other half is shared by
the window tests present in the baseline.

- **Pass rate** (and the judge's score, read as pass at ``judge_pass``): with ``pass_drop`` set, Wald's
  SPRT for "the rate fell by that much" (H0: p0 from the baseline, H1: p0 - drop); it restarts each time
  it accepts H0, which is also what a progressive rollout waits for (evidence of no regression). Without
  a specified drop, the always-valid mSPRT, which never accepts but may be looked at after every sample.
  A change whose old version answers beside it (a split label, a canary below 100%) runs a second SPRT,
  ``PairedPassTest``, on both versions' samples of the same minutes; only it decides a drop there
  (``ConcurrentPassTest``: the rate the first test holds it to is an estimate, which alone rolled good
  versions back whenever it came out high).
- **Distributions**, per window of ``window`` samples against the baseline: two-sample KS for output
  length, tokens per request, cost per request, retrieval score and judge score; a one-sided test of
  a rise (Fisher's exact test; the chi-squared statistic and the PSI as evidence) for the refusal and the
  guard-failure rates.

Time: a sample carries when it was answered and the rate it was drawn at. The pass-rate test climbs at most
``1 / evidence_hours`` of its threshold per hour (``RiseLimit``: a burst of minutes adds at most that much,
however many samples the raised rate draws from it); a steady baseline weighs each sample as the traffic it
stands for and takes none younger than twice that; a steady route's window tests are budgeted per day
(``alarm_days``) as well as per window. A change watch's SPRT halves its alpha after each clean cycle.

Sampling rate: ``progress()`` says how close the nearest detector is to its threshold (0: nowhere, 1:
there); ``SamplingPolicy.rate`` turns it into a rate between the base rate and a bound. The choice to
sample depends only on earlier samples, never on the one being drawn, so samples stay independent draws
of the route's traffic and the tests keep their error rates.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tollway.evals.drift import (
    BernoulliCUSUM,
    BernoulliMSPRT,
    BernoulliSPRT,
    RiseLimit,
    conditional_llr,
    hypergeom_sf,
    ks,
    psi,
)

CONTINUOUS = ("output_chars", "tokens", "cost", "retrieval", "judge")
RATES = ("refusal", "guard_failed")
MIN_VALUES = 20  # a window test needs this many values on each side


@dataclass(frozen=True, slots=True)
class Scored:
    """One live sample's scores and numbers (None: not measured for this sample)."""

    passed: bool | None
    refusal: bool = False
    guard_failed: bool = False
    output_chars: float = 0.0
    tokens: float = 0.0
    cost: float = 0.0
    retrieval: float | None = None
    judge: float | None = None
    at: float | None = None  # when it was answered (epoch seconds; None: time unknown, evidence is per sample)
    rate: float | None = None  # the sampling rate it was drawn at

    def value(self, name: str) -> float | None:
        v = getattr(self, name)
        return None if v is None else float(v)


@dataclass(frozen=True, slots=True)
class DriftSettings:
    alpha: float = 0.0025  # a route's false-alarm budget per window of samples (a change: per test), all detectors
    pass_drop: float | None = 0.05  # the pass-rate drop the SPRT is specified for (None: the mSPRT)
    beta: float = 0.01  # the SPRT's chance of missing a drop of that size (small: longer clean cycles)
    window: int = 200  # samples per window of the distribution tests
    baseline_samples: int = 1000  # a steady route is tested once its baseline has this many
    baseline_max: int = 5000  # the trailing baseline keeps at most this many
    min_samples: int = 200  # a progressive rollout's step needs this many scored samples
    judge_pass: float = 0.5  # a judge score at or above this counts as a pass
    sequential_share: float = 0.5  # the share of alpha the sequential tests get (the windows: the rest)
    evidence_hours: float = 3.0  # a pass-rate test climbs at most 1/this of its threshold per hour (0: no limit)
    rise_from: str = "peak"  # the climb's limit counts from the highest value of the span before ("point": its
    #                          value a span ago; drift.RiseLimit)
    alarm_days: float = 1000.0  # a steady route's window tests together: at most one false alarm in this many
    #                          days at the samples a day its baseline holds (0: per window only)
    rebase_windows: bool = True  # a steady route's window detector that breaches alone starts over alone: the
    #                          pass-rate tests keep their baseline and evidence (off: the whole route starts over)
    short_baseline: int = 200  # a moved label whose old version has fewer than baseline_samples samples (it
    #                          serves no more: its baseline cannot grow) is tested once it has this many...
    short_caution: float = 1.645  # ... against its pass rate less this many standard errors (its own noise)
    moved_caution: float = 1.645  # a moved label with a full baseline: its old version's rate less this many
    #                              standard errors (an estimate it can no longer refine; 0: the rate as it is)


@dataclass(frozen=True, slots=True)
class Finding:
    """A breach and its evidence."""

    detector: str
    test: str
    statistic: float
    threshold: float
    samples: int  # current samples the test read
    baseline: float | None  # the baseline's rate or median
    current: float | None
    p_value: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"detector": self.detector, "test": self.test, "statistic": round(self.statistic, 6),
                "threshold": round(self.threshold, 6), "samples": self.samples, "baseline": self.baseline,
                "current": self.current, "p_value": self.p_value, **self.extra}


def _rate(values: Iterable[bool]) -> tuple[int, int]:
    vs = list(values)
    return sum(vs), len(vs)


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def rise_p_value(base_hits: int, base_n: int, hits: int, n: int) -> float:
    """One-sided p-value of "the current rate is higher than the baseline's": Fisher's exact test. (The
    chi-squared approximation, halved, is too small in the tail a small alpha reads when the rate is rare:
    at a 3% refusal rate, 200-sample windows and alpha 0.00025 it raised 2.6 times its nominal alarms.)"""
    if hits * base_n <= base_hits * n:
        return 1.0
    # the current window's hits among all hits, the window's samples drawn from both (scipy's fisher_exact)
    return hypergeom_sf(hits, n + base_n, n, hits + base_hits)


def chi_squared(base_hits: int, base_n: int, hits: int, n: int) -> float:
    """The chi-squared statistic (Yates) of the two rates: evidence beside the exact p-value and the PSI
    (scipy's chi2_contingency with its correction: each cell moved half a count, at most, toward what is
    expected)."""
    table = [[hits, n - hits], [base_hits, base_n - base_hits]]
    if min(hits + base_hits, n + base_n - hits - base_hits) == 0:
        return 0.0
    total = n + base_n
    columns = (hits + base_hits, total - hits - base_hits)
    out = 0.0
    for row, row_total in zip(table, (n, base_n), strict=True):
        for observed, column_total in zip(row, columns, strict=True):
            expected = row_total * column_total / total
            moved = observed + math.copysign(min(0.5, abs(expected - observed)), expected - observed)
            out += (moved - expected) ** 2 / expected
    return out


def samples_per_day(samples: Sequence[Scored]) -> float | None:
    """How many samples a day a route's baseline held (None: no times, or under an hour of them)."""
    if len(samples) < 2:
        return None
    first, last = samples[0].at, samples[-1].at
    if first is None or last is None or last - first < 3600:
        return None
    return (len(samples) - 1) * 86400 / (last - first)


class PassTest:
    """The sequential test of a pass rate against the baseline's. With a specified drop: Wald's SPRT (a
    change under test: it decides, and an accepted "no drop" is a clean cycle) or, on a steady route where
    a drop may begin at any time, Page's CUSUM (the SPRT's ratio restarted at zero). Without one: the
    mSPRT. ``alpha`` is the false-alarm budget per cycle, for the CUSUM per ``window`` samples (an
    average run of window / alpha samples between false alarms)."""

    def __init__(self, name: str, p0: float, alpha: float, settings: DriftSettings, *, steady: bool = False) -> None:
        self.name, self.alpha, self.settings, self.steady = name, alpha, settings, steady
        self.accepted = 0  # times the SPRT accepted "no drop" (a cycle ended cleanly)
        self.n = self.hits = 0
        self.anchor(p0)

    def anchor(self, p0: float) -> None:
        """(Re)start against a baseline rate ``p0``. A baseline under 1% has no drop to find: the rate the
        tests would hold it to is clamped at 1% (their logarithms need it), so a route that never passes
        would look like a drop from 1% in every run of failures (a quick start under a load test whose
        answers are all cut by max_tokens alarmed every few seconds). It is tested again once its baseline
        passes (a window later, re-anchored)."""
        self.p0 = min(max(p0, 0.01), 0.99)
        self.anchored = self.n
        self.floored = p0 < 0.01
        drop = self.settings.pass_drop
        p1 = None if drop is None or self.p0 - drop <= 0.005 else self.p0 - drop
        self.sprt = self.cusum = self.msprt = None
        self.limit: RiseLimit | None = None
        hours = self.settings.evidence_hours
        if self.floored:
            pass
        elif p1 is not None and self.steady:
            self.cusum = BernoulliCUSUM(self.p0, p1, arl0=self.settings.window / self.alpha)
            self.limit = RiseLimit(self.cusum.h / hours, peak=self.settings.rise_from == "peak") if hours > 0 else None
        elif p1 is not None:  # each clean cycle halves the next one's alpha: a watch spends 2 alpha at most
            self.sprt = BernoulliSPRT(self.p0, p1, alpha=self.alpha / 2 ** self.accepted, beta=self.settings.beta)
            self.limit = (RiseLimit(self.sprt.upper / hours, peak=self.settings.rise_from == "peak") if hours > 0
                          else None)
        else:
            self.msprt = BernoulliMSPRT(self.p0, alpha=self.alpha)

    def update(self, passed: bool, at: float | None = None) -> tuple[Finding | None, bool]:
        """A finding on a drop; and whether a cycle ended (re-anchor on the baseline if you like): the
        SPRT accepted "no drop", or the CUSUM stands at zero a window after its last anchoring. ``at``:
        the sample's time (the statistic's climb is limited per hour, ``evidence_hours``)."""
        self.n += 1
        self.hits += passed
        if self.floored:  # nothing to find below a baseline that never passes; a window on, anchor again
            return None, self.n - self.anchored >= self.settings.window
        if self.cusum is not None:
            ceiling = None if self.limit is None else self.limit.ceiling(at, self.cusum.llr)
            if self.cusum.update(passed, ceiling):
                found = Finding(self.name, "cusum", self.cusum.llr, self.cusum.h, self.cusum.run,
                                round(self.p0, 4), round(self.cusum.run_passes / self.cusum.run, 4),
                                extra={"p1": round(self.cusum.p1, 4), "arl0": round(self.cusum.arl0),
                                       "alpha": self.alpha})
                self.cusum.restart()
                if self.limit is not None:
                    self.limit.reset()
                return found, False
            return None, self.cusum.llr == 0 and self.n - self.anchored >= self.settings.window
        if self.sprt is not None:
            decided = self.sprt.update(passed, None if self.limit is None else self.limit.ceiling(at, self.sprt.llr))
            if decided is not None and self.limit is not None:
                self.limit.reset()
            if decided == "no_drop":
                self.accepted += 1
                return None, True
            if decided == "drop":
                return Finding(self.name, "sprt", self.sprt.decided_llr, self.sprt.upper, self.sprt.decided_n,
                               round(self.p0, 4), round(self.hits / self.n, 4),
                               extra={"p1": round(self.sprt.p1, 4), "alpha": self.sprt.alpha}), False
            return None, False
        assert self.msprt is not None
        if self.msprt.update(passed) and self.msprt.total < 0:
            found = Finding(self.name, "msprt", self.msprt.log_ratio(), math.log(1 / self.alpha), self.msprt.n,
                            round(self.p0, 4), round(self.hits / self.n, 4), p_value=self.msprt.p_value(),
                            extra={"alpha": self.alpha})
            self.msprt = BernoulliMSPRT(self.p0, alpha=self.alpha)
            return found, False
        if self.msprt.rejected:  # an improvement: not a regression, start again
            self.msprt = BernoulliMSPRT(self.p0, alpha=self.alpha)
        return None, False

    @property
    def decisive(self) -> bool:
        """Whether it decides (an SPRT): a rollout waits for its "no drop"; the mSPRT's silence is its evidence."""
        return self.sprt is not None

    def progress(self) -> float:
        if self.floored:
            return 0.0
        if self.cusum is not None:
            return max(0.0, self.cusum.llr / self.cusum.h)
        if self.sprt is not None:
            return max(0.0, self.sprt.llr / self.sprt.upper)
        assert self.msprt is not None
        if self.msprt.total >= 0:
            return 0.0
        return max(0.0, self.msprt.log_ratio() / math.log(1 / self.alpha))


PAIRED_BLOCK = 50  # a paired test's block: at most this many samples of both versions together...
PAIRED_BLOCK_S = 3600.0  # ... answered within this many seconds of its first


class PairedPassTest:
    """The pass-rate test of a change whose old version keeps answering beside it (a split prompt label, a
    model canary below 100%): both versions' samples, cut into blocks of the same minutes, and in each
    block the question whether the new version took more than its share of the block's failures (Fisher's
    conditional test: ``drift.conditional_llr``), summed over blocks in Wald's SPRT. Against a pass rate
    estimated from the old version's samples (``PassTest``), an equally good version is judged a drop as
    often as the estimate happens to come out high: 36 / 5 / 1 of 400 cycles at 300 / 1,000 / 5,000
    baseline samples where alpha allows 0.5 (bench/drift/reference.py). Here the null hypothesis, "both
    fail alike", needs no rate: within a block the share of failures that falls to the new version is
    known from the block's counts alone, so alpha holds whatever the baseline, and an upstream hiccup or a
    wandering rate that hits both versions in the same minutes cancels out. The old version's rate is
    used for the alternative only (the odds ratio of ``p0`` against ``p0 - pass_drop``). The price: both
    versions' noise instead of one's, so more of the new version's samples to a decision.

    Same interface as ``PassTest`` for ``RouteTest``: ``update`` takes the new version's samples,
    ``held`` the old one's; a decision comes when a block closes (full, or its time is up when the next
    sample comes)."""

    decisive = True  # it decides (an SPRT): a rollout waits for its "no drop"

    def __init__(self, name: str, p0: float, alpha: float, settings: DriftSettings) -> None:
        self.name, self.alpha, self.settings = name, alpha, settings
        self.accepted = 0
        self.blocks = 0
        self._block = [0, 0, 0, 0]  # the open block: new samples, new failures, old samples, old failures
        self._block_at: float | None = None
        self._rates: list[float | None] = [None, None]  # the open block's sampling rate of each version
        self.anchor(p0)

    def anchor(self, p0: float) -> None:
        """(Re)start a cycle; ``p0``, the old version's rate, sets the drop it is specified for. Each clean
        cycle halves the next one's alpha, as a change's SPRT does."""
        drop = self.settings.pass_drop
        assert drop is not None
        self.p0 = min(max(p0, 0.01), 0.99)
        self.p1 = max(self.p0 - drop, 0.005)
        self.log_odds_ratio = math.log((1 - self.p1) / self.p1 * self.p0 / (1 - self.p0))
        alpha, beta = self.alpha / 2 ** self.accepted, self.settings.beta
        self.upper, self.lower = math.log((1 - beta) / alpha), math.log(beta / (1 - alpha))
        self.llr = 0.0
        self.cycle = [0, 0, 0, 0]  # this cycle's closed blocks, as ``_block``

    def update(self, passed: bool, at: float | None = None, rate: float | None = None) -> tuple[Finding | None, bool]:
        """A sample of the new version: a finding on a drop, and whether a cycle ended ("no drop").
        ``rate``: the sampling rate it was drawn at."""
        return self._add(0, passed, at, rate)

    def held(self, passed: bool, at: float | None = None, rate: float | None = None) -> tuple[Finding | None, bool]:
        """A sample of the old version, answered beside the new one."""
        return self._add(2, passed, at, rate)

    def _add(self, arm: int, passed: bool, at: float | None, rate: float | None) -> tuple[Finding | None, bool]:
        out: tuple[Finding | None, bool] = (None, False)
        block = self._block
        # A block holds each version at one sampling rate: were one version sampled harder in some of its
        # minutes (adaptive sampling rises after a burst of failures), those minutes would weigh more on its
        # side than on the other's, and a burst that hit both alike would look like a difference.
        if block[0] + block[2] and (
                (at is not None and self._block_at is not None and at - self._block_at >= PAIRED_BLOCK_S)
                or (rate is not None and self._rates[arm // 2] not in (None, rate))):
            out = self._close()
            block = self._block
        if block[0] + block[2] == 0:
            self._block_at = at
        self._rates[arm // 2] = rate
        block[arm] += 1
        block[arm + 1] += not passed
        if out == (None, False) and block[0] + block[2] >= PAIRED_BLOCK:
            out = self._close()
        return out

    def _block_llr(self, block: list[int]) -> float:
        return conditional_llr(block[1], block[0], block[2], block[1] + block[3], self.log_odds_ratio)

    def _close(self) -> tuple[Finding | None, bool]:
        block, self._block, self._block_at, self._rates = self._block, [0, 0, 0, 0], None, [None, None]
        self.blocks += 1
        self.llr += self._block_llr(block)
        self.cycle = [a + b for a, b in zip(self.cycle, block, strict=True)]
        if self.llr >= self.upper:
            n, failed, held_n, held_failed = self.cycle
            found = Finding(self.name, "sprt", self.llr, self.upper, n,
                            round(1 - held_failed / held_n, 4) if held_n else None,
                            round(1 - failed / n, 4) if n else None,
                            extra={"paired": True, "held_samples": held_n, "p0": round(self.p0, 4),
                                   "p1": round(self.p1, 4), "odds_ratio": round(math.exp(self.log_odds_ratio), 4),
                                   "alpha": self.alpha / 2 ** self.accepted})
            self.llr, self.cycle = 0.0, [0, 0, 0, 0]
            return found, False
        if self.llr <= self.lower:
            self.accepted += 1
            return None, True
        return None, False

    def progress(self) -> float:
        """How far toward a drop, the open block counted as it stands."""
        return max(0.0, (self.llr + self._block_llr(self._block)) / self.upper)


class ConcurrentPassTest:
    """The pass-rate test of a change whose old version answers beside it: two SPRTs on the same samples.
    ``PairedPassTest`` alone decides a drop (its alpha holds whatever the old version's estimated rate, and
    a burst or a wander that hits both versions cancels out); either accepting "no drop" ends a cycle, each
    at half the ``beta`` so the two together miss a drop no more often than one would. The test against
    the estimated rate (``PassTest``) accepts much sooner where failures are rare (it learns from every
    pass; the paired test only from failures), so a rollout moves on about as fast as it did with it alone.
    Its "drop", which an estimate that came out high makes too often, is no breach; but from then on only
    the paired test decides, and a "no drop" it accepted before counts no more (restarted and asked again,
    it would accept a worse version sooner or later; accepted early, it would move a rollout on past the
    drop it saw since)."""

    decisive = True

    def __init__(self, name: str, p0: float, alpha: float, settings: DriftSettings) -> None:
        self.name, self.alpha = name, alpha
        halved = replace(settings, beta=settings.beta / 2)
        self.plain = PassTest(name, p0, alpha, halved)
        self.paired = PairedPassTest(name, p0, alpha, halved)
        self._ended = (False, False)  # which of the two ended a cycle on the last sample
        self.outvoted = False  # the test against the estimate saw a drop: it no longer accepts

    @property
    def accepted(self) -> int:
        return self.paired.accepted + (0 if self.outvoted else self.plain.accepted)

    @property
    def p0(self) -> float:
        return self.plain.p0

    def update(self, passed: bool, at: float | None = None, rate: float | None = None) -> tuple[Finding | None, bool]:
        plain_ended = False
        if not self.outvoted:
            drop, plain_ended = self.plain.update(passed, at)
            self.outvoted = drop is not None
        found, paired_ended = self.paired.update(passed, at, rate)
        self._ended = (plain_ended, paired_ended)
        return found, found is None and (plain_ended or paired_ended)

    def held(self, passed: bool, at: float | None = None, rate: float | None = None) -> tuple[Finding | None, bool]:
        found, paired_ended = self.paired.held(passed, at, rate)
        self._ended = (False, paired_ended)
        return found, found is None and paired_ended

    def anchor(self, p0: float) -> None:
        """A new cycle for whichever test ended one (``RouteTest`` calls this when a cycle ended)."""
        plain_ended, paired_ended = self._ended
        if plain_ended:
            self.plain.anchor(p0)
        if paired_ended:
            self.paired.anchor(p0)
        self._ended = (False, False)

    def progress(self) -> float:
        return self.paired.progress()


def _pass_value(name: str, s: Scored, judge_pass: float) -> bool | None:
    if name == "pass_rate":
        return s.passed
    return None if s.judge is None else s.judge >= judge_pass


class RouteTest:
    """Every detector of one route against a baseline window. The baseline may grow while the test runs
    (a canary's primary keeps answering; a steady route's trailing window moves on): window tests read it
    as it is when their window ends, and a sequential test re-anchors on it each time it accepts."""

    def __init__(self, baseline: Sequence[Scored], settings: DriftSettings, *, steady: bool = False,
                 cautious: float = 0.0, paired: bool = False) -> None:
        self.settings = settings
        self.baseline = baseline
        self.steady = steady
        self.cautious = cautious  # the pass-rate tests' p0: this many standard errors below the baseline's rate
        #                          (a short baseline's rate is noisy: held to it, a good change is rolled back)
        self.windows = 0  # windows tested so far
        self.n = 0
        self.findings: list[Finding] = []
        self._window: list[Scored] = []
        self._window_progress = 0.0
        # window detectors that breached on a steady route whose pass-rate tests did not: each compared from
        # then on with the windows after its breach (its own baseline), tested again once that holds
        # ``baseline_samples`` (one alert per shift), while the pass-rate tests keep theirs and their evidence
        self.rebased: dict[str, deque[Scored]] = {}
        self.windowed = [name for name in CONTINUOUS if len(self._values(name)) >= MIN_VALUES] + list(RATES)
        self.pass_tests: list[PassTest | ConcurrentPassTest] = []
        sequential = [name for name in ("pass_rate", "judge_pass") if len(self._passes(name)) >= MIN_VALUES]
        for name in sequential:
            p0, alpha = self._p0(name), settings.alpha * settings.sequential_share / len(sequential)
            # paired: the baseline's version answers beside the one under test (``held`` gets its samples)
            if paired and settings.pass_drop is not None and p0 >= 0.01 and p0 - settings.pass_drop > 0.005:
                self.pass_tests.append(ConcurrentPassTest(name, p0, alpha, settings))
            else:
                self.pass_tests.append(PassTest(name, p0, alpha, settings, steady=steady))
        self.window_alpha = settings.alpha * ((1 - settings.sequential_share) if sequential else 1) / max(
            len(self.windowed), 1)
        per_day = samples_per_day(baseline) if steady and settings.alarm_days > 0 else None
        if per_day:  # a busy route runs many windows a day: their budget is per day, not per window
            self.window_alpha = min(self.window_alpha, settings.window / (
                settings.alarm_days * per_day * max(len(self.windowed), 1)))

    def _values(self, name: str, baseline: Iterable[Scored] | None = None) -> list[float]:
        return [v for s in (self.baseline if baseline is None else baseline) if (v := s.value(name)) is not None]

    def rebase(self, names: Iterable[str]) -> None:
        """These window detectors breached: from now on each is compared with the windows that follow."""
        for name in names:
            self.rebased[name] = deque(maxlen=self.settings.baseline_max)

    def _passes(self, name: str) -> list[bool]:
        return [v for s in self.baseline if (v := _pass_value(name, s, self.settings.judge_pass)) is not None]

    def _p0(self, name: str) -> float:
        """The baseline's pass rate, each sample weighing as the traffic it stands for (1 / its sampling
        rate): minutes sampled at a raised rate (a hiccup, a detector's false start) would otherwise weigh
        as hours of traffic and pull the rate the route is held to."""
        passes = weights = squares = 0.0
        for s in self.baseline:
            if (v := _pass_value(name, s, self.settings.judge_pass)) is not None:
                w = 1.0 / s.rate if s.rate else 1.0
                passes += w * v
                weights += w
                squares += w * w
        p = passes / weights
        if not self.cautious:
            return p
        effective = weights * weights / squares  # Kish's effective sample size of the weighted rate
        return p - self.cautious * math.sqrt(p * (1 - p) / effective)

    @property
    def detectors(self) -> list[str]:
        return [t.name for t in self.pass_tests] + self.windowed

    def update(self, s: Scored) -> list[Finding]:
        self.n += 1
        found = self._sequential(s, held=False)
        self._window.append(s)
        if len(self._window) >= self.settings.window:
            found += self._test_window()
            self._window = []
        self.findings += found
        return found

    def held(self, s: Scored) -> list[Finding]:
        """A sample of the baseline's version answered beside the one under test: the paired tests read it
        (the window tests read the baseline as it stands when their window ends)."""
        found = self._sequential(s, held=True)
        self.findings += found
        return found

    def _sequential(self, s: Scored, *, held: bool) -> list[Finding]:
        found: list[Finding] = []
        for test in self.pass_tests:
            value = _pass_value(test.name, s, self.settings.judge_pass)
            if value is None:
                continue
            if isinstance(test, ConcurrentPassTest):
                finding, cycle_ended = (test.held if held else test.update)(value, s.at, s.rate)
            elif held:
                continue
            else:
                finding, cycle_ended = test.update(value, s.at)
            if finding is not None:
                found.append(finding)
            elif cycle_ended:
                test.anchor(self._p0(test.name))
        return found

    def _alpha(self) -> float:
        """This window's alpha per detector. A steady route's is the same each window (budgeted per day); a
        change's watch spends its budget over its windows, ``6 / (pi^2 k^2)`` of it on the k-th, so a watch
        that runs a week at a busy route's rate (dozens of windows) raises at most its budget in all (spent per
        window, a week at 30k requests a day rolled back several percent of good versions on window tests)."""
        if self.steady:
            return self.window_alpha
        return self.window_alpha * 6 / (math.pi ** 2 * self.windows ** 2)

    def _test_window(self) -> list[Finding]:
        found, closest = [], 0.0
        base_v: float | None
        cur_v: float | None
        self.windows += 1
        alpha = self._alpha()
        log_alpha = math.log(alpha)
        for name in self.windowed:
            evidence: dict[str, Any] = {}
            own = self.rebased.get(name)
            baseline = self.baseline if own is None else own
            if own is not None and len(own) < self.settings.baseline_samples:
                continue  # its baseline after its breach is still forming
            if name in RATES:
                base_hits, base_n = _rate(bool(getattr(s, name)) for s in baseline)
                hits, n = _rate(bool(getattr(s, name)) for s in self._window)
                if not base_n:
                    continue
                p, stat = rise_p_value(base_hits, base_n, hits, n), chi_squared(base_hits, base_n, hits, n)
                evidence["psi"] = round(psi(["y"] * base_hits + ["n"] * (base_n - base_hits),
                                            ["y"] * hits + ["n"] * (n - hits)), 6)
                test = "rise"
                base_v, cur_v = round(base_hits / base_n, 4), round(hits / n, 4)
            else:
                base = self._values(name, baseline)
                values = [v for s in self._window if (v := s.value(name)) is not None]
                if len(values) < MIN_VALUES or len(base) < MIN_VALUES:
                    continue
                result = ks(base, values)
                p, stat, test = result.p_value, result.statistic, "ks"
                base_m, cur_m = _median(base), _median(values)
                base_v = None if base_m is None else round(base_m, 6)
                cur_v = None if cur_m is None else round(cur_m, 6)
            closest = max(closest, min(1.0, math.log(max(p, 1e-300)) / log_alpha))
            if p < alpha:
                found.append(Finding(name, test, stat, alpha, len(self._window), base_v, cur_v,
                                     p_value=p, extra={"window": self.settings.window, "alpha": alpha, **evidence}))
        self._window_progress = closest
        for own in self.rebased.values():
            own.extend(self._window)
        return found

    def progress(self) -> float:
        """How close the nearest detector is to raising a breach, 0..1."""
        return min(1.0, max([self._window_progress, *(t.progress() for t in self.pass_tests)]))

    def no_regression(self) -> bool:
        """Evidence enough to move a progressive rollout on: ``min_samples`` samples, no breach, and each
        SPRT has accepted "no drop" at least once (an mSPRT never accepts: its silence is the evidence)."""
        return self.n >= self.settings.min_samples and not self.findings and self.each_accepted()

    def each_accepted(self) -> bool:
        """Each pass-rate test that decides (an SPRT) has accepted "no drop" at least once."""
        return all(t.accepted > 0 or not t.decisive for t in self.pass_tests)


class SteadyWatch:
    """A route with no change in flight, against its own trailing baseline: the first
    ``baseline_samples`` samples, then every sample once it is ``lag`` samples and twice
    ``evidence_hours`` old and the pass-rate CUSUM has stood at zero since it came (so a shift the
    tests have not yet judged, at the pace the rise limit lets them, does not leak into what they
    compare with), at most ``baseline_max``. After a breach of a pass-rate test
    the route starts over: the new behaviour is the next baseline (one alert per shift, not one per window). A
    breach of window detectors alone (refusals, guard failures, lengths, costs) starts those over alone, each on
    the windows after it (``RouteTest.rebase``): a drop in the pass rate that began meanwhile stays in the
    pass-rate test's evidence instead of becoming the next baseline."""

    def __init__(self, settings: DriftSettings, lag: int | None = None) -> None:
        self.settings = settings
        self.lag = lag if lag is not None else 3 * settings.window
        self.baseline: deque[Scored] = deque(maxlen=settings.baseline_max)
        self.pending: deque[Scored] = deque()
        self.test: RouteTest | None = None
        self.breached: tuple[int, int, list[str]] | None = None  # the last breach's samples, baseline size and
        #                                                          detectors (its evidence; not the test: that
        #                                                          would keep its baseline alive)

    def seed(self, history: Sequence[Scored]) -> None:
        """The route's earlier samples, oldest first, as its baseline (a monitor taking over)."""
        self.baseline.extend(history)
        if len(self.baseline) >= self.settings.baseline_samples:
            self.test = RouteTest(self.baseline, self.settings, steady=True)

    def observe(self, s: Scored) -> list[Finding]:
        if self.test is None:
            self.baseline.append(s)
            if len(self.baseline) >= self.settings.baseline_samples:
                self.test = RouteTest(self.baseline, self.settings, steady=True)
            return []
        found = self.test.update(s)
        self.pending.append(s)
        if found:
            self.breached = (self.test.n, len(self.baseline), self.test.detectors)
            breached = {f.detector for f in found}
            if self.settings.rebase_windows and not breached & {t.name for t in self.test.pass_tests}:
                self.test.rebase(breached)  # the pass-rate tests go on, their baseline and evidence kept
            else:  # the route starts over
                self.baseline = deque(self.pending, maxlen=self.settings.baseline_max)
                self.pending.clear()
                self.test = None
                return found
        held = max([self.lag, *(t.cusum.run for t in self.test.pass_tests
                                if isinstance(t, PassTest) and t.cusum is not None)])
        hold = None if s.at is None else s.at - 2 * 3600 * self.settings.evidence_hours
        while len(self.pending) > held and (hold is None or (self.pending[0].at or 0.0) < hold):
            self.baseline.append(self.pending.popleft())
        if len(self.pending) > held + 2 * self.settings.baseline_max:
            self._thin(held)
        return found

    def _thin(self, held: int) -> None:
        """Keep every other sample of those waiting beyond the newest ``held``, each now standing for twice
        the traffic (half its sampling rate). A busy route waits hours' worth of samples to enter its baseline
        (at 50 samples a second, six hours are a million: a gateway's memory grew with them); the baseline
        keeps ``baseline_max`` of them at most, so a thinned stretch still fills it, spread over a longer time."""
        waiting = list(self.pending)
        older, newest = waiting[:len(waiting) - held], waiting[len(waiting) - held:]
        self.pending = deque([replace(x, rate=x.rate / 2 if x.rate else 0.5) for x in older[::2]]
                             + newest)

    def progress(self) -> float:
        return 0.0 if self.test is None else self.test.progress()


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """The share of a route's live answers to score: ``base`` while its detectors are far from their
    thresholds, rising linearly to ``ceiling`` as the nearest one gets from ``start`` to ``full`` of
    the way there. (``start`` 0.15 before the rise limit counted from the peak of the hour before: at 30k
    requests a day 0.10 finds a 5-point drop 3.1-3.8x sooner than a fixed 2% instead of 2.1-2.7x, for about
    35% more samples scored on unchanged traffic; bench/RESULTS.md.)"""

    base: float = 0.02
    ceiling: float = 0.25
    start: float = 0.10
    full: float = 0.45

    def rate(self, progress: float) -> float:
        if progress <= self.start or self.ceiling <= self.base:
            return self.base
        share = min(1.0, (progress - self.start) / max(self.full - self.start, 1e-9))
        return self.base + (self.ceiling - self.base) * share
