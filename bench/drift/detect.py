"""Drift detection on simulated traffic: how many scored samples and live requests it takes to find a
regression, with and without adaptive sampling, and how often it cries wolf on unchanged traffic.

The detectors are the gateway's own (``tollway.evals.monitor.SteadyWatch``: the route's trailing
baseline, the CUSUM of the pass rate and the window tests, the false-alarm budget split across them;
beside it ``RouteTest`` as a canary or prompt watch runs it, an SPRT started when the change starts);
the sampling policy is the gateway's (``SamplingPolicy``: 2% base rate, rising with the detectors'
progress). Traffic: a pass rate of 90%, tokens per request log-normal (median 400, sigma 0.5), output
length and cost following the tokens, a 3% refusal rate and a 1% guard-failure rate. Each run warms
the baseline up, runs unchanged traffic for a random while, then plants the change and counts, from
the change, the scored samples and the live requests until the route's detectors raise it.

    python bench/drift/detect.py [--runs 200] [--days 1000] [--seed 1]

Prints, per change (a 5-point pass-rate drop; a 20% rise in tokens per request), the median and p90 of
scored samples and of live requests to detection, for the steady route's CUSUM with the drop specified,
the mSPRT (nothing specified), each with fixed 2% and adaptive sampling, and the SPRT of a watch that
starts with the change; beside them, Wald's expected sample size
of the SPRT for the drop at alpha 0.01, beta 0.05 (the optimum the issue quotes); then false alarms
per simulated day of unchanged traffic at 10k requests/day across all detectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time

from tollway.evals.drift import BernoulliSPRT
from tollway.evals.monitor import DriftSettings, RouteTest, SamplingPolicy, Scored, SteadyWatch


@dataclasses.dataclass(frozen=True)
class Traffic:
    pass_rate: float = 0.90
    token_scale: float = 1.0
    refusal: float = 0.03
    guard_fail: float = 0.01

    def draw(self, rng: random.Random) -> Scored:
        tokens = rng.lognormvariate(math.log(400), 0.5) * self.token_scale
        output = tokens * rng.uniform(0.4, 0.6)
        return Scored(passed=rng.random() < self.pass_rate, refusal=rng.random() < self.refusal,
                      guard_failed=rng.random() < self.guard_fail, output_chars=output * 4, tokens=tokens,
                      cost=tokens * 2e-6)


def gap(rng: random.Random, rate: float) -> int:
    """Live requests until the next sampled one (geometric)."""
    if rate >= 1:
        return 1
    return 1 + int(math.log(1 - rng.random()) / math.log(1 - rate))


def detect(seed: int, change: Traffic, settings: DriftSettings, policy: SamplingPolicy, detectors: set[str],
           limit: int = 200_000) -> tuple[int, int]:
    """Scored samples and live requests from the change until one of ``detectors`` (those the change
    moves: tokens per request move output length and cost too) raises it."""
    rng = random.Random(seed)
    watch = SteadyWatch(settings)
    before = Traffic()
    for _ in range(settings.baseline_samples + rng.randrange(2 * settings.window, 6 * settings.window)):
        watch.observe(before.draw(rng))
    samples = requests = 0
    while samples < limit:
        requests += gap(rng, policy.rate(watch.progress()))
        samples += 1
        found = watch.observe(change.draw(rng))
        if any(f.detector in detectors for f in found):
            return samples, requests
    return samples, requests


def detect_watch(seed: int, change: Traffic, settings: DriftSettings, policy: SamplingPolicy, detectors: set[str],
                 limit: int = 200_000) -> tuple[int, int]:
    """The same for a watch that starts with the change (a canary, a moved prompt label): an SPRT from
    zero against the baseline's rate, as the monitor runs it."""
    rng = random.Random(seed)
    before = Traffic()
    test = RouteTest([before.draw(rng) for _ in range(settings.baseline_samples)], settings)
    samples = requests = 0
    while samples < limit:
        requests += gap(rng, policy.rate(test.progress()))
        samples += 1
        if any(f.detector in detectors for f in test.update(change.draw(rng))):
            return samples, requests
    return samples, requests


