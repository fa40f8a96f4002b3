"""The live quality loop on traffic shapes: quiet nights, weekends, upstream bursts, a wandering base rate.

Drives the monitor's own pass (``tollway.gateway.quality.watches.Watches``: the steady watch each route
gets, what each watch finds, the sampling rate each route asks for, read back every simulated minute)
with simulated traffic, minute by minute:

- **volume**: 2k, 10k or 30k requests a day; **curve**: ``flat``, ``day`` (a day curve peaking at 14:00
  at 12x its 02:00 trough, weekends at 45% of a weekday) or ``office`` (two peaks, 10:00 and 15:30, a
  lunch dip, nights at 3%, weekends at 20%: held out, see below);
- **bursts**: once a week at a random time, ``burst`` minutes in which a share of answers fail on top of
  the usual failures (an upstream hiccup, not a regression). The same share of attempts fails at the
  upstream meanwhile (0.5% outside bursts): the ledger's failed attempts, from which the monitor marks
  upstream incidents (``tollway.gateway.quality.incidents``), fed minute by minute before that minute's
  samples. ``--silent``: bursts fail no attempt (the upstream answers 200 with bad text), nothing to mark;
- **wander**: the base pass rate drifting by up to +/- ``wander`` points over weeks (two slow waves of
  random phase);
- **base** pass rates 60-97%; **drops** of 3, 5 and 10 points.

Each sample is the detectors' ``Scored`` (pass, refusal 3%, guard failures 1%, log-normal tokens as in
``detect.py``) with its time. Four measures:

- ``detect``: after a warm-up long enough for the route's baseline, a drop at a random time of the week;
  the scored samples and live requests until the route's steady watch raises it (missed: not within 30
  days), with fixed 2% sampling and with the adaptive policy, beside Wald's expected SPRT sample size
  for the drop at alpha 0.01, beta 0.05;
- ``alarms``: unchanged traffic (bursts and wander included), every alarm of every detector, per 100 days;
- ``moves``: a prompt label moved to a version exactly as good as the old one, watched for seven days
  (the monitor's prompt watch: the SPRT against the old version's samples) with bursts: the share of
  moves rolled back; and moves to a version 5 points worse: the share rolled back within the week, and
  the new version's scored samples until then;
- ``rollouts``: a progressive prompt rollout (5, 20, 50, 100% of the label's users) to a version as good,
  and to one 5 points worse: rolled back, completed (in how many days) or stalled (``rollout_run``).

    python bench/drift/shapes.py [--runs 100] [--days 400] [--moves 200] [--rollouts 100] [--jobs 2]
                                 [--held-out] [--silent] [--only detect,alarms,moves,rollouts]

Without ``--held-out`` it runs the tuning shapes; with it, only the held-out ones (``office`` curve,
45-minute bursts at 40% failures, base 75%), which no setting was chosen on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from tollway.evals import DriftSettings, SamplingPolicy, Scored
from tollway.evals.drift import BernoulliSPRT
from tollway.gateway.quality.incidents import Incidents, IncidentSettings
from tollway.gateway.quality.watches import Row, Watch, Watches, prompt_key, version_key

DAY = 1440  # minutes
WEEK = 7 * DAY
MAX_DAYS = 30  # a drop not found within this many days is missed


@dataclasses.dataclass(frozen=True)
class Shape:
    per_day: int = 10_000
    curve: str = "day"
    base: float = 0.90
    wander: float = 0.0  # points of the base rate's slow drift, either way
    burst: int = 0  # minutes of a weekly burst (0: none)
    burst_fail: float = 0.30  # the share of answers a burst fails on top of the usual failures
    silent: bool = False  # a burst that fails no attempt (the upstream answers 200 with bad text): no incident
    attempt_fail: float = 0.005  # failed attempts outside bursts (a burst fails ``burst_fail`` of them)

    def label(self) -> str:
        parts = [f"{self.per_day // 1000}k/day", self.curve, f"base {self.base:.0%}"]
        if self.wander:
            parts.append(f"wander +/-{self.wander * 100:g}")
        if self.burst:
            parts.append(f"{'silent ' if self.silent else ''}bursts {self.burst} min at {self.burst_fail:.0%}")
        return ", ".join(parts)


def _relative(kind: str, minutes: np.ndarray) -> np.ndarray:
    hour = (minutes % DAY) / 60.0
    weekday = (minutes // DAY) % 7 < 5
    if kind == "flat":
        return np.ones_like(hour)
    if kind == "day":  # peak 14:00 at 12x the 02:00 trough; weekends 45%
        return (1 + 11 * ((1 - np.cos(2 * np.pi * (hour - 2) / 24)) / 2) ** 2) * np.where(weekday, 1.0, 0.45)
    if kind == "office":  # two peaks and a lunch dip; nights 3%; weekends 20%
        peaks = np.exp(-((hour - 10) ** 2) / 3) + 0.8 * np.exp(-((hour - 15.5) ** 2) / 4)
        return (0.03 + peaks) * np.where(weekday, 1.0, 0.2)
    raise ValueError(kind)


def curve(kind: str, minutes: np.ndarray) -> np.ndarray:
    """Relative traffic per minute (mean 1 over a week)."""
    return _relative(kind, minutes) / float(np.mean(_relative(kind, np.arange(WEEK))))


class Traffic:
    """One route's simulated traffic: per minute, the live requests and the pass rate they have."""

    def __init__(self, shape: Shape, minutes: int, rng: np.random.Generator, *, drop_at: int | None = None,
                 drop: float = 0.0, first_burst_after: int = 0) -> None:
        self.shape, self.rng = shape, rng
        t = np.arange(minutes)
        self.requests = rng.poisson(shape.per_day / DAY * curve(shape.curve, t))
        p = np.full(minutes, shape.base)
        if shape.wander:
            phases = rng.uniform(0, 2 * np.pi, 2)
            p += shape.wander * (0.6 * np.sin(2 * np.pi * t / (40 * DAY) + phases[0])
                                 + 0.4 * np.sin(2 * np.pi * t / (19 * DAY) + phases[1]))
        if drop_at is not None:
            p[drop_at:] -= drop
        self.bursts: list[tuple[int, int]] = []
        if shape.burst:
            for week_start in range(0, minutes, WEEK):
                start = week_start + int(rng.integers(0, WEEK))
                if start >= first_burst_after:
                    self.bursts.append((start, start + shape.burst))
                    p[start:start + shape.burst] *= 1 - shape.burst_fail
        self.p = np.clip(p, 0.0, 1.0)

    def failed_attempts(self, rng: np.random.Generator) -> np.ndarray:
        """Per minute, the attempts the gateway saw fail (the ledger's ``attempt`` rows): ``attempt_fail`` of
        the requests, ``burst_fail`` of them in a burst unless it is silent. Its own generator, so that the
        samples of a seed are the same with incidents as without."""
        share = np.full(len(self.requests), self.shape.attempt_fail)
        if not self.shape.silent:
            for start, end in self.bursts:
                share[start:end] = self.shape.burst_fail
        return rng.binomial(self.requests, share)


