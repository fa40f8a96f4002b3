"""The injection rules per source, now and at an earlier commit, side by side (issue 26: do rule changes
carry over to sources nobody read?). Every source of ``injection_sources`` and ``learned.documents``; the
held-out ones (``HELD_OUT``, ``docs-held``) only with ``--held-out``. Per source: the share flagged at the
threshold by the rules (the default), at ``--before REV`` and now, and now with the learned model
(``injection_model: true``; on training sources that figure is in-sample: ``learned.py`` has the honest,
leave-one-source-out one).

    .venv/bin/pip install pyarrow                  # reads two sources' parquet files (the bench's only)
    .venv/bin/python bench/guardrails/rules.py --before REV [--held-out] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from injection_sources import HELD_OUT, Sample, load  # noqa: E402
from learned import HELD_DOCS, documents  # noqa: E402


def samples(held_out: bool) -> list[Sample]:
    out = load() + documents()
    return [s for s in out if held_out or (s.source not in HELD_OUT and s.source != HELD_DOCS)]


def flagged(texts: list[str], threshold: float, learned: bool) -> list[bool]:
    from tollway.guardrails.injection import prefilter, score

    prefilter(wait=True)
    return [score(t, learned=learned).score >= threshold for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", metavar="REV", help="also the rules as they were at this commit")
    parser.add_argument("--held-out", action="store_true", help="include the held-out sources")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--score-stdin", action="store_true", help=argparse.SUPPRESS)  # the --before child
    args = parser.parse_args()
    if args.score_stdin:
        print(json.dumps(flagged(json.load(sys.stdin), args.threshold, False)))
        return

    data = samples(args.held_out)
    texts = [s.text for s in data]
    columns: dict[str, list[bool]] = {}
    if args.before:
        from common import package_at

        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, **package_at(args.before, Path(folder))}
            out = subprocess.run([sys.executable, __file__, "--score-stdin", "--threshold", str(args.threshold)],
                                 input=json.dumps(texts), capture_output=True, text=True, env=env, cwd=folder,
                                 check=True).stdout
        columns[f"rules at {args.before}"] = json.loads(out)
    columns["rules now"] = flagged(texts, args.threshold, False)
    columns["rules + model now"] = flagged(texts, args.threshold, True)

    counts: dict[tuple[bool, str], list[int]] = defaultdict(lambda: [0] * (len(columns) + 1))
    for i, s in enumerate(data):
        row = counts[(s.attack, s.source)]
        row[0] += 1
        for j, col in enumerate(columns.values(), 1):
            row[j] += col[i]
    print(f"\nshare flagged at threshold {args.threshold}\n")
    print("| source | kind | texts | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for (attack, source), row in sorted(counts.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        held = " (held out)" if source in HELD_OUT or source == HELD_DOCS else ""
        cells = " | ".join(f"{n / row[0]:.3f}" for n in row[1:])
        print(f"| {source} | {'attack' if attack else 'benign'}{held} | {row[0]} | {cells} |")
    for kind, attack in (("attack sources' mean recall", True), ("benign flagged, pooled", False)):
        for held in (False, True):
            rows = [row for (a, source), row in counts.items() if a == attack
                    and (source in HELD_OUT or source == HELD_DOCS) == held]
            if not rows:
                continue
            if attack:
                cells = " | ".join(f"{sum(r[j] / r[0] for r in rows) / len(rows):.3f}" for j in range(1, len(columns) + 1))
            else:
                total = sum(r[0] for r in rows)
                cells = " | ".join(f"{sum(r[j] for r in rows) / total:.4f}" for j in range(1, len(columns) + 1))
            print(f"| {kind}, {'held out' if held else 'training'} | | | {cells} |")


if __name__ == "__main__":
    main()
