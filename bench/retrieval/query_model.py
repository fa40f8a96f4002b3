"""The local embedder's int8 query model against the packaged model, side by side in one run: the time to
embed a query (one and two onnxruntime threads), the cosine between the two vectors of each query, and, per
corpus and budget, the default search's recall and answer in context with each query's vector from one model
and from the other (the same ingest: the stored vectors are the packaged model's either way), with a paired
sign test.

    .venv/bin/python bench/retrieval/query_model.py [--corpora banking,faq,foldoc,pydocs,pgdocs,jargon,debref,devil]
        [--budgets 150,300,600] [--data DIR]     # DIR: the ingests kept by versus_bm25.py --data DIR
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
import corpora
import versus_bm25
from common import bench_tenant

from tollway.retrieval import LocalEmbedder, Query, Searcher, Splitting, Tuning
from tollway.retrieval.embedders import Embedded, default_models_dir, query_model_file


def speed(texts: list[str]) -> None:
    """ms per query, each alone, the two models at one and two threads, taking turns."""
    LocalEmbedder()._model(query=True)  # built here if it is not yet
    path = query_model_file(default_models_dir())
    arms = {}
    for threads in (1, 2):
        exact = LocalEmbedder(threads=threads, query_model=False)
        fast = LocalEmbedder(threads=threads)
        fast.__dict__["_query_session"] = fast._new_session(path, threads)
        arms[f"packaged, {threads} thread{'s' * (threads > 1)}"] = (exact, False)
        arms[f"query model, {threads} thread{'s' * (threads > 1)}"] = (fast, True)
    took: dict[str, list[float]] = {name: [] for name in arms}
    for embedder, query in arms.values():
        embedder.embed_sync(texts[:5], query=query)
    for text in texts:
        for name, (embedder, query) in arms.items():
            began = time.perf_counter()
            embedder.embed_sync([text], query=query)
            took[name].append((time.perf_counter() - began) * 1000)
    print(f"# {len(texts)} queries, each alone, ms (p50 / p95)")
    for name, values in took.items():
        print(f"  {name:<26} {statistics.median(values):5.2f} / {float(np.percentile(values, 95)):5.2f}")


def paired(a: list[float], b: list[float]) -> str:
    better = sum(x > y for x, y in zip(a, b, strict=True))
    worse = sum(x < y for x, y in zip(a, b, strict=True))
    p = binomtest(better, better + worse).pvalue if better + worse else 1.0
    return f"+{better} -{worse} (p {p:.2g})"


async def quality(args: argparse.Namespace) -> None:
    embedder = LocalEmbedder()
    embedder.load()
    searcher = Searcher(lambda name, dims: embedder, Tuning())
    budgets = [int(b) for b in args.budgets.split(",")]
    async with bench_tenant(args.data) as (conn, tid):
        for corpus in corpora.load(args.corpora.split(","), None):
            name, _, _, _, _, answerable = await versus_bm25.ready(conn, tid, corpus, embedder, Splitting())
            texts = [a.text for a in corpus.asks]
            arms = {"packaged": await embedder.embed(texts), "query model": await embedder.embed(texts, query=True)}
            cos = (arms["packaged"].vectors * arms["query model"].vectors).sum(axis=1)
            print(f"\n## {corpus.name}{' (held out)' if corpus.held_out else ''}: {len(texts)} queries; cosine "
                  f"min {cos.min():.4f}, mean {cos.mean():.4f}")
            for budget in budgets:
                recall: dict[str, list[float]] = {arm: [] for arm in arms}
                inctx: dict[str, list[float]] = {arm: [] for arm in arms}
                for i, ask in enumerate(corpus.asks):
                    for arm, embedded in arms.items():
                        found = await searcher.search_with(conn, tid, name,
                                                           Query(text=ask.text, context_tokens=budget),
                                                           Embedded(embedded.vectors[i:i + 1], 0, 0.0), embedder.name)
                        recall[arm].append(len({p.source for p in found.passages} & ask.gold) / len(ask.gold))
                        if answerable[i]:
                            inctx[arm].append(float(versus_bm25.flat(ask.answer or "")
                                                    in versus_bm25.flat(found.context)))
                line = (f"  {budget:>4} tokens: recall {statistics.mean(recall['packaged']):.3f} -> "
                        f"{statistics.mean(recall['query model']):.3f} {paired(recall['query model'], recall['packaged'])}")
                if inctx["packaged"]:
                    line += (f"; answer in context {statistics.mean(inctx['packaged']):.3f} -> "
                             f"{statistics.mean(inctx['query model']):.3f} "
                             f"{paired(inctx['query model'], inctx['packaged'])}")
                print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="banking,faq,foldoc,pydocs,pgdocs,jargon,debref,devil")
    parser.add_argument("--budgets", default="150,300,600")
    parser.add_argument("--data", default=None, help="keep the ingested corpora here (versus_bm25.py's --data)")
    parser.add_argument("--speed-queries", type=int, default=300)
    args = parser.parse_args()
    names = args.corpora.split(",")
    if need := [p for n, (p, _) in corpora.DEBIAN.items() if n in names and p in corpora.missing()]:
        raise SystemExit(f"install the corpora first: apt-get install {' '.join(need)}")
    from lexical_scale import sentences

    speed(random.Random(3).sample(sentences(), args.speed_queries))
    asyncio.run(quality(args))


if __name__ == "__main__":
    sys.exit(main())