def draw(rng: random.Random, p: float, at: float, rate: float) -> Scored:
    tokens = rng.lognormvariate(math.log(400), 0.5)
    return Scored(passed=rng.random() < p, refusal=rng.random() < 0.03, guard_failed=rng.random() < 0.01,
                  output_chars=tokens * rng.uniform(0.4, 0.6) * 4, tokens=tokens, cost=tokens * 2e-6, at=at,
                  rate=rate)


def samples(traffic: Traffic, route: SimRoute, key: str, rng: random.Random, nrng: np.random.Generator,
            seed: int, split: Callable[[], float] | None = None, worse: float = 0.0,
            candidate_key: str = "") -> Iterator[tuple[int, Scored, bool]]:
    """The sampled answers of every minute, in time order, at the rate the monitor asks for (read each minute
    from ``route``'s rate for ``key``), each minute's failed attempts told to the route first (they are in
    the ledger before the answers' samples are scored). Yields (minute, sample, candidate); the caller feeds
    them. ``split``: the share (percent) of requests a candidate version serves now, its pass rate ``worse``
    below the traffic's, sampled at the higher of ``key``'s rate and ``candidate_key``'s (as the gateway
    samples a split label's candidate); without it every sample is the traffic's own (candidate False)."""
    failed = traffic.failed_attempts(np.random.default_rng(seed + 7_777))
    for minute in range(len(traffic.requests)):
        if failed[minute]:
            route.failed(minute, int(failed[minute]))
        n = int(traffic.requests[minute])
        if not n:
            continue
        rate = route.rate(key)
        if split is None:
            k = int(nrng.binomial(n, rate)) if rate < 1 else n
            for at in sorted(rng.random() for _ in range(k)):
                yield minute, draw(rng, float(traffic.p[minute]), (minute + at) * 60.0, rate), False
            continue
        tried = int(nrng.binomial(n, split() / 100))
        on_candidate = max(rate, route.rate(candidate_key))
        drawn = [(rng.random(), False, rate) for _ in range(int(nrng.binomial(n - tried, rate)))]
        drawn += [(rng.random(), True, on_candidate) for _ in range(int(nrng.binomial(tried, on_candidate)))]
        for at, candidate, r in sorted(drawn):
            p = float(traffic.p[minute]) - (worse if candidate else 0.0)
            yield minute, draw(rng, max(p, 0.0), (minute + at) * 60.0, r), candidate


