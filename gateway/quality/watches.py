"""What the quality monitor watches: a scored live sample as the monitor reads it (``Row``), one watch over
a route (``Watch``): a canary against the model it stands in for, a moved or split prompt label against its
previous version, or a route against its own trailing baseline; and every watch of the leading monitor with
the half of its pass that needs no database (``Watches``: feed the samples in order, say what they found,
the sampling rate each route asks for). The monitor drives it from PostgreSQL; bench/drift drives the same
code with simulated traffic."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tollway.evals import DriftSettings, Finding, RouteTest, SamplingPolicy, Scored, SteadyWatch
from tollway.gateway.quality.incidents import Incidents
from tollway.jsontypes import JSON
from tollway.routing import Rollout

SAMPLE_COLUMNS = ("id, tenant_id, model, rollout_of, prompt_name, prompt_label, prompt_version, passed, refusal,"
                  " guard_failed, output_chars, tokens, cost_usd, retrieval_score, judge_score,"
                  " extract(epoch FROM created_at)::float8 AS at, sample_rate")
STEADY_IDLE_S = 3600.0  # a steady watch with no sample this long no longer sets its route's sampling rate (a
#                        moved label's old version, a retired model, a route quiet at night); it keeps its state
STEADY_FORGET_S = 7 * 86400.0  # ... and after this long it goes; if its route comes back it is rebuilt from the
#                               stored samples the way it runs: a lagged baseline, the newest samples replayed


def model_key(model: str) -> str:
    return f"model:{model}"


def prompt_key(tenant_id: int, name: str, label: str) -> str:
    return f"prompt:{tenant_id}:{name}:{label}"


def version_key(tenant_id: int, name: str, label: str, version: str) -> str:
    """One version of a split label: a split's watch samples its candidate by this key, not the whole label."""
    return f"prompt:{tenant_id}:{name}:{label}@{version}"


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
                      tokens=float(r[11]), cost=float(r[12]), retrieval=r[13], judge=r[14], at=float(r[15]),
                      rate=float(r[16])))


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
    fed_at: float = field(default_factory=time.time)  # when its last sample came (the sample's time)

    def feed(self, row: Row) -> list[Finding]:
        if self.steady is not None:
            if not self.candidate(row):
                return []
            self.fed_at = row.scored.at if row.scored.at is not None else time.time()
            return self.steady.observe(row.scored)
        if self.old(row):
            self.base.append(row.scored)
            if self.test is not None and self.paired:
                return self.test.held(row.scored)
        if not self.candidate(row):
            return []
        if self.test is None:
            self.waiting.append(row.scored)
            short = len(self.base) < self.settings.baseline_samples
            if short and not (self.moved and 0 < self.settings.short_baseline <= len(self.base)):
                del self.waiting[:-self.settings.baseline_max]
                return []
            caution = (self.settings.short_caution if short else self.settings.moved_caution) if self.moved else 0.0
            self.test = RouteTest(self.base, self.settings, cautious=caution, paired=self.paired)
            found = [f for s in self.waiting for f in self.test.update(s)]
            self.waiting = []
            return found
        return self.test.update(row.scored)

    def old(self, row: Row) -> bool:
        """A sample of the version a change is compared with (its baseline's), not of the one under test."""
        return self.baseline is not None and self.baseline(row) and not self.candidate(row)

    def replay(self, row: Row) -> list[Finding]:
        """A stored sample fed again once ``base`` already holds the old version's stored samples (a new
        watch made from the stored samples, ``Monitor._load``; feed them in the order they answered): the
        new version's as ``feed`` takes them, the old version's to a paired test only."""
        if self.old(row):
            return self.test.held(row.scored) if self.test is not None and self.paired else []
        return self.feed(row)

    @property
    def progressive(self) -> bool:
        """A step of a progressive rollout (a model's canary steps, a prompt's split steps)."""
        return (self.rollout is not None and self.rollout.progressive) or bool(self.prompt and self.prompt["progressive"])

    def advances(self) -> bool:
        """Evidence enough to move a progressive rollout on."""
        assert self.test is not None
        return self.progressive and self.test.no_regression()

    def awaits_evidence(self) -> bool:
        """A progressive rollout's step that has not yet the evidence to move on: its candidate serves a share
        of the traffic (5% at the first step), and sampled at the base rate a modest route's candidate would
        take weeks to the samples a decision needs, the rollout standing still meanwhile. Such a watch asks
        for the highest rate (``SamplingPolicy.ceiling``) for its candidate alone."""
        return self.progressive and not self.done and (self.test is None or not self.test.no_regression())

    @property
    def share(self) -> float | None:
        """The percent of its route's traffic a canary or a split label's new version serves (None: a moved
        label, whose old version serves no more, or a steady route)."""
        if self.rollout is not None:
            return self.rollout.canary_percent
        if self.prompt is not None and self.prompt.get("split"):
            return float(self.prompt.get("split_percent") or 0)
        return None

    @property
    def paired(self) -> bool:
        """The old version answers beside the new one: the pass rate is tested on both versions' samples of
        the same minutes (``PairedPassTest``), not against a rate estimated from the old version's past."""
        share = self.share
        return share is not None and 0 < share < 100

    @property
    def moved(self) -> bool:
        """A moved prompt label: its old version serves no more, so its baseline will not grow. It is tested
        against the old rate less ``moved_caution`` standard errors: that rate is an estimate that can no
        longer be refined, of days in which the route's rate may have wandered by a point or two (held to it
        exactly, 4-9% of good versions were rolled back on a wandering rate; bench/RESULTS.md). With fewer
        than ``baseline_samples`` old samples (a version promoted days ago on a quiet route) it is tested
        once it has ``short_baseline``, less ``short_caution`` standard errors. A canary's or a split's
        baseline keeps growing: they are held to its rate and wait for ``baseline_samples``."""
        return self.kind == "prompt" and not (self.prompt or {}).get("split")

    def decided(self) -> bool:
        """Whether a change's test has answered its question once: each pass-rate SPRT has accepted "no
        drop" (a breach ends the watch anyway). A test without an SPRT (``pass_drop`` unset: the mSPRT,
        whose silence is its evidence) counts as decided; one not started yet (its baseline or the new
        version's samples still to come) does not. A prompt watch runs ``watch_days`` and on, up to
        ``watch_max_days``, until it is decided: a quiet route may need weeks for the samples a decision
        takes, and once the watch ends the new version is its route's own baseline."""
        if self.test is None:
            return False
        return self.test.each_accepted()

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


