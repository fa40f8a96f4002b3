"""Cost-aware routing on packaged difficulty-labelled data: who goes to the large tier, and what it saves.

Questions: FreshQA as shipped inside the `inspect-evals` package (one-hop vs multi-hop), the held-out
30% the classifier never saw (and, for reference, all 600). Each question is sent through the real
route path as a request for model 'auto': the difficulty signal (rules + classifier) and the pure
route policy, against a two-tier catalog priced like a hosted large model ($3 / $15 per million
input / output tokens) and a small one ($0.15 / $0.60). Per threshold setting it prints the share sent
to the large tier per difficulty level, and the cost against always-large (prompt tokens counted with
tiktoken; every answer assumed to be --output-tokens long), plus what scoring and deciding take.

    python bench/routing/run.py [--thresholds 0.3,0.5] [--output-tokens 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from decimal import Decimal
from pathlib import Path

from tollway.routing import Usage, build_catalog, parse_config
from tollway.routing.decision import BudgetSignal, RouteRequest, TenantRouting, decide
from tollway.routing.difficulty import assess
from tollway.routing.difficulty_train import Example, load_examples
from tollway.routing.tokens import count_messages

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import p50_p99

CATALOG = build_catalog(parse_config({
    "upstreams": [{"name": "gpu", "base_url": "http://gpu"}, {"name": "cpu", "base_url": "http://cpu"}],
    "models": [{"name": "large", "upstream": "gpu", "tier": "large", "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
               {"name": "small", "upstream": "cpu", "tier": "small",
                "price": {"input_per_mtok": "0.15", "output_per_mtok": "0.6"}}],
}), {}, [])


def route(examples: list[Example], threshold: float, output_tokens: int) -> dict[str, object]:
    tenant = TenantRouting(threshold=threshold)
    to_large: dict[str, list[bool]] = {"one-hop": [], "multi-hop": []}
    cost = always_large = Decimal(0)
    timings = []
    for example in examples:
        messages = [{"role": "user", "content": example.question}]
        started = time.perf_counter()
        difficulty = assess(messages)
        decision = decide(CATALOG, RouteRequest("auto", difficulty=difficulty), tenant, BudgetSignal(), {})
        timings.append(time.perf_counter() - started)
        usage = Usage(input_tokens=count_messages(messages), output_tokens=output_tokens)
        cost += decision.target.price.cost(usage)
        always_large += CATALOG.models["large"].price.cost(usage)
        to_large[example.level].append(decision.target.tier == "large")
    shares = {level: sum(sent) / len(sent) for level, sent in to_large.items()}
    shares["all"] = sum(sum(s) for s in to_large.values()) / len(examples)
    p50, p99 = p50_p99(timings, 1e6)
    return {"shares": shares, "cost": cost, "always_large": always_large, "p50_us": p50,
            "p99_us": p99, "counts": {k: len(v) for k, v in to_large.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--thresholds", default="0.3,0.5")
    parser.add_argument("--output-tokens", type=int, default=200)
    args = parser.parse_args()
    examples = load_examples()
    for _ in range(200):  # warm-up: tiktoken's encoder, the model file
        assess([{"role": "user", "content": examples[0].question}])
    sets = {"held-out": [e for e in examples if e.held_out], "all 600 (incl. training)": examples}
    header = ["questions", "threshold", "to large: one-hop", "to large: multi-hop", "to large: all",
              "cost vs always-large", "saving", "route p50 us", "route p99 us"]
    rows = []
    for name, subset in sets.items():
        for threshold in (float(t) for t in args.thresholds.split(",")):
            r = route(subset, threshold, args.output_tokens)
            shares = r["shares"]
            assert isinstance(shares, dict)
            ratio = r["cost"] / r["always_large"]  # type: ignore[operator]
            rows.append([f"{name} ({len(subset)})", f"{threshold:.2f}", f"{shares['one-hop']:.1%}",
                         f"{shares['multi-hop']:.1%}", f"{shares['all']:.1%}",
                         f"${r['cost']:.4f} / ${r['always_large']:.4f} = {ratio:.1%}", f"{1 - ratio:.1%}",
                         f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\nrouting 'auto' on FreshQA (inspect-evals), large $3/$15 vs small $0.15/$0.60 per Mtok, "
          f"{args.output_tokens} output tokens per answer")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
