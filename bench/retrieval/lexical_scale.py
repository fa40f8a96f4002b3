"""BM25 inside PostgreSQL at scale: what the term statistics cost at ingest, and what a lexical query and a
whole hybrid search cost, at 100k (and more) chunks of real prose.

Chunks are made of sentences of the Free On-line Dictionary of Computing (Debian's ``dict-foldoc``), six
drawn at random per chunk (about 120 words), 50 chunks per document, each with its tiktoken count as ingest
stores it. Vectors are random but shaped like a corpus's: each document has a direction, its chunks scatter
around it, its section's and its own vector are their centroid (so neighbours, near-duplicates and the
packer's floor behave as on real text; bench/retrieval/scale.py measures the vector side at 1M). Queries:
200 single sentences of the same source (about 20 words) and 50 long ones of 250 words (the length that
cost ``ts_rank`` 90 ms). Each query runs through the store's real function inside a tenant transaction
(row-level security on).

``--http``: the same short queries through a running gateway as a client sends them (``tollway serve`` on this
database, ``POST /v1/retrieval/search``, the default search at 600 tokens), the query embedded by the packaged
embedder on every request (the collection names it; the chunks' vectors are still the bench's).

    .venv/bin/python bench/retrieval/lexical_scale.py [--sizes 100000] [--queries 200] [--postings 20000,5000,2000]
        [--data DIR]    # keep the database in DIR: a later run with the same size reads it instead of writing it
        [--http]        # and the whole search over HTTP with the query's embedding
        [--chat]        # and a chat completion with that retrieval over HTTP (the scripted upstream answers)
        [--before REV]  # over HTTP: REV's gateway beside today's on the same database, the two taking turns
        [--per-section N]  # sections of N chunks (a collection of its own, "shaped{size}-s{N}"), not one of 50
        [--only-http]   # the HTTP timings only (the database kept in --data)
        [--clients N]   # over HTTP, N clients at once (the gateways taking turns by round; the rate each sustained)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pgvector import HalfVector
from pgvector.psycopg import register_vector_async
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
import corpora
from common import CLI, Processes, bench_tenant, package_at, start_gateway, start_sim

from tollway.retrieval import Query, Searcher, Splitting, Tuning, create_collection, store, tenant_tx
from tollway.retrieval.embedders import LOCAL_NAME, Embedded, normalise
from tollway.routing import count_text

DIMS = 384
PER_DOC = 50


def sentences() -> list[str]:
    corpus = corpora.foldoc(entries=100_000, queries=0)
    out = []
    for doc in corpus.docs:
        out += [s for s in corpora._SENTENCE.split(doc.text)[::2] if 5 <= len(s.split()) <= 40]
    return out


def shaped(rng: np.random.Generator) -> np.ndarray:
    """A document's chunk vectors: its direction plus noise of 0.8 its size (cosines of about 0.6 between
    chunks of one document, about 0 across documents)."""
    direction = rng.standard_normal(DIMS)
    return normalise(direction + 0.8 * rng.standard_normal((PER_DOC, DIMS)))


def ms(values: list[float]) -> str:
    values = sorted(values)
    return (f"p50 {statistics.median(values):6.1f} ms  p95 {values[int(0.95 * (len(values) - 1))]:6.1f} ms  "
            f"max {values[-1]:6.1f} ms")


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(5)
    pool = sentences()
    print(f"# {len(pool):,} sentences of FOLDOC to draw from")
    for size in (int(s) for s in args.sizes.split(",")):
        async with bench_tenant(args.data and Path(args.data) / str(size)) as (conn, tid):
            await register_vector_async(conn)
            # (a database kept by the earlier writer, whose vectors were all one, holds "big{size}")
            cname = f"shaped{size}" + ("" if args.per_section >= PER_DOC else f"-s{args.per_section}")
            async with tenant_tx(conn, tid):
                kept = await (await conn.execute("SELECT id FROM rag_collections WHERE name = %s", (cname,))).fetchone()
            if kept is None:
                coll = await create_collection(conn, tid, cname, embedder=LOCAL_NAME, dims=DIMS, splitting=Splitting())
            async with tenant_tx(conn, tid):
                coll = await store.get_collection(conn, tid, cname)
            t0 = time.perf_counter()
            for d in range(0 if kept is None else size // PER_DOC, size // PER_DOC):
                texts = [" ".join(rng.sample(pool, 6)) for _ in range(PER_DOC)]
                vectors = shaped(np.random.default_rng(d))
                vec = HalfVector(normalise(vectors.mean(axis=0, keepdims=True))[0])
                async with tenant_tx(conn, tid):
                    doc = (await (await conn.execute(
                        "INSERT INTO rag_documents (tenant_id, collection_id, source, title, format, content_hash,"
                        " token_count, dims, embedding) VALUES (%s, %s, %s, %s, 'text', 'x', 0, %s, %s)"
                        " RETURNING id", (tid, coll.id, f"d{d}", f"Document {d}", DIMS, vec))).fetchone())[0]  # type: ignore[index]
                    # its sections: runs of --per-section chunks, each section's vector their centroid
                    starts = range(0, PER_DOC, args.per_section)
                    secs = [(await (await conn.execute(
                        "INSERT INTO rag_sections (tenant_id, collection_id, document_id, ord, heading, text,"
                        " token_count, dims, embedding) VALUES (%s, %s, %s, %s, '', '', 0, %s, %s) RETURNING id",
                        (tid, coll.id, doc, i, DIMS,
                         vec if args.per_section >= PER_DOC else HalfVector(normalise(
                             vectors[at:at + args.per_section].mean(axis=0, keepdims=True))[0])))).fetchone())[0]  # type: ignore[index]
                            for i, at in enumerate(starts)]
                    rows = [(tid, coll.id, doc, secs[j // args.per_section], j, t, f"Document {d}", count_text(t), "{}",
                             DIMS, HalfVector(v)) for j, (t, v) in enumerate(zip(texts, vectors, strict=True))]
                    await conn.execute(
                        "INSERT INTO rag_chunks (tenant_id, collection_id, document_id, section_id, ord, text,"
                        " lex_head, token_count, metadata, dims, embedding) VALUES "
                        + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(rows)),
                        [v for r in rows for v in r])
            took = time.perf_counter() - t0
            await conn.execute("VACUUM ANALYZE rag_postings")
            await conn.execute("VACUUM ANALYZE rag_terms")
            sizes = await (await conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('rag_postings')),"
                " pg_size_pretty(pg_total_relation_size('rag_terms')), (SELECT count(*) FROM rag_terms)")).fetchone()
            written = (f"written with their term statistics at {size / took:,.0f} chunks/s (one INSERT of {PER_DOC}"
                       " per document)" if kept is None else f"kept in {args.data}")
            print(f"\n## {size:,} chunks: {written}; postings {sizes[0]}, terms {sizes[1]} "  # type: ignore[index]
                  f"({sizes[2]:,} distinct)")  # type: ignore[index]
            short = rng.sample(pool, args.queries)
            long = [" ".join(rng.sample(pool, 15))[:1800] for _ in range(50)]
            long = [" ".join(q.split()[:250]) for q in long]
            for budget in ([] if args.only_http else (int(b) for b in args.postings.split(","))):
                searcher = Searcher(lambda name, dims: None, Tuning(lexical_postings=budget))  # type: ignore[arg-type,return-value]
                print(f"postings budget {budget:,}:")
                for name, queries in (("short (~20 words)", short), ("long (250 words)", long)):
                    lexical, whole, overlap = [], [], []
                    for text in queries:
                        async with tenant_tx(conn, tid):
                            s = time.perf_counter()
                            got = await store.lexical_chunks(conn, coll, text, 64, None, budget)
                            lexical.append((time.perf_counter() - s) * 1000)
                            exact = await store.lexical_chunks(conn, coll, text, 10, None, 10**9)
                        top = {i for i, _ in exact.scores}
                        overlap.append(len(top & {i for i, _ in got.scores[:10]}) / max(len(top), 1))
                        q = np.random.default_rng(len(text)).standard_normal(DIMS).astype(np.float32)
                        q /= np.linalg.norm(q)
                        s = time.perf_counter()
                        await searcher.search_with(conn, tid, cname, Query(text=text, context_tokens=600),
                                                   Embedded(q[None, :], 0, 0.0), "bench")
                        whole.append((time.perf_counter() - s) * 1000)
                    print(f"  {name:<18} BM25 alone: {ms(lexical)}   whole hybrid search: {ms(whole)}   "
                          f"top-10 equal to exact BM25's: {statistics.mean(overlap):.3f}", flush=True)
            if args.http:
                print(f"over HTTP{f', {args.clients} clients at once' if args.clients > 1 else ''}: "
                      f"{over_http(conn.info.dsn, cname, short, before=args.before, at_once=args.clients)}", flush=True)
            if args.chat:
                print("a chat with retrieval over HTTP: "
                      f"{over_http(conn.info.dsn, cname, short, chat=True, before=args.before)}", flush=True)


def over_http(dsn: str, collection: str, queries: list[str], chat: bool = False, before: str | None = None,
              at_once: int = 1) -> str:
    """The default search through `tollway serve` on this database: each query timed at the client. ``chat``: a
    chat completion with retrieval instead (the scripted upstream's answer, four tokens at most). ``before``: a
    second gateway runs an earlier commit's package beside today's, on the same database, and the two take turns
    query by query (which goes first alternates), so the machine's drift falls on both. ``at_once`` > 1: that many
    clients at once, each sending its share of the queries, the gateways taking turns by round (four rounds),
    with the rate each sustained besides the latency."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="tollway-lex-http-") as tmp:
        env = {"TOLLWAY_DATABASE_URL": _url(dsn), "TOLLWAY_DATA_DIR": tmp, "TOLLWAY_BOOTSTRAP": "false",
               "TOLLWAY_KEY_SECRET": "tollway-bench-lexical-scale"}  # one secret for every run on a kept database
        procs = Processes(Path(tmp), {**os.environ, **env})
        try:
            sim, _ = start_sim(procs)
            gateways = {"now": start_gateway(procs, sim, data=None, bench_tenant=False)}
            if before is not None:
                gateways[f"before ({before})"] = start_gateway(procs, sim, data=None, bench_tenant=False,
                                                                 name="tollway-before",
                                                                 env=package_at(before, Path(tmp)))
            made = subprocess.run([*CLI, "keys", "create", "--tenant", "bench"], check=True, capture_output=True,
                                  text=True, env=procs.env, cwd=tmp)
            key = next(w for w in made.stdout.split() if w.startswith("tw-"))
            clients = {name: httpx.Client(base_url=g.url, headers={"authorization": f"Bearer {key}"}, timeout=30,
                                          limits=httpx.Limits(max_connections=at_once))
                       for name, g in gateways.items()}
            took: dict[str, list[float]] = {name: [] for name in clients}
            try:
                if at_once > 1:
                    return _concurrent(clients, queries, collection, at_once)
                for i, text in enumerate([*queries[:5], *queries]):  # the first five warm up (the embedder loads)
                    for name in (list(clients) if i % 2 else list(clients)[::-1]):
                        s = time.perf_counter()
                        resp = (clients[name].post("/chat/completions", json={
                                    "model": "sim-small", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": text}],
                                    "retrieval": {"collection": collection, "context_tokens": 600}}) if chat else
                                clients[name].post("/retrieval/search", json=_search(collection, text)))
                        if i >= 5:
                            took[name].append((time.perf_counter() - s) * 1000)
                        assert resp.status_code == 200, resp.text
            finally:
                for client in clients.values():
                    client.close()
            if before is None:
                return ms(took["now"])
            return "".join(f"\n  {name:<24} {ms(values)}" for name, values in took.items())
        finally:
            procs.stop()


def _concurrent(clients: dict[str, Any], queries: list[str], collection: str, n: int) -> str:
    """Each gateway in turn (four rounds, which goes first alternating) under ``n`` clients at once; the
    latency of every search and the searches a second each sustained."""
    from concurrent.futures import ThreadPoolExecutor

    took: dict[str, list[float]] = {name: [] for name in clients}
    rates: dict[str, list[float]] = {name: [] for name in clients}

    def one(client: Any, text: str) -> float:
        s = time.perf_counter()
        resp = client.post("/retrieval/search", json=_search(collection, text))
        assert resp.status_code == 200, resp.text
        return (time.perf_counter() - s) * 1000

    with ThreadPoolExecutor(n) as workers:
        for client in clients.values():  # warm up: the embedder loads, the pool grows
            list(workers.map(lambda t, c=client: one(c, t), queries[:2 * n]))
        for r in range(4):
            for name in (list(clients) if r % 2 else list(clients)[::-1]):
                began = time.perf_counter()
                times = list(workers.map(lambda t, c=clients[name]: one(c, t), queries))
                rates[name].append(len(queries) / (time.perf_counter() - began))
                took[name] += times
    return "".join(f"\n  {name:<24} {ms(took[name])}  searches/s per round "
                   + " / ".join(f"{x:.0f}" for x in rates[name]) for name in clients)


def _search(collection: str, text: str) -> dict[str, Any]:
    """The body of the default search the bench times over HTTP: 600 tokens of context."""
    return {"collection": collection, "query": text, "context_tokens": 600}


def _url(dsn: str) -> str:
    """A libpq keyword DSN (what psycopg reports) as a URL the gateway's settings read."""
    parts = conninfo_to_dict(dsn)
    return f"postgresql://{parts.get('user', 'postgres')}@{parts['host']}:{parts['port']}/{parts['dbname']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--postings", default="20000,5000,2000", help="postings budgets to compare (Tuning)")
    parser.add_argument("--data", help="keep the database here, one per size, and reuse it")
    parser.add_argument("--http", action="store_true", help="also the whole search over HTTP with the embedding")
    parser.add_argument("--chat", action="store_true", help="also a chat completion with retrieval over HTTP")
    parser.add_argument("--per-section", type=int, default=PER_DOC,
                        help="chunks per section (default: one section of 50 per document; the product's splitter "
                             "makes sections of at most section_tokens, 1024: about 5-6 chunks of 200)")
    parser.add_argument("--before", help="over HTTP, an earlier commit's gateway beside today's, taking turns")
    parser.add_argument("--clients", type=int, default=1, help="over HTTP, this many clients at once")
    parser.add_argument("--only-http", action="store_true", help="skip the in-process timings (with --http/--chat)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