class SimRoute:
    """The monitor's pass over one simulated route (a model's steady traffic, or a prompt's versions)."""

    def __init__(self, settings: DriftSettings, policy: SamplingPolicy, incidents: IncidentSettings) -> None:
        self.core = Watches(settings, policy, Incidents(incidents))
        self.policy = policy
        self.ids = 0
        self.now = 0.0

    def rate(self, key: str) -> float:
        """What every replica samples ``key`` at now (a fixed policy: always its base rate)."""
        rate, _ = self.core.rates(self.now).get(key, (self.policy.base, 0.0))
        return max(rate, self.policy.base)

    def failed(self, minute: int, n: int) -> None:
        bucket = Incidents.bucket(minute * 60.0)
        self.core.incidents.failed("m", bucket, self.core.incidents.failures.get("m", {}).get(bucket, 0) + n)

    def row(self, s: Scored, version: str | None) -> Row:
        """A sample as the monitor reads it: model "m", prompt faq@prod at ``version`` (None: no prompt)."""
        self.ids += 1
        return Row(self.ids, 1, "m", None, None if version is None else "faq", None if version is None else "prod",
                   version, s)

    def feed(self, s: Scored, version: str | None = None) -> list[tuple[Watch, list]]:
        self.now = s.at or 0.0
        row = self.row(s, version)
        if (route := self.core.route(row)) is not None:
            self.core.start(route, [])
        return self.core.feed(row)  # the watches that breached (findings) or may advance (none)


def warmup_minutes(shape: Shape, settings: DriftSettings, policy: SamplingPolicy) -> int:
    """Minutes of unchanged traffic that give a route its baseline (at the base rate) and a little more."""
    per_day = shape.per_day * policy.base
    return int(math.ceil((settings.baseline_samples + 4 * settings.window) / per_day * 1.3 + 2) * DAY)


