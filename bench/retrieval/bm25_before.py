"""The BM25 statement of today beside a revision's, on the 100k-chunk database ``lexical_scale.py --data`` keeps,
query by query in one process, taking turns (one tenant transaction, the same parameters): its time alone (p50 / p95
/ max, the second and third rounds) and whether the two rank the same best 10 and 64, on three query sets:

- ``short``: the 200 single FOLDOC sentences of ``lexical_scale.py`` (the same seed: the same queries);
- ``long``: its 50 questions of 250 words;
- ``rare+common``: 40 words of 300-3,000 postings, each beside one of the collection's five most common words (a
  query a user types, or one sent to cost the most: the common word's postings are past the budget).

    .venv/bin/python bench/retrieval/lexical_scale.py --sizes 100000 --data DIR       # once: builds the database
    .venv/bin/python bench/retrieval/bm25_before.py --data DIR --before REV
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
sys.path.insert(0, str(Path(__file__).parent))
import lexical_scale
from common import bench_tenant

from tollway.retrieval import store, tenant_tx

REPO = Path(__file__).resolve().parents[2]


def statement_at(rev: str) -> str:
    """The ``_BM25`` statement of ``rev``'s ``retrieval/store.py`` (its filter join left empty)."""
    source = subprocess.run(["git", "show", f"{rev}:retrieval/store.py"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    start = source.index('_BM25 = """') + len('_BM25 = """')
    return source[start:source.index('"""', start)].format(join="")


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"p50 {statistics.median(values):5.1f}  p95 {values[int(len(values) * 0.95)]:5.1f}  max {values[-1]:5.1f} ms"


async def run(args: argparse.Namespace) -> None:
    before = statement_at(args.before)
    rng = random.Random(5)  # lexical_scale.py's draws, in its order
    pool = lexical_scale.sentences()
    short = rng.sample(pool, 200)
    long = [" ".join(" ".join(rng.sample(pool, 15))[:1800].split()[:250]) for _ in range(50)]
    async with bench_tenant(Path(args.data) / "100000") as (conn, tid):
        async with tenant_tx(conn, tid):
            coll = await store.get_collection(conn, tid, "shaped100000")
            common = [r[0] for r in await (await conn.execute(
                "SELECT term FROM rag_terms WHERE collection_id = %s ORDER BY df DESC LIMIT 5", (coll.id,))).fetchall()]
            middling = [r[0] for r in await (await conn.execute(
                "SELECT term FROM rag_terms WHERE collection_id = %s AND df BETWEEN 300 AND 3000 AND term ~ '^[a-z]+$'"
                " ORDER BY term LIMIT 40", (coll.id,))).fetchall()]
        pick = random.Random(1)
        sets = {"short": short, "long": long, "rare+common": [f"{m} {pick.choice(common)}" for m in middling]}
        print(f"# {args.before} against now; common words: {', '.join(common)}")
        for name, queries in sets.items():
            times: dict[str, list[float]] = {"before": [], "now": []}
            same10, same64 = [], []
            async with tenant_tx(conn, tid):
                for round_ in range(3):
                    for i, text in enumerate(queries):
                        now, params = store._bm25(coll, text, 64, None, store.QUERY_POSTINGS)
                        ranked: dict[str, list[Any]] = {}
                        for label, sql in ([("before", before), ("now", now)] if (i + round_) % 2 else
                                           [("now", now), ("before", before)]):
                            start = time.perf_counter()
                            ranked[label] = [r[0] for r in await (await conn.execute(sql, params)).fetchall()]
                            if round_:
                                times[label].append((time.perf_counter() - start) * 1000)
                        if round_ == 1:
                            a, b = ranked["before"], ranked["now"]
                            same10.append(len(set(a[:10]) & set(b[:10])) / max(1, len(set(a[:10]))))
                            same64.append(len(set(a) & set(b)) / max(1, len(a)))
            print(f"{name:<12} before {ms(times['before'])}   now {ms(times['now'])}   "
                  f"best 10 the same {statistics.mean(same10):.3f}, best 64 {statistics.mean(same64):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder lexical_scale.py --data keeps its database in")
    ap.add_argument("--before", required=True, help="the revision whose statement runs beside today's")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