@dataclass(frozen=True, slots=True)
class Route:
    """The steady route a sample belongs to, and how to find its stored samples (``where``/``args``)."""

    key: str
    subject: str
    rate_key: str
    tenant_id: int | None
    where: str
    args: tuple[Any, ...]
    match: Callable[[Row], bool]


class Watches:
    """Every watch of the leading monitor and the pure half of its pass. Per sample, in order: ``route``
    (a steady route with no watch yet: the caller loads its history and calls ``start``), then ``feed``
    (what each watch found; a change's watch that breached or may advance is done with). ``rates``: the
    sampling rate each route asks for now. ``incidents``: the upstream incidents the caller keeps current
    (failed attempts per model); a sample inside one feeds no watch."""

    def __init__(self, drift: DriftSettings, policy: SamplingPolicy, incidents: Incidents | None = None) -> None:
        self.drift, self.policy = drift, policy
        self.incidents = incidents or Incidents()
        self.watches: dict[str, Watch] = {}
        self.ended: set[str] = set()  # watches that breached or stepped: their rollout or change is done with
        self.completed: dict[str, str] = {}  # model -> the candidate of its completed rollout

    def settled(self, row: Row) -> bool:
        """Whether a sample is its route's steady traffic: not a canary's answer under test (a canary has
        its own watch), or the answer of a candidate whose rollout completed (now the model's traffic)."""
        return row.rollout_of is None or self.completed.get(row.rollout_of) == row.model

    def route(self, row: Row) -> Route | None:
        """The steady route of this sample when it has no watch yet."""
        if not self.settled(row):
            return None
        if row.prompt_name is None:
            model = row.model

            def by_model(s: Row) -> bool:
                return s.model == model and s.prompt_name is None and self.settled(s)
            route = Route(f"steady:model:{model}", f"model {model}", model_key(model), None,
                          "model = %s AND prompt_name IS NULL", (model,), by_model)
        elif row.prompt_label is not None:
            # per version: a label that moves starts a new steady watch (the move is the prompt watch's)
            t, name, label, version = row.tenant_id, row.prompt_name, row.prompt_label, row.prompt_version

            def by_prompt(s: Row) -> bool:
                return (s.tenant_id == t and s.prompt_name == name and s.prompt_label == label
                        and s.prompt_version == version and self.settled(s))
            route = Route(f"steady:prompt:{t}:{name}:{label}:{version}",
                          f"prompt {name}@{label} version {str(version)[:12]}", prompt_key(t, name, label), t,
                          "tenant_id = %s AND prompt_name = %s AND prompt_label = %s AND prompt_version = %s",
                          (t, name, label, version), by_prompt)
        else:
            return None
        return None if route.key in self.watches else route

    def history_size(self) -> int:
        """How many of a route's latest samples ``start`` reads."""
        return self.drift.baseline_max + SteadyWatch(self.drift).lag

    def start(self, route: Route, history: Sequence[Scored]) -> tuple[Watch, list[Finding]]:
        """A route's steady watch, made from its earlier samples (oldest first) as the watch would hold them
        had it run all along: the older ones its baseline, the newest ``lag`` replayed through its tests
        (never a baseline that takes in samples after a change the tests have not judged; a route with too
        few samples for both has its baseline still forming, and all of them join it). Returns the watch
        and what the replay found."""
        steady = SteadyWatch(self.drift)
        cut = len(history) - steady.lag
        if cut < self.drift.baseline_samples:
            cut = len(history)  # its baseline is still forming: every sample joins it, as on a new route
        steady.seed(history[:cut])
        found = [f for s in history[cut:] for f in steady.observe(s)]
        watch = self.watches[route.key] = Watch(
            key=route.key, kind="steady", subject=route.subject, rate_key=route.rate_key, tenant_id=route.tenant_id,
            candidate=route.match, settings=self.drift, steady=steady)
        return watch, found

    def feed(self, row: Row) -> list[tuple[Watch, list[Finding]]]:
        """One sample to every watch. Returns the watches that breached, with their findings, and those a
        progressive rollout may advance, with none; a change's watch in either is done with (the monitor
        acts on it; its next step, if any, is a new watch). A sample answered inside an upstream incident of
        its model is set aside: evidence about the upstream, not the route."""
        out: list[tuple[Watch, list[Finding]]] = []
        self.incidents.sampled(row.model, row.scored.at, row.scored.rate)
        if self.incidents.covers(row.model, row.scored.at):
            self.incidents.set_aside += 1
            return out
        for watch in list(self.watches.values()):
            if watch.done:
                continue
            found = watch.feed(row)
            if found:
                out.append((watch, found))
                watch.done = watch.steady is None
            elif watch.test is not None and watch.advances():
                out.append((watch, []))
                watch.done = True
        return out

    def tidy(self, now: float) -> None:
        """After a pass: drop the watches done with, and steady watches quiet for ``STEADY_FORGET_S``."""
        self.ended |= {k for k, w in self.watches.items() if w.done}
        self.incidents.forget(now)
        forget = now - STEADY_FORGET_S
        self.watches = {k: w for k, w in self.watches.items()
                        if not w.done and (w.steady is None or w.fed_at > forget)}

    def idle(self, w: Watch, now: float) -> bool:
        return w.steady is not None and w.fed_at < now - STEADY_IDLE_S

    def rates(self, now: float) -> dict[str, tuple[float, float]]:
        """Per sampling key, the rate its nearest-to-breach watch asks for, and that watch's progress (a
        quiet or retired route's watch keeps its evidence, not its route's rate); a progressive rollout's step
        still short of the evidence to move on asks for the ceiling (``Watch.awaits_evidence``)."""
        rates: dict[str, tuple[float, float]] = {}
        for w in self.watches.values():
            if self.idle(w, now):
                continue
            progress = w.progress()
            rate = self.policy.ceiling if w.awaits_evidence() else self.policy.rate(progress)
            if rate > rates.get(w.rate_key, (0.0, 0.0))[0]:
                rates[w.rate_key] = (rate, progress)
        return rates
