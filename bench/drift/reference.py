"""How often a change's SPRT judges an equally good version a drop because its reference is an estimate.

A moved label's watch holds the new version to the old one's pass rate as estimated from the old version's
samples, as if that rate were known. This runs the monitor's own ``PassTest`` (the SPRT such a watch runs,
no hourly limit) on a new version exactly as good as the old one, against a reference estimated from
``--sizes`` samples of the old version, and counts the cycles that decide "drop" against the nominal alpha.
Beside it, ``ConcurrentPassTest``, what a split or a canary runs (its old version answers beside it: ``--held``
of its samples per sample of the new one), on the same estimate: its drop is the paired test's, whose null
needs no rate. Also a version ``--drop`` worse: how often each accepts "no drop" for it (beta), and the new
version's samples to a decision.

    .venv/bin/python bench/drift/reference.py [--runs 400] [--rate 0.9] [--sizes 300,1000,5000] [--held 2] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import statistics

from tollway.evals.monitor import ConcurrentPassTest, DriftSettings, PassTest

ALPHA = DriftSettings().alpha * DriftSettings().sequential_share  # a watch's pass-rate test, one judge-less route


def cycle(rng: random.Random, rate: float, size: int, settings: DriftSettings, *, new_rate: float | None = None,
          held: int = 0) -> tuple[bool, int]:
    """One cycle: (decided "drop", the new version's samples to the decision). ``held`` > 0: the split's test,
    that many of the old version's samples beside each new one, a minute apart."""
    estimate = sum(rng.random() < rate for _ in range(size)) / size
    new_rate = rate if new_rate is None else new_rate
    test = (ConcurrentPassTest if held else PassTest)("pass_rate", estimate, ALPHA, settings)
    n = 0
    while True:
        n += 1
        for _ in range(held):
            assert isinstance(test, ConcurrentPassTest)
            finding, ended = test.held(rng.random() < rate, 60.0 * n)
            if finding is not None or ended:
                return finding is not None, n
        finding, ended = test.update(rng.random() < new_rate, 60.0 * n)
        if finding is not None or ended:
            return finding is not None, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--rate", type=float, default=0.9)
    parser.add_argument("--sizes", default="300,1000,5000")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--held", type=int, default=2, help="the old version's samples per new one (split)")
    parser.add_argument("--drop", type=float, default=0.05, help="how much worse the worse version is")
    args = parser.parse_args()
    settings = DriftSettings(evidence_hours=0)
    print(f"alpha per cycle {ALPHA}: {ALPHA * args.runs:g} of {args.runs} cycles would decide 'drop'\n")
    print("| baseline samples | test | as good: cycles deciding 'drop' (samples to a decision, median) | "
          f"{args.drop:g} worse: cycles accepting 'no drop' (samples, median) |")
    print("|---|---|---|---|")
    for size in (int(x) for x in args.sizes.split(",")):
        for name, held in (("against the estimate (a moved label)", 0),
                           (f"split: paired + against the estimate, {args.held} old per new", args.held)):
            rng = random.Random(args.seed)
            same = [cycle(rng, args.rate, size, settings, held=held) for _ in range(args.runs)]
            worse = [cycle(rng, args.rate, size, settings, held=held, new_rate=args.rate - args.drop)
                     for _ in range(args.runs)]
            drops, missed = sum(d for d, _ in same), sum(not d for d, _ in worse)
            print(f"| {size:,} | {name} | {drops} of {args.runs} ({statistics.median(n for _, n in same):.0f}) | "
                  f"{missed} of {args.runs} ({statistics.median(n for _, n in worse):.0f}) |", flush=True)


if __name__ == "__main__":
    main()