def detect_run(seed: int, shape: Shape, drop: float, settings: DriftSettings, policy: SamplingPolicy,
               incidents: IncidentSettings) -> tuple[int | None, int | None]:
    """Scored samples and live requests from the drop to its detection (None, None: missed)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    warm = warmup_minutes(shape, settings, policy) + int(nrng.integers(0, WEEK))
    total = warm + MAX_DAYS * DAY
    traffic = Traffic(shape, total, nrng, drop_at=warm, drop=drop)
    route = SimRoute(settings, policy, incidents)
    n = 0
    for minute, s, _ in samples(traffic, route, "model:m", rng, nrng, seed):
        if minute >= warm:
            n += 1
        for _, found in route.feed(s):
            if minute >= warm and any(f.detector == "pass_rate" for f in found):
                return n, int(traffic.requests[warm:minute + 1].sum())
    return None, None


def alarm_run(seed: int, shape: Shape, days: int, settings: DriftSettings, policy: SamplingPolicy,
              incidents: IncidentSettings) -> tuple[int, int, dict[str, int]]:
    """Alarms (any detector) and scored samples over ``days`` of unchanged traffic after the warm-up."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    warm = warmup_minutes(shape, settings, policy)
    total = warm + days * DAY
    traffic = Traffic(shape, total, nrng)
    route = SimRoute(settings, policy, incidents)
    alarms = n = 0
    by: dict[str, int] = {}
    for minute, s, _ in samples(traffic, route, "model:m", rng, nrng, seed):
        found = route.feed(s)
        if minute >= warm:
            n += 1
            for _, f in found:
                if not f:
                    continue
                alarms += 1
                for one in f:
                    by[one.detector] = by.get(one.detector, 0) + 1
    return alarms, n, by


