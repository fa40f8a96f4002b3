"""Why a drop was missed: the seeded runs of one detection cell of ``shapes.py`` that found no drop within 30 days,
each with what the route's watch did around it (alarms of any detector, in days from the drop; the pass-rate
test's baseline rate and CUSUM at the drop and at the end, beside the true rate).

    .venv/bin/python bench/drift/misses.py --match "2k/day, day, base 90%, bursts 120 min at 30%" [--runs 40]
        [--fixed] [--drop 0.05] [--seed 1]

The same seeds, traffic and monitor as ``shapes.py --only detect`` (its tuning shapes only: a held-out shape
stays unread).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S

from tollway.evals import DriftSettings, SamplingPolicy
from tollway.gateway.quality.incidents import IncidentSettings


def pass_state(route: S.SimRoute) -> tuple[float, float] | None:
    """(p0, CUSUM statistic) of the route's steady pass-rate test, None while its baseline forms."""
    watch = next(iter(route.core.watches.values()), None)
    if watch is None or watch.steady is None or watch.steady.test is None:
        return None
    for test in watch.steady.test.pass_tests:
        if test.name == "pass_rate" and getattr(test, "cusum", None) is not None:
            return round(test.p0, 4), round(test.cusum.llr, 2)
    return None


def trace(seed: int, shape: S.Shape, drop: float, policy: SamplingPolicy) -> dict[str, object]:
    """``shapes.detect_run`` with the watch read along the way."""
    settings, incidents = DriftSettings(), IncidentSettings()
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    warm = S.warmup_minutes(shape, settings, policy) + int(nrng.integers(0, S.WEEK))
    total = warm + S.MAX_DAYS * S.DAY
    traffic = S.Traffic(shape, total, nrng, drop_at=warm, drop=drop)
    route = S.SimRoute(settings, policy, incidents)
    alarms: list[tuple[float, list[str]]] = []
    at_drop = None
    n = 0
    for minute, s, _ in S.samples(traffic, route, "model:m", rng, nrng, seed):
        if minute >= warm:
            n += 1
            if at_drop is None:
                at_drop = pass_state(route) or "baseline forming"
        for _, found in route.feed(s):
            if found and minute >= warm - 7 * S.DAY:
                alarms.append((round((minute - warm) / S.DAY, 2), sorted({f.detector for f in found})))
            if minute >= warm and any(f.detector == "pass_rate" for f in found):
                return {"found": n}
    return {"samples": n, "alarms from a week before": alarms, "p0 / CUSUM at the drop": at_drop,
            "at the end": pass_state(route) or "baseline forming",
            "true rate before / after": (round(float(traffic.p[warm - 1]), 4), round(float(traffic.p[warm]), 4))}


def _run(args: tuple[int, S.Shape, float, SamplingPolicy]) -> tuple[int, dict[str, object]]:
    return args[0], trace(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match", required=True, help="a tuning shape's label, exactly as shapes.py prints it")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--fixed", action="store_true", help="fixed 2%% sampling (default: the adaptive policy)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    shapes = [s for s in S.tuning_shapes((2000, 10000, 30000)) if s.label() == args.match]
    if not shapes:
        sys.exit(f"no tuning shape is labelled {args.match!r}")
    policy = SamplingPolicy(ceiling=0.02) if args.fixed else SamplingPolicy()
    seeds = [args.seed * 1_000_000 + i for i in range(args.runs)]  # shapes.py's detection seeds
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(_run, [(seed, shapes[0], args.drop, policy) for seed in seeds]))
    missed = [(seed, r) for seed, r in runs if "found" not in r]
    print(f"{args.match}, {'fixed 2%' if args.fixed else 'adaptive'}, {args.drop * 100:g} points: "
          f"{len(missed)} missed of {args.runs}")
    for seed, r in missed:
        print(f"- seed {seed}: " + "; ".join(f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