def false_alarms(seed: int, days: int, settings: DriftSettings, policy: SamplingPolicy,
                 per_day: int = 10_000) -> tuple[int, int, dict[str, int]]:
    """Alarms, scored samples and alarms per detector over ``days`` of unchanged traffic."""
    rng = random.Random(seed)
    watch = SteadyWatch(settings)
    traffic = Traffic()
    total = per_day * days
    requests = samples = alarms = 0
    by: dict[str, int] = {}
    while True:
        requests += gap(rng, policy.rate(watch.progress()))
        if requests > total:
            return alarms, samples, by
        samples += 1
        found = watch.observe(traffic.draw(rng))
        if found:
            alarms += 1
            for f in found:
                by[f.detector] = by.get(f.detector, 0) + 1


def summary(pairs: list[tuple[int, int]]) -> str:
    s = sorted(p[0] for p in pairs)
    r = sorted(p[1] for p in pairs)
    q = statistics.quantiles
    return (f"samples p50 {statistics.median(s):7.0f} p90 {q(s, n=10)[-1]:7.0f}   "
            f"live requests p50 {statistics.median(r):8.0f} p90 {q(r, n=10)[-1]:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--days", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    specified = DriftSettings()
    unspecified = dataclasses.replace(specified, pass_drop=None)
    fixed = SamplingPolicy(ceiling=0.02)
    adaptive = SamplingPolicy()
    wald = BernoulliSPRT(0.90, 0.85, alpha=0.01, beta=0.05).expected_samples("h1")
    print(f"settings: {specified}\nadaptive: {adaptive}")
    print(f"optimum: Wald's expected SPRT sample size for 90% -> 85% at alpha 0.01, beta 0.05: {wald:.0f} scored "
          f"samples ({wald / 0.02:.0f} live requests at 2%)\n")
    changes = (("pass rate 90% -> 85%", Traffic(pass_rate=0.85), {"pass_rate"}),
               ("tokens per request +20%", Traffic(token_scale=1.2), {"tokens", "output_chars", "cost"}))
    for title, change, detectors in changes:
        detector = "pass_rate" if "pass_rate" in detectors else "tokens"
        print(title)
        runs = (("CUSUM (drop specified)", specified, detect), ("mSPRT (unspecified)", unspecified, detect),
                ("SPRT, watch from change", specified, detect_watch))
        for name, settings, how in runs:
            if detector != "pass_rate" and (how is not detect or settings is unspecified):
                continue
            results = {}
            for label, policy in (("fixed 2%", fixed), ("adaptive", adaptive)):
                started = time.perf_counter()
                results[label] = [how(args.seed * 100_000 + i, change, settings, policy, detectors)
                                  for i in range(args.runs)]
                shown = name if detector == "pass_rate" else "KS per window"
                print(f"  {shown:24s} {label:9s} {summary(results[label])}   ({time.perf_counter() - started:.0f} s)")
            ratio = statistics.median(r for _, r in results["fixed 2%"]) / statistics.median(
                r for _, r in results["adaptive"])
            med = statistics.median(s for s, _ in results["fixed 2%"])
            versus = f"; fixed-rate median = {med / wald:.2f}x Wald's optimum" if detector == "pass_rate" else ""
            print(f"  {'':24s} adaptive needs {ratio:.1f}x fewer live requests{versus}")
    print(f"\nunchanged traffic, 10k requests/day, {args.days} simulated days per policy:")
    for label, policy in (("fixed 2%", fixed), ("adaptive", adaptive)):
        started = time.perf_counter()
        alarms, samples, by = false_alarms(args.seed, args.days, specified, policy)
        print(f"  {label:9s} {alarms} false alarms in {args.days} days = {100 * alarms / args.days:.2f} per 100 days "
              f"({samples / args.days:.0f} scored samples/day; by detector {by or '-'})  "
              f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