def move_run(seed: int, shape: Shape, settings: DriftSettings, policy: SamplingPolicy, incidents: IncidentSettings,
             drop: float = 0.0, watch_days: float = 7.0, watch_max_days: float = 28.0,
             old_samples: int = 0) -> int | None:
    """A label moved to a version ``drop`` points worse than the old one (0: as good), watched for
    ``watch_days`` and on until its test has decided (``Watch.decided``), ``watch_max_days`` at most: the
    new version's scored samples until it was rolled back (None: it was not)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    warm = warmup_minutes(shape, settings, policy) + int(nrng.integers(0, WEEK))
    total = warm + int(max(watch_days, watch_max_days) * DAY)
    end = warm + int(watch_days * DAY)
    traffic = Traffic(shape, total, nrng, first_burst_after=warm, drop_at=warm if drop else None, drop=drop)
    if shape.burst and not any(warm <= b < end for b, _ in traffic.bursts):  # a burst falls in the watch's week
        start = warm + int(nrng.integers(0, int(watch_days * DAY) - shape.burst))
        traffic.bursts = [(start, start + shape.burst)]
        traffic.p[start:start + shape.burst] *= 1 - shape.burst_fail
    route = SimRoute(settings, policy, incidents)
    key = prompt_key(1, "faq", "prod")
    watch: Watch | None = None
    n = 0
    for minute, s, _ in samples(traffic, route, key, rng, nrng, seed):
        if minute < warm:
            route.feed(s, "v1")
            continue
        if minute >= end and watch is not None and watch.decided():
            return None
        n += 1
        if watch is None:  # the move: the monitor's prompt watch, its baseline the old version's samples
            watch = Watch(key="prompt:1:faq:prod:1", kind="prompt", subject="prompt faq@prod", rate_key=key,
                          tenant_id=1, settings=settings, prompt={"progressive": False},
                          candidate=lambda r: r.prompt_version == "v2", baseline=lambda r: r.prompt_version == "v1")
            steady = route.core.watches["steady:prompt:1:faq:prod:v1"].steady
            assert steady is not None
            old = [*steady.baseline, *steady.pending][-settings.baseline_max:]
            # ``old_samples``: the old version served only its last this many
            watch.base = deque(old[-old_samples:] if old_samples else old, maxlen=settings.baseline_max)
            route.core.watches[watch.key] = watch
        for w, findings in route.feed(s, "v2"):
            if w is watch and findings:
                return n
    return None


ROLLOUT_STEPS = (5.0, 20.0, 50.0, 100.0)  # a prompt rollout's split steps, percent (the API's example)
ROLLOUT_DAYS = 60.0  # a rollout not finished in this many days counts as stalled


@dataclasses.dataclass(frozen=True)
class RolloutOutcome:
    end: str  # "complete", "rolled_back" or "stalled" (not finished within the horizon, or a step's watch
    #           undecided after ``step_max_days``)
    step: int  # the step it ended at (its index in ROLLOUT_STEPS)
    days: float  # from the split's start to the end
    candidate_requests: int  # live requests the candidate version served until then


def rollout_run(seed: int, shape: Shape, settings: DriftSettings, policy: SamplingPolicy,
                incidents: IncidentSettings, drop: float = 0.0, step_max_days: float | None = None,
                min_samples: int = 200, horizon_days: float = ROLLOUT_DAYS) -> RolloutOutcome:
    """A progressive prompt rollout: the label split to a candidate ``drop`` points worse (0: as good) at 5%
    of its users, moved on to 20, 50 and 100% each time the split's watch (the monitor's prompt watch: the
    candidate's samples against the version the label holds, whose samples keep coming) has ``min_samples``
    and its SPRT has accepted "no drop", rolled back at a breach. Each step is a new watch, as the monitor
    makes one per change: its baseline the held version's latest samples, the candidate's samples so far
    replayed through it (``Monitor._load``). The monitor watches a step until it moves on or back;
    ``step_max_days`` (the monitor before 2026-12-05: 28) stops watching an older step, which stalls the
    rollout. Not finished within ``horizon_days``: "stalled" too."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    warm = warmup_minutes(shape, settings, policy) + int(nrng.integers(0, WEEK))
    total = warm + int(horizon_days * DAY) + 1
    traffic = Traffic(shape, total, nrng, first_burst_after=warm)
    route = SimRoute(settings, policy, incidents)
    key, tried_key = prompt_key(1, "faq", "prod"), version_key(1, "faq", "prod", "v2")
    step_settings = dataclasses.replace(settings, min_samples=min_samples)
    held: deque[Scored] = deque(maxlen=settings.baseline_max)  # the held version's samples outside incidents
    since: list[tuple[Scored, bool]] = []  # both versions' samples from the split on (True: the candidate's)
    shares: list[tuple[int, float]] = []  # (minute, share) from each step on
    step, started, watch = -1, warm, None

    def served(until: int) -> int:
        bounds = [*shares, (until + 1, 0.0)]
        return int(sum(float(traffic.requests[a:b].sum()) * pct / 100
                       for (a, pct), (b, _) in itertools.pairwise(bounds)))

    def begin(k: int, minute: int) -> Watch:
        w = Watch(key=f"prompt:1:faq:prod:{k}", kind="prompt", subject=f"prompt faq@prod step {k}", rate_key=tried_key,
                  tenant_id=1, settings=step_settings,
                  prompt={"split": True, "split_percent": ROLLOUT_STEPS[k], "progressive": True},
                  candidate=lambda r: r.prompt_version == "v2", baseline=lambda r: r.prompt_version == "v1")
        w.base = deque(held, maxlen=settings.baseline_max)
        for t, candidate in since:  # as Monitor._load: both versions in the order they answered
            w.replay(route.row(t, "v2" if candidate else "v1"))
        route.core.watches[w.key] = w
        shares.append((minute, ROLLOUT_STEPS[k]))
        return w

    def share() -> float:  # the candidate's share of the users now (percent)
        return shares[-1][1] if shares else 0.0

    for minute, s, candidate in samples(traffic, route, key, rng, nrng, seed, split=share, worse=drop,
                                          candidate_key=tried_key):
        if watch is None and minute >= warm:
            step, started = 0, minute
            watch = begin(0, minute)
        if watch is not None and step_max_days is not None and minute - started > step_max_days * DAY:
            return RolloutOutcome("stalled", step, (minute - warm) / DAY, served(minute))
        found = route.feed(s, "v2" if candidate else "v1")
        if not route.core.incidents.covers("m", s.at):
            if not candidate:
                held.append(s)
            if watch is not None:
                since.append((s, candidate))
        for w, findings in found:
            if w is not watch:
                continue
            if findings:
                return RolloutOutcome("rolled_back", step, (minute - warm) / DAY, served(minute))
            step, started = step + 1, minute
            if ROLLOUT_STEPS[step] >= 100:
                return RolloutOutcome("complete", step, (minute - warm) / DAY, served(minute))
            watch = begin(step, minute)
    return RolloutOutcome("stalled", step, (total - warm) / DAY, served(total - 1))


