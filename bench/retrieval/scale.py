"""Retrieval at scale: query latency, HNSW build time, index size and recall@10 against exact search, at
100k and 1M chunks of 384 dimensions, through the store's real query (row-level security, the tenant
transaction, the iterative index scan, the join that fetches text and vectors).

Vectors are drawn from clusters, not uniform noise, so recall means something: 1,000 cluster centres in a
latent space of ``--latent`` dimensions (default 48), points scattered around them there, mapped into 384
dimensions by a fixed random linear map, plus a little isotropic noise, then normalised. Sentence embeddings
behave so (their intrinsic dimension measures in the tens); ``--latent 0`` draws the clusters directly in
384 dimensions instead, an adversarial case where neighbours within a cluster are nearly equidistant.
Two tenants: one holds 99% of the rows, the other 1% (a selective filter); both are queried.

    .venv/bin/python bench/retrieval/scale.py [--sizes 100000,1000000] [--queries 300] [--ef 40,100,200]
                                              [--latent 48] [--m 16] [--ef-construction 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector_async

from tollway.infra.db import migrate
from tollway.local.embedded import EmbeddedPostgres
from tollway.retrieval import Splitting, create_collection, store, tenant_tx

DIMS = 384
SMALL_SHARE = 0.01


class Space:
    def __init__(self, rng: np.random.Generator, latent: int) -> None:
        self.rng, self.latent = rng, latent
        width = latent or DIMS
        self.centres = rng.normal(0, 1, (1000, width)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.lift = rng.normal(0, 1 / np.sqrt(width), (width, DIMS)).astype(np.float32) if latent else None

    def draw(self, n: int) -> np.ndarray[Any, Any]:
        width = self.latent or DIMS
        picks = self.rng.integers(0, len(self.centres), n)
        v = self.centres[picks] + self.rng.normal(0, 0.9 / np.sqrt(width), (n, width)).astype(np.float32)
        if self.lift is not None:
            v = v @ self.lift + self.rng.normal(0, 0.05 / np.sqrt(DIMS), (n, DIMS)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


async def load(url: str, vectors: np.ndarray[Any, Any], start: int, owners: np.ndarray[Any, Any],
               ids: dict[str, Any]) -> None:
    """COPY the chunks in (as the superuser: loading is not what is measured)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute("DROP INDEX IF EXISTS rag_chunks_hnsw_384")  # rebuilt after the load
        cur = conn.cursor()
        async with cur.copy("COPY rag_chunks (tenant_id, collection_id, document_id, section_id, ord, text,"
                            " token_count, dims, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int8", "int8", "int8", "int4", "text", "int4", "int4", "halfvec"])
            for i, v in enumerate(vectors):
                who = ids["small"] if owners[i] else ids["big"]
                await copy.write_row((who["tenant"], who["collection"], who["document"], who["section"],
                                      start + i, f"chunk {start + i}", 3, DIMS, HalfVector(v.astype(np.float16))))


async def setup(url: str) -> dict[str, Any]:
    await migrate(url)
    out: dict[str, Any] = {}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute("DROP INDEX IF EXISTS rag_chunks_hnsw_384")
        for name in ("big", "small"):
            cur = await conn.execute("INSERT INTO tenants (name) VALUES (%s) RETURNING id", (f"bench-{name}",))
            tid = (await cur.fetchone())[0]  # type: ignore[index]
            coll = await create_collection(conn, tid, "docs", embedder="synthetic", dims=DIMS, splitting=Splitting())
            zero = HalfVector(np.ones(DIMS, dtype=np.float16) / np.sqrt(DIMS))
            async with tenant_tx(conn, tid):
                cur = await conn.execute(
                    "INSERT INTO rag_documents (tenant_id, collection_id, source, title, format, content_hash,"
                    " token_count, dims, embedding) VALUES (%s, %s, 's', 't', 'text', 'h', 1, %s, %s) RETURNING id",
                    (tid, coll.id, DIMS, zero))
                doc = (await cur.fetchone())[0]  # type: ignore[index]
                cur = await conn.execute(
                    "INSERT INTO rag_sections (tenant_id, collection_id, document_id, ord, heading, text,"
                    " token_count, dims, embedding) VALUES (%s, %s, %s, 0, '', '', 1, %s, %s) RETURNING id",
                    (tid, coll.id, doc, DIMS, zero))
                sec = (await cur.fetchone())[0]  # type: ignore[index]
            out[name] = {"tenant": tid, "collection": coll.id, "document": doc, "section": sec, "coll": coll}
    return out


