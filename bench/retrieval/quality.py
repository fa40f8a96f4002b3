"""Retrieval quality and ingestion speed on real data shipped inside a PyPI package: the tau2
``banking_knowledge`` knowledge base in ``inspect-evals`` (698 markdown documents with sections) and its
97 tasks, each naming the documents an agent needs (about 10 per task). The query is the task's user
scenario as written (long and noisy: persona, income, preferences), embedded by the local embedder.

Recall is the share of a task's required documents that appear among the cited sources; context tokens
are what the system message costs (tiktoken), framing and citation headers included. Curves:
flat top-k for k = 1..10 (no budget), hierarchical packing for budgets 100..2,000 tokens, each with and
without hybrid lexical fusion. The summary line compares tokens at the recall flat top-5 reaches.

    .venv/bin/python bench/retrieval/quality.py [--tasks N]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
from common import bench_tenant

from tollway.retrieval import (
    LocalEmbedder,
    NewDocument,
    Query,
    Searcher,
    Splitting,
    create_collection,
    prepare,
    to_embed,
    write,
)
from tollway.retrieval.embedders import Embedded

BUDGETS = (100, 200, 300, 400, 500, 750, 1000, 1500, 2000)


def data_dir() -> Path:
    spec = importlib.util.find_spec("inspect_evals")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("inspect-evals is not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "tau2/data/domains/banking_knowledge"


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which a (tokens, recall) curve, sorted by tokens, first reaches ``target`` (linear between
    measured points)."""
    prev = None
    for tokens, recall in points:
        if recall >= target:
            if prev is None or recall == prev[1]:
                return tokens
            t0, r0 = prev
            return t0 + (tokens - t0) * (target - r0) / (recall - r0)
        prev = (tokens, recall)
    return None


async def run(args: argparse.Namespace) -> None:
    folder = data_dir()
    docs = json.loads(gzip.open(folder / "documents.json.gz").read())
    tasks = json.loads((folder / "tasks.json").read_text())[: args.tasks]
    embedder = LocalEmbedder()
    embedder.load()
    async with bench_tenant() as (conn, tid):
        coll = await create_collection(conn, tid, "bank", embedder=embedder.name, dims=embedder.dims,
                                       splitting=Splitting())
        new = [NewDocument(source=d["id"], text=d["content"], format="markdown", title=d["title"]) for d in docs]
        t0 = time.perf_counter()
        prepared = await prepare(conn, coll, new, max_tokens=10**6)
        t1 = time.perf_counter()
        texts = to_embed(prepared)
        embedded = await embedder.embed(texts)
        t2 = time.perf_counter()
        await write(conn, coll, prepared, embedded.vectors, embedder)
        t3 = time.perf_counter()
        chunks = len(texts)
        sections = sum(len(p.parsed.sections) for p in prepared)
        tokens = sum(p.parsed.tokens for p in prepared)
        print(f"# ingestion: {len(docs)} documents, {sections} sections, {chunks} chunks, {tokens:,} tokens"
              f" in {t3 - t0:.1f} s = {len(docs) / (t3 - t0):.1f} documents/s, {chunks / (t3 - t0):.1f}"
              f" chunks/s (parse+split {t1 - t0:.1f} s, embed {t2 - t1:.1f} s = {chunks / (t2 - t1):.1f}"
              f" chunks/s, write {t3 - t2:.1f} s)", flush=True)
        queries = [t["user_scenario"]["instructions"] for t in tasks]
        wanted = [set(t["required_documents"]) for t in tasks]
        qv = await embedder.embed(queries)
        searcher = Searcher(lambda name, dims: embedder)

        async def curve(mode: str, hybrid: bool, settings: list[tuple[int | None, int]]) -> list[tuple[float, float, float]]:
            out = []
            for k, budget in settings:
                recalls, used, latency = [], [], []
                for i, (text, want) in enumerate(zip(queries, wanted, strict=True)):
                    one = Embedded(qv.vectors[i:i + 1], 0, 0.0)
                    q = Query(text=text, context_tokens=budget, k=k, mode=mode, hybrid=hybrid)  # type: ignore[arg-type]
                    s = time.perf_counter()
                    found = await searcher.search_with(conn, tid, "bank", q, one, embedder.name)
                    latency.append((time.perf_counter() - s) * 1000)
                    got = {p.source for p in found.passages}
                    recalls.append(len(got & want) / len(want))
                    used.append(found.context_tokens)
                out.append((statistics.mean(used), statistics.mean(recalls), statistics.median(latency)))
            return out

        results: dict[str, list[tuple[float, float, float]]] = {}
        labels: dict[str, list[str]] = {}
        for hybrid in (False, True):
            tag = "+hybrid" if hybrid else ""
            results["flat" + tag] = await curve("flat", hybrid, [(k, 10**6) for k in range(1, 11)])
            labels["flat" + tag] = [f"k={k}" for k in range(1, 11)]
            results["hierarchical" + tag] = await curve("hierarchical", hybrid, [(None, b) for b in BUDGETS])
            labels["hierarchical" + tag] = [f"{b} tok" for b in BUDGETS]

    print(f"\n{'curve':<20} {'point':>9} {'context tokens':>15} {'recall':>7} {'search p50 ms':>14}")
    for name, points in results.items():
        for label, (tokens, recall, ms) in zip(labels[name], points, strict=True):
            print(f"{name:<20} {label:>9} {tokens:>15.0f} {recall:>7.3f} {ms:>14.1f}")
    print()
    for tag in ("", "+hybrid"):
        flat = results["flat" + tag]
        target_tokens, target = flat[4][0], flat[4][1]
        hier = sorted((t, r) for t, r, _ in results["hierarchical" + tag])
        at = crossing(hier, target)
        if at is None:
            print(f"flat{tag} top-5: recall {target:.3f} at {target_tokens:.0f} tokens; hierarchical{tag} never "
                  "reaches it within 2,000 tokens")
        else:
            print(f"flat{tag} top-5: recall {target:.3f} at {target_tokens:.0f} tokens; hierarchical{tag} reaches it "
                  f"at {at:.0f} tokens: {1 - at / target_tokens:.0%} fewer context tokens")
    best_flat = max(results["flat"], key=lambda p: p[1])
    print(f"best flat recall (k=10): {best_flat[1]:.3f} at {best_flat[0]:.0f} tokens; hierarchical at 2,000: "
          f"{results['hierarchical'][-1][1]:.3f} at {results['hierarchical'][-1][0]:.0f} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=97)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