# -- the matrix ---------------------------------------------------------------------------------------
def tuning_shapes(volumes: tuple[int, ...]) -> list[Shape]:
    out = []
    for v in volumes:
        out += [Shape(v, "flat"), Shape(v, "day"), Shape(v, "day", burst=10), Shape(v, "day", burst=60),
                Shape(v, "day", burst=120), Shape(v, "day", wander=0.02)]
    return out


def held_out_shapes(volumes: tuple[int, ...]) -> list[Shape]:
    return [Shape(v, "office", base=0.75, wander=0.015, burst=45, burst_fail=0.4) for v in volumes]


def wald(p0: float, drop: float) -> float:
    return BernoulliSPRT(p0, p0 - drop, alpha=0.01, beta=0.05).expected_samples("h1")


def _detect(args: tuple) -> tuple[int | None, int | None]:
    return detect_run(*args)


def _alarms(args: tuple) -> tuple[int, int, dict[str, int]]:
    return alarm_run(*args)


def _move(args: tuple) -> int | None:
    return move_run(*args)


def change_cells(shapes: list[Shape], fixed: SamplingPolicy,
                 adaptive: SamplingPolicy) -> Iterator[tuple[Shape, str, SamplingPolicy]]:
    """The cells of the change measures (moves, rollouts): the day curve's shapes and those with bursts, each
    with both sampling policies."""
    for shape in shapes:
        if shape.burst or shape.curve == "day":
            for name, policy in (("fixed 2%", fixed), ("adaptive", adaptive)):
                yield shape, name, policy


def _rollout(args: tuple) -> RolloutOutcome:
    return rollout_run(*args)


