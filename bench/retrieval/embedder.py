"""The packaged embedder's threading against an earlier commit's (``--before``: its ``retrieval/embedders.py``,
loaded as a module of its own), in one process, the arms taking turns round by round, on tau2 banking's
documents (inspect-evals' package):

- a query alone (one short text), and beside a process that keeps one core busy (as PostgreSQL does while a
  search ranks lexically beside the query's embedding);
- concurrent queries (``--callers`` at once), the rate and each query's latency;
- an ingestion (``--chunks`` chunk-sized texts of ~800 characters in calls of 256), its rate, the latency
  of a query sent while it runs, and how long a second ingestion (64 chunks, sent 0.5 s in) takes; an
  ingestion of sentence-sized texts (the queries), its rate;
- memory: each arm alone in a fresh process (one after the other, twice), its RSS after loading, after
  ingesting the chunks, and at its peak during the ingestion (``VmHWM``).

Every arm's vectors must match the other's (cosine >= 0.9999).

    .venv/bin/python bench/retrieval/embedder.py --before REV [--rounds 3] [--queries 200] [--callers 4]
        [--chunks 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
import corpora
from common import module_at, rss_mib

from tollway.retrieval.embedders import LocalEmbedder


def embedder_at(rev: str, folder: Path) -> Any:
    """``retrieval/embedders.py`` as it was at ``rev``, its ``LocalEmbedder``."""
    return module_at(rev, "retrieval/embedders.py", folder).LocalEmbedder


def texts() -> tuple[list[str], list[str]]:
    """Short queries (sentences of the tasks) and chunk-sized texts (the documents cut at ~800 characters)."""
    bank = corpora.banking()
    queries = [s for a in bank.asks for s in re.split(r"(?<=[.!?])\s+", a.text) if 6 <= len(s.split()) <= 30]
    chunks = []
    for doc in bank.docs:
        text = doc.text
        chunks += [text[i:i + 800] for i in range(0, len(text), 800) if len(text[i:i + 800]) > 200]
    return queries, chunks


def busy(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {pct(values, 95):.1f} ms"


async def alone(embedder: LocalEmbedder, queries: list[str]) -> list[float]:
    out = []
    for q in queries:
        started = time.perf_counter()
        await embedder.embed([q])
        out.append((time.perf_counter() - started) * 1000)
    return out


async def concurrent(embedder: LocalEmbedder, queries: list[str], callers: int) -> tuple[float, list[float]]:
    pending = list(queries)
    latencies: list[float] = []

    async def caller() -> None:
        while pending:
            q = pending.pop()
            started = time.perf_counter()
            await embedder.embed([q])
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(queries) / (time.perf_counter() - started), latencies


async def ingest(embedder: LocalEmbedder, chunks: list[str], queries: list[str]
                 ) -> tuple[float, list[float], float]:
    """The ingestion's rate, the latencies of queries sent meanwhile, and how long a second ingestion of 64
    chunks sent 0.5 s in took (another tenant's, say)."""
    latencies: list[float] = []
    done = False
    other = 0.0

    async def ingestion() -> None:
        nonlocal done
        for i in range(0, len(chunks), 256):
            await embedder.embed(chunks[i:i + 256])
        done = True

    async def asker() -> None:
        await asyncio.sleep(0.05)
        for q in queries:
            if done:
                return
            started = time.perf_counter()
            await embedder.embed([q])
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)

    async def second() -> None:
        nonlocal other
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        await embedder.embed(chunks[-64:])
        other = time.perf_counter() - started

    started = time.perf_counter()
    await asyncio.gather(ingestion(), asker(), second())
    return (len(chunks) + 64) / (time.perf_counter() - started), latencies, other


async def short_rate(embedder: LocalEmbedder, queries: list[str]) -> float:
    started = time.perf_counter()
    await embedder.embed(queries)
    return len(queries) / (time.perf_counter() - started)


