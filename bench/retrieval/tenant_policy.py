"""Row-level security's tenant check per row against once per statement (migration 0020), on a database kept by
lexical_scale.py, in one process: the policies of the six retrieval tables are switched between the two forms
before each search (the order alternates query by query, so the machine's drift falls on both), and each form
is timed on BM25 alone and on the whole default search with the query embedded meanwhile, as the gateway does.
The policies are left in migration 0020's form.

    .venv/bin/python bench/retrieval/lexical_scale.py --sizes 100000 --data DIR     # once: builds DIR/100000
    .venv/bin/python bench/retrieval/tenant_policy.py --data DIR [--queries 220]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
from common import bench_tenant
from lexical_scale import ms, sentences

from tollway.retrieval import Query, Tuning, store
from tollway.retrieval.embedders import LocalEmbedder
from tollway.retrieval.search import Searcher

TABLES = ("rag_collections", "rag_documents", "rag_sections", "rag_chunks", "rag_terms", "rag_postings")
FORMS = {"per row (rag_tenant())": "tenant_id = rag_tenant()",
         "once (SELECT rag_tenant())": "tenant_id = (SELECT rag_tenant())"}


async def run(args: argparse.Namespace) -> None:
    queries = random.Random(args.seed).sample(sentences(), args.queries)
    embedder = LocalEmbedder()
    embedder.load()
    searcher = Searcher(lambda name, dims: None, Tuning())
    lexical: dict[str, list[float]] = {form: [] for form in FORMS}
    whole: dict[str, list[float]] = {form: [] for form in FORMS}
    async with bench_tenant(Path(args.data) / str(args.size)) as (conn, tid):
        try:
            for i, text in enumerate(queries):
                for form in (list(FORMS) if i % 2 else list(FORMS)[::-1]):
                    for table in TABLES:
                        await conn.execute(f"ALTER POLICY tenant_isolation ON {table} USING ({FORMS[form]})"
                                           f" WITH CHECK ({FORMS[form]})")
                    async with store.tenant_tx(conn, tid):
                        coll = await store.get_collection(conn, tid, f"shaped{args.size}")
                        began = time.perf_counter()
                        await store.lexical_chunks(conn, coll, text, Tuning().candidates, None)
                        alone = (time.perf_counter() - began) * 1000
                    began = time.perf_counter()
                    embedding = asyncio.ensure_future(embedder.embed([text], query=True))
                    await searcher.search_with(conn, tid, f"shaped{args.size}", Query(text=text, context_tokens=600),
                                               embedding, "bench")
                    if i >= args.warmup:
                        lexical[form].append(alone)
                        whole[form].append((time.perf_counter() - began) * 1000)
        finally:
            now = FORMS["once (SELECT rag_tenant())"]
            for table in TABLES:
                await conn.execute(f"ALTER POLICY tenant_isolation ON {table} USING ({now}) WITH CHECK ({now})")
    print(f"# {args.queries - args.warmup} queries each at {args.size:,} chunks, the forms taking turns")
    for form in FORMS:
        print(f"  {form:<28} BM25 alone: {ms(lexical[form])}   whole search, 600 tokens: {ms(whole[form])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder lexical_scale.py --data kept")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=220)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
