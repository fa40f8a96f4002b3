"""One tenant's flood of local embeddings and ingestions against another tenant's calls, side by side in one run.

A `tollway serve --upstream` process (embedded PostgreSQL and Redis, the scripted upstream; the packaged local
embedder in process). Tenant B, from one thread, searches a small collection, embeds one sentence with the
local model and ingests a short document (past 4,096 characters: a heavy call) in turn; its p50 / p99 are
reported with nothing else running and while tenant A, from ``--threads`` threads, floods the same process
with heavy ``/v1/embeddings`` calls (lists past 4,096 characters), light ones (a sentence each), ingestions of
short documents, or ingestions of HTML that is slow to parse. ``--before REV`` runs the same rows against the
gateway as it was at an earlier commit (its package from ``git archive``; the same database, tenants and
keys), the two gateways taking turns row by row.

    .venv/bin/python bench/security/tenants_share.py [--seconds 8] [--threads 12] [--before REV]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import embedded_stores, p50_p99, package_at, start_gateway, start_sim

LOCAL = "local/all-MiniLM-L6-v2-int8"  # the packaged embedding model, as /v1/embeddings names it
WORDS = ("refund card loan branch wire fee account overdraft statement limit transfer dispute savings interest "
         "mortgage deposit cheque balance payee fraud").split()


def sentence(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def document(i: int) -> str:
    return "\n\n".join(f"## Part {j}\n\n" + ". ".join(sentence(14, i * 31 + j * 5 + k) for k in range(8))
                       for j in range(6))


FLOODS: dict[str, Callable[[int], tuple[str, dict[str, object]]]] = {
    # (path, body) of tenant A's n-th call
    "heavy embeddings (64 texts of ~100 words)": lambda n: (
        "/embeddings", {"model": LOCAL, "input": [sentence(100, n + i) for i in range(64)]}),
    "light embeddings (one sentence)": lambda n: ("/embeddings", {"model": LOCAL, "input": sentence(12, n)}),
    "ingestions (a 6-section document)": lambda n: (
        "/collections/floodbox/documents", {"text": document(n) + f"\n\nrevision {n}", "format": "markdown",
                                            "source": f"doc-{n % 5}"}),
    "searches": lambda n: ("/retrieval/search", {"collection": "floodbox", "query": f"{sentence(8, n)} {n}",
                                                 "context_tokens": 600}),
    "ingestions of 1 MB of HTML (about 3 s of parsing each)": lambda n: (
        "/collections/floodbox/documents", {"text": f"<html><body><h1>r{n}</h1>" + "<span>a</span>" * 70_000
                                            + "</body></html>", "format": "html", "source": f"page-{n % 5}"}),
}


# tenant B's calls, in turn: (name, path, body of the n-th round)
PROBES: tuple[tuple[str, str, Callable[[int], dict[str, object]]], ...] = (
    ("search", "/retrieval/search",
     lambda n: {"collection": "handbook", "query": f"{sentence(6, n)} {n}", "context_tokens": 300}),
    ("embed", "/embeddings", lambda n: {"model": LOCAL, "input": f"{sentence(10, n)} {n}"}),
    ("ingest", "/collections/notes/documents",
     lambda n: {"text": document(n) + f"\n\nrevision {n}", "format": "markdown", "source": f"n{n % 3}"}),
)


def probe(base: str, key: str, seconds: float) -> dict[str, list[float]]:
    headers = {"authorization": f"Bearer {key}"}
    got: dict[str, list[float]] = {name: [] for name, _, _ in PROBES}
    end = time.monotonic() + seconds
    n = 0
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < end:
            n += 1
            for name, path, body in PROBES:
                t = time.perf_counter()
                client.post(f"{base}{path}", headers=headers, json=body(n)).raise_for_status()
                got[name].append(time.perf_counter() - t)
            time.sleep(0.02)
    return got


def flood(base: str, key: str, kind: str, stop: threading.Event, done: list[int]) -> None:
    make = FLOODS[kind]
    with httpx.Client(timeout=600) as client:
        n = threading.get_ident() % 1000
        while not stop.is_set():
            n += 1
            path, body = make(n)
            r = client.post(f"{base}{path}", headers={"authorization": f"Bearer {key}"}, json=body)
            done.append(r.status_code)


def row(base: str, keys: dict[str, str], kind: str | None, threads: int,
        seconds: float) -> tuple[dict[str, list[float]], list[int]]:
    stop = threading.Event()
    done: list[int] = []
    workers = [threading.Thread(target=flood, args=(base, keys["a"], kind, stop, done)) for _ in range(threads)] \
        if kind else []
    for w in workers:
        w.start()
    time.sleep(1.0 if kind else 0)  # the flood's queue is full before the probe starts
    measured = probe(base, keys["b"], seconds)
    stop.set()
    for w in workers:
        w.join()
    return measured, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, default=12, help="tenant A's concurrent calls")
    parser.add_argument("--before", metavar="REV", help="also the gateway at this commit, row by row in turn")
    parser.add_argument("--floods", default="", help="only the floods whose names hold one of these words "
                        "(comma-separated: heavy,light,searches,...); the row with no flood always runs")
    args = parser.parse_args()
    with embedded_stores("tollway-bench-share-") as stores:
        work, procs, cli = stores.work, stores.procs, stores.cli
        sim_url, _ = start_sim(procs)
        gateways = {"now": start_gateway(procs, sim_url, data=None, bench_tenant=False).url}
        if args.before:
            gateways[args.before] = start_gateway(procs, sim_url, data=None, name="before", bench_tenant=False,
                                                  env=package_at(args.before, work)).url
        for name in ("a", "b"):
            cli("tenants", "create", name)
        keys = {name: cli("keys", "create", "--tenant", name, "--ingest") for name in ("a", "b")}
        base = gateways["now"]
        with httpx.Client(timeout=120) as client:
            for tenant, coll in (("b", "handbook"), ("b", "notes"), ("a", "floodbox")):
                headers = {"authorization": f"Bearer {keys[tenant]}"}
                client.post(f"{base}/collections", headers=headers, json={"name": coll}).raise_for_status()
            for tenant, coll in (("b", "handbook"), ("a", "floodbox")):
                docs = [{"text": document(i), "format": "markdown", "source": f"h{i}"} for i in range(20)]
                client.post(f"{base}/collections/{coll}/documents", headers={"authorization": f"Bearer {keys[tenant]}"},
                            json={"documents": docs}).raise_for_status()
            for url in gateways.values():  # each process's model loaded before anything is timed
                for tenant in ("a", "b"):
                    client.post(f"{url}/embeddings", headers={"authorization": f"Bearer {keys[tenant]}"},
                                json={"model": LOCAL, "input": "warm up"}).raise_for_status()
                client.post(f"{url}/retrieval/search", headers={"authorization": f"Bearer {keys['b']}"},
                            json={"collection": "handbook", "query": "warm up"}).raise_for_status()
        print(f"tenant A: {args.threads} threads; tenant B: a search, one local embedding and an ingestion in turn, "
              f"for {args.seconds:g} s a row (ms)\n")
        print("| tenant A floods | gateway | A calls (status) | B search p50 / p99 | B embedding p50 / p99 | "
              "B ingestion p50 / p99 |")
        print("|---|---|---|---|---|---|")
        wanted = [w for w in args.floods.split(",") if w]
        for kind in (None, *(k for k in FLOODS if not wanted or any(w in k for w in wanted))):
            for label, url in gateways.items():
                measured, done = row(url, keys, kind, args.threads, args.seconds)
                statuses = ",".join(f"{s}" for s in sorted(set(done))) or "-"
                s50, s99 = p50_p99(measured["search"], 1000)
                e50, e99 = p50_p99(measured["embed"], 1000)
                i50, i99 = p50_p99(measured["ingest"], 1000)
                print(f"| {kind or 'nothing'} | {label} | {len(done)} ({statuses}) | {s50:.1f} / {s99:.1f} | "
                      f"{e50:.1f} / {e99:.1f} | {i50:.0f} / {i99:.0f} |", flush=True)


if __name__ == "__main__":
    main()