async def memory_child(args: argparse.Namespace) -> None:
    """One arm in this fresh process: RSS after loading, after the ingestion, and the peak (MiB)."""
    queries, chunks = texts()
    with tempfile.TemporaryDirectory(prefix="tollway-embedder-") as tmp:
        e = embedder_at(args.before, Path(tmp))() if args.memory_arm == "before" else LocalEmbedder()
    e.load()
    await e.embed(queries[:8])
    loaded = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # noqa: ASYNC240 (the peak from here on, not the corpus loading)
    for i in range(0, args.chunks, 256):
        await e.embed(chunks[i:min(i + 256, args.chunks)])
    print(f"{loaded:.0f} {rss_mib():.0f} {rss_mib(field='VmHWM'):.0f}")


def memory(args: argparse.Namespace) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {"before": [], "now": []}
    for _ in range(2):
        for arm in out:
            reply = subprocess.run([sys.executable, __file__, "--before", args.before, "--chunks", str(args.chunks),
                                    "--memory-arm", arm], check=True, capture_output=True, text=True).stdout
            out[arm].append(tuple(int(v) for v in reply.split()[-3:]))
    return out


async def run(args: argparse.Namespace) -> None:
    queries, chunks = texts()
    queries = queries[:args.queries]
    chunks = chunks[:args.chunks]
    with tempfile.TemporaryDirectory(prefix="tollway-embedder-") as tmp:
        arms = {f"before ({args.before})": embedder_at(args.before, Path(tmp))(), "now": LocalEmbedder()}
    for e in arms.values():
        e.load()
        await e.embed(queries[:8])
    first, second = [await e.embed(queries[:50] + chunks[:50]) for e in arms.values()]
    agreement = float((first.vectors * second.vectors).sum(axis=1).min())
    assert agreement >= 0.9999, agreement
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in arms}
    for r in range(args.rounds):
        order = list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]
        for name, e in order:
            row = rows[name]
            row.setdefault("alone", []).extend(await alone(e, queries))
            stop = multiprocessing.Event()
            proc = multiprocessing.Process(target=busy, args=(stop,))
            proc.start()
            row.setdefault("busy", []).extend(await alone(e, queries))
            stop.set()
            proc.join()
            rate, lat = await concurrent(e, queries, args.callers)
            row.setdefault("conc_rate", []).append(rate)
            row.setdefault("conc", []).extend(lat)
            rate, lat, other = await ingest(e, chunks, queries)
            row.setdefault("ingest_rate", []).append(rate)
            row.setdefault("during", []).extend(lat)
            row.setdefault("other", []).append(other)
            row.setdefault("short_rate", []).append(await short_rate(e, queries))
    print(f"packaged embedder, {os.cpu_count()} cores, {args.rounds} rounds alternating, "
          f"{len(queries)} queries, {len(chunks)} chunks; min cosine between the arms {agreement:.6f}\n")
    print("| arm | query alone p50 / p95 | beside a busy core | "
          f"{args.callers} callers: queries/s, p50 / p95 | ingestion, chunks/s per round | "
          "a query during ingestion p50 / p95 | a second ingestion of 64 chunks during it, s per round | "
          "ingestion of sentences, texts/s per round |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        rates = " / ".join(f"{v:.0f}" for v in row["ingest_rate"])
        conc = " / ".join(f"{v:.0f}" for v in row["conc_rate"])
        short = " / ".join(f"{v:.0f}" for v in row["short_rate"])
        other = " / ".join(f"{v:.1f}" for v in row["other"])
        print(f"| {name} | {fmt(row['alone'])} | {fmt(row['busy'])} | {conc}; {fmt(row['conc'])} | {rates} | "
              f"{fmt(row['during'])} | {other} | {short} |")
    for e in arms.values():
        e.close()
    print(f"\n| arm, alone in a fresh process | RSS after loading | after ingesting {len(chunks)} chunks | peak |")
    print("|---|---|---|---|")
    for name, runs in memory(args).items():
        print(f"| {name} | " + " | ".join(" / ".join(f"{r[k]}" for r in runs) + " MiB" for k in range(3)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit whose embedder to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=1024)
    parser.add_argument("--memory-arm", choices=["before", "now"], help=argparse.SUPPRESS)  # a memory child
    args = parser.parse_args()
    asyncio.run(memory_child(args) if args.memory_arm else run(args))


if __name__ == "__main__":
    main()
