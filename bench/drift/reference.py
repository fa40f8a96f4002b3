"""How often a change's SPRT judges an equally good version a drop because its reference is an estimate.

A prompt or canary watch holds the new version to the baseline's pass rate as estimated from the baseline's
samples, as if that rate were known. This runs the monitor's own ``PassTest`` (the SPRT a change watch runs,
no hourly limit) on a new version exactly as good as the old one, against a reference estimated from
``--sizes`` samples of the old version, and counts the cycles that decide "drop" against the nominal alpha.

    .venv/bin/python bench/drift/reference.py [--runs 400] [--rate 0.9] [--sizes 300,1000,5000] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import statistics

from tollway.evals.monitor import DriftSettings, PassTest

ALPHA = DriftSettings().alpha * DriftSettings().sequential_share  # a watch's pass-rate test, one judge-less route


def cycle(rng: random.Random, rate: float, size: int, settings: DriftSettings) -> tuple[bool, int]:
    """One cycle: (decided "drop", samples to the decision)."""
    estimate = sum(rng.random() < rate for _ in range(size)) / size
    test = PassTest("pass_rate", estimate, ALPHA, settings)
    n = 0
    while True:
        n += 1
        finding, ended = test.update(rng.random() < rate)
        if finding is not None or ended:
            return finding is not None, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--rate", type=float, default=0.9)
    parser.add_argument("--sizes", default="300,1000,5000")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    settings = DriftSettings(evidence_hours=0)
    print(f"alpha per cycle {ALPHA}: {ALPHA * args.runs:g} of {args.runs} cycles would decide 'drop'\n")
    print("| baseline samples | cycles deciding 'drop' | samples to a decision, median |")
    print("|---|---|---|")
    for size in (int(x) for x in args.sizes.split(",")):
        rng = random.Random(args.seed)
        out = [cycle(rng, args.rate, size, settings) for _ in range(args.runs)]
        drops = sum(d for d, _ in out)
        print(f"| {size:,} | {drops} of {args.runs} ({100 * drops / args.runs:.1f}%) | "
              f"{statistics.median(n for _, n in out):.0f} |")


if __name__ == "__main__":
    main()