def quantile(values: list[int] | list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _setting(name: str, text: str) -> object:
    """A ``--set`` value as the DriftSettings field's type (a flag: true/false, on/off, 1/0)."""
    default = getattr(DriftSettings(), name)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise SystemExit(f"--set {name}: true or false, not {text!r}")
        return text.lower() in ("true", "on", "1")
    return type(default or 0.0)(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="seeded runs per detection cell")
    parser.add_argument("--days", type=int, default=400, help="simulated days of unchanged traffic per alarm cell")
    parser.add_argument("--moves", type=int, default=200, help="label moves per cell")
    parser.add_argument("--watch-max-days", type=float, default=28.0,
                        help="a moved label's watch runs on past its seven days until decided, this long at most")
    parser.add_argument("--old-samples", type=int, default=0,
                        help="the moved label's old version has only its last this many samples (0: all it has)")
    parser.add_argument("--bad-moves", type=int, default=40,
                        help="moves per cell to a version 5 points worse (found within the watch? how soon?)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--volumes", default="2000,10000,30000")
    parser.add_argument("--only", default="detect,alarms,moves,rollouts")
    parser.add_argument("--rollouts", type=int, default=100, help="progressive prompt rollouts per cell (as good)")
    parser.add_argument("--bad-rollouts", type=int, default=40, help="... and to a version 5 points worse")
    parser.add_argument("--step-max-days", type=float, default=None,
                        help="stop watching a rollout's step this many days old (the monitor before: 28)")
    parser.add_argument("--no-evidence-rate", action="store_true",
                        help="a rollout's step short of evidence asks for no more than its progress gives "
                             "(Watch.awaits_evidence off: the monitor before it)")
    parser.add_argument("--match", default="", help="only the traffic whose label contains this")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a detector setting other than its default (DriftSettings), e.g. evidence_hours=0")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=VALUE",
                        help="an adaptive sampling setting other than its default (SamplingPolicy), e.g. start=0.05")
    parser.add_argument("--incident-failures", type=int, default=IncidentSettings().min_failures,
                        help="failed attempts in five minutes that can make an upstream incident (0: incidents off)")
    parser.add_argument("--incident-share", type=float, default=IncidentSettings().share)
    parser.add_argument("--silent", action="store_true",
                        help="bursts fail no attempt (the upstream answers 200 with bad text): no incident to see")
    parser.add_argument("--extra", action=argparse.BooleanOptionalAction, default=True,
                        help="the other base rates and drop sizes on the day curve")
    args = parser.parse_args()
    if args.no_evidence_rate:  # before the pool forks its workers: they inherit it
        Watch.awaits_evidence = lambda self: False  # type: ignore[method-assign]
    volumes = tuple(int(v) for v in args.volumes.split(","))
    settings = DriftSettings(**{k: _setting(k, v) for k, v in (a.split("=", 1) for a in args.set)})
    adaptive = SamplingPolicy(**{k: float(v) for k, v in (a.split("=", 1) for a in args.policy)})
    fixed = SamplingPolicy(ceiling=0.02)
    shapes = held_out_shapes(volumes) if args.held_out else tuning_shapes(volumes)
    if args.silent:
        shapes = [dataclasses.replace(s, silent=True) for s in shapes]
    shapes = [s for s in shapes if args.match in s.label()]
    incidents = IncidentSettings(args.incident_failures, args.incident_share)
    only = set(args.only.split(","))
    print(f"settings: {settings}\nadaptive: {adaptive}\nincidents: {incidents}\n")
    pool = concurrent.futures.ProcessPoolExecutor(args.jobs)
    seed0 = args.seed * 1_000_000
    if "detect" in only:
        print("| traffic | drop | Wald | fixed 2%: samples p50 / p90 (x Wald) | missed | adaptive: samples p50 "
              "| missed | live requests p50 fixed / adaptive |")
        print("|---|---|---|---|---|---|---|---|")
        cells = [(s, d) for s in shapes for d in (0.05,)]
        cells += [(dataclasses.replace(s, base=b), d) for s in shapes if args.extra and s.curve != "flat"
                  and not s.wander and not s.burst for b, d in ((0.90, 0.03), (0.90, 0.10), (0.60, 0.05), (0.97, 0.05))]
        for shape, drop in cells:
            started = time.perf_counter()
            out = {}
            for name, policy in (("fixed", fixed), ("adaptive", adaptive)):
                out[name] = list(pool.map(_detect, [(seed0 + i, shape, drop, settings, policy, incidents)
                                                    for i in range(args.runs)]))
            w = wald(shape.base, drop)
            f = [n for n, _ in out["fixed"] if n is not None]
            a = [n for n, _ in out["adaptive"] if n is not None]
            fr = [r for _, r in out["fixed"] if r is not None]
            ar = [r for _, r in out["adaptive"] if r is not None]
            miss_f, miss_a = args.runs - len(f), args.runs - len(a)
            fs = (f"{statistics.median(f):.0f} / {quantile(f, 0.9):.0f} ({statistics.median(f) / w:.2f}x)"
                  if f else "-")
            ratio = statistics.median(fr) / statistics.median(ar) if fr and ar else float("nan")
            print(f"| {shape.label()} | {drop * 100:.0f} pts | {w:.0f} | {fs} | {miss_f} | "
                  f"{statistics.median(a) if a else '-'} | {miss_a} | "
                  f"{statistics.median(fr) if fr else '-'} / {statistics.median(ar) if ar else '-'} "
                  f"({ratio:.1f}x fewer) |   ({time.perf_counter() - started:.0f} s)", flush=True)
    if "alarms" in only:
        print("\n| traffic | sampling | false alarms per 100 days | scored samples/day | by detector |")
        print("|---|---|---|---|---|")
        per_run = 100
        for shape in shapes:
            for name, policy in (("fixed 2%", fixed), ("adaptive", adaptive)):
                started = time.perf_counter()
                runs = list(pool.map(_alarms, [(seed0 + 500_000 + i, shape, per_run, settings, policy,
                                               incidents)
                                               for i in range(max(1, args.days // per_run))]))
                days = per_run * len(runs)
                alarms = sum(r[0] for r in runs)
                n = sum(r[1] for r in runs)
                by: dict[str, int] = {}
                for r in runs:
                    for k, v in r[2].items():
                        by[k] = by.get(k, 0) + v
                print(f"| {shape.label()} | {name} | {100 * alarms / days:.2f} ({alarms} in {days} days) | "
                      f"{n / days:.0f} | {by or '-'} |   ({time.perf_counter() - started:.0f} s)", flush=True)
    if "moves" in only:
        print("\n| traffic | sampling | good versions rolled back | versions 5 points worse rolled back within the "
              "week | their samples to the rollback p50 / p90 |")
        print("|---|---|---|---|---|")
        for shape, name, policy in change_cells(shapes, fixed, adaptive):
            started = time.perf_counter()
            back = sum(r is not None for r in pool.map(
                _move, [(seed0 + 900_000 + i, shape, settings, policy, incidents, 0.0, 7.0, args.watch_max_days,
                         args.old_samples)
                        for i in range(args.moves)]))
            bad = "- | -"
            if args.bad_moves:
                caught = [r for r in pool.map(_move, [(seed0 + 950_000 + i, shape, settings, policy, incidents,
                                                       0.05, 7.0, args.watch_max_days, args.old_samples)
                                                      for i in range(args.bad_moves)]) if r is not None]
                bad = (f"{len(caught)} of {args.bad_moves} | "
                       + (f"{statistics.median(caught):.0f} / {quantile(caught, 0.9)}" if caught else "-"))
            print(f"| {shape.label()} | {name} | {back} of {args.moves} ({100 * back / args.moves:.1f}%) | {bad} |"
                  f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    if "rollouts" in only:
        print(f"\n| traffic | sampling | as good: rolled back / completed (days p50 / p90) / stalled ({ROLLOUT_DAYS:.0f} "
              "days) | 5 points worse: rolled back (the candidate's live requests p50) / completed / stalled |")
        print("|---|---|---|---|")
        for shape, name, policy in change_cells(shapes, fixed, adaptive):
            started = time.perf_counter()
            cells = []
            for drop, runs, base in ((0.0, args.rollouts, 1_200_000), (0.05, args.bad_rollouts, 1_300_000)):
                out = list(pool.map(_rollout, [(seed0 + base + i, shape, settings, policy, incidents, drop,
                                                args.step_max_days) for i in range(runs)]))
                back = [o for o in out if o.end == "rolled_back"]
                done = [o for o in out if o.end == "complete"]
                stalled = [o.step for o in out if o.end == "stalled"]
                at = f" at steps {sorted(stalled)}" if stalled and len(stalled) <= 5 else ""
                if drop:
                    cells.append(f"{len(back)} ({statistics.median(o.candidate_requests for o in back):.0f}) / "
                                 f"{len(done)} / {len(stalled)}{at}" if back else f"0 / {len(done)} / {len(stalled)}{at}")
                else:
                    days = (f" ({statistics.median(o.days for o in done):.1f} / "
                            f"{quantile([o.days for o in done], 0.9):.1f})") if done else ""
                    cells.append(f"{len(back)} / {len(done)}{days} / {len(stalled)}{at} of {runs}")
            print(f"| {shape.label()} | {name} | {cells[0]} | {cells[1]} of {args.bad_rollouts} |"
                  f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    pool.shutdown()


if __name__ == "__main__":
    main()