async def build_index(url: str, m: int, ef_construction: int) -> tuple[float, int, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DROP INDEX IF EXISTS rag_chunks_hnsw_384")
        await conn.execute("SET maintenance_work_mem = '8GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 1")  # the leader and one worker: 2 cores
        await conn.execute("VACUUM ANALYZE rag_chunks")
        t = time.perf_counter()
        await conn.execute("CREATE INDEX rag_chunks_hnsw_384 ON rag_chunks USING hnsw"
                           " ((embedding::halfvec(384)) halfvec_cosine_ops)"
                           f" WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) WHERE dims = 384")
        took = time.perf_counter() - t
        await conn.execute("ANALYZE rag_chunks")
        cur = await conn.execute("SELECT pg_relation_size('rag_chunks_hnsw_384'), pg_total_relation_size('rag_chunks')")
        index_bytes, table_bytes = await cur.fetchone()  # type: ignore[misc]
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        await conn.execute("SELECT pg_prewarm('rag_chunks_hnsw_384')")
    return took, index_bytes, table_bytes


async def measure(url: str, who: dict[str, Any], queries: np.ndarray[Any, Any], truth: list[set[int]],
                  ef: int, id_of: dict[int, int]) -> dict[str, float]:
    latencies, recalls = [], []
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for _ in range(2):  # warm: the first pass reads pages in
            for q in queries[:20]:
                async with tenant_tx(conn, who["tenant"]):
                    await store.set_search(conn, ef)
                    await store.nearest_chunks(conn, who["coll"], q, 10, None)
        for q, want in zip(queries, truth, strict=True):
            t = time.perf_counter()
            async with tenant_tx(conn, who["tenant"]):
                await store.set_search(conn, ef)
                got = await store.nearest_chunks(conn, who["coll"], q, 10, None)
            latencies.append((time.perf_counter() - t) * 1000)
            recalls.append(len({id_of[c.chunk_id] for c in got} & want) / 10)
        async with tenant_tx(conn, who["tenant"]):
            await store.set_search(conn, ef)
            cur = await conn.execute(
                "EXPLAIN (FORMAT TEXT) SELECT c.id FROM rag_chunks c WHERE c.collection_id = %s AND c.dims = 384"
                " ORDER BY c.embedding::halfvec(384) <=> %s LIMIT 10",
                (who["coll"].id, HalfVector(queries[0].astype(np.float16))))
            plan = " ".join(r[0].strip() for r in await cur.fetchall())
    return {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "p99": pct(latencies, 99),
            "recall": float(np.mean(recalls)), "index_scan": float("Index Scan using rag_chunks_hnsw" in plan)}


async def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(7)
    space = Space(rng, args.latent)
    sizes = [int(s) for s in args.sizes.split(",")]
    efs = [int(e) for e in args.ef.split(",")]
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        url = pg.start()
        try:
            ids = await setup(url)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute("ALTER SYSTEM SET shared_buffers = '3GB'")
                await conn.execute("ALTER SYSTEM SET effective_cache_size = '12GB'")
                await conn.execute("ALTER SYSTEM SET jit = off")
            pg.stop()
            url = pg.start()
            all_vectors = np.zeros((0, DIMS), dtype=np.float32)
            owners = np.zeros(0, dtype=bool)
            queries = space.draw(args.queries)
            print(f"{'chunks':>9} {'tenant rows':>12} {'ef':>4} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
                  f" {'recall@10':>9} {'hnsw':>5}", flush=True)
            for size in sizes:
                add = size - len(all_vectors)
                fresh = space.draw(add)
                fresh_owner = rng.random(add) < SMALL_SHARE
                t = time.perf_counter()
                await load(url, fresh, len(all_vectors), fresh_owner, ids)
                loaded = time.perf_counter() - t
                all_vectors = np.concatenate([all_vectors, fresh])
                owners = np.concatenate([owners, fresh_owner])
                took, index_bytes, table_bytes = await build_index(url, args.m, args.ef_construction)
                print(f"# {size:,} chunks: COPY {loaded:.0f} s; HNSW build {took:.0f} s (m={args.m},"
                      f" ef_construction={args.ef_construction}, latent dimensions {args.latent or DIMS},"
                      f" halfvec, maintenance_work_mem 8GB, 2 workers); index {index_bytes / 2**20:.0f} MiB,"
                      f" table+indexes {table_bytes / 2**20:.0f} MiB", flush=True)
                async with await psycopg.AsyncConnection.connect(url) as conn:
                    cur = await conn.execute("SELECT id, ord FROM rag_chunks WHERE ord >= 0 AND text LIKE 'chunk %'")
                    id_of = {int(r[0]): int(r[1]) for r in await cur.fetchall()}
                for name, mask in (("big", ~owners), ("small", owners)):
                    rows = np.nonzero(mask)[0]
                    sims = queries @ all_vectors[rows].T
                    truth = [set(rows[np.argsort(-s)[:10]].tolist()) for s in sims]
                    for ef in efs:
                        m = await measure(url, ids[name], queries, truth, ef, id_of)
                        print(f"{size:>9,} {len(rows):>12,} {ef:>4} {m['p50']:>7.2f} {m['p95']:>7.2f} {m['p99']:>7.2f}"
                              f" {m['recall']:>9.3f} {'yes' if m['index_scan'] else 'no':>5}", flush=True)
        finally:
            pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef", default="40,100,200")
    parser.add_argument("--latent", type=int, default=48)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
