"""What a quick-start gateway holds in memory, and what each optional part adds when it is first used.

One run starts the scripted upstream and `tollway serve --upstream` (no config file: embedded PostgreSQL
and Redis, no guard policy, no litellm model), twice: with the packaged embedder loaded on first use (the
default) and loaded at start (`TOLLWAY_PRELOAD_EMBEDDER=true`, the behaviour before). For each it reads
the gateway process's RSS (/proc, the serving process only: the stores are processes of their own) after
start, after plain chat traffic, then after each part is first used: a guard policy (pii, secrets,
injection) with guarded requests, the packaged embedder (`/v1/embeddings`), a collection ingested and
searched, a chat with retrieval.

    .venv/bin/python bench/memory/parts.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CLI, Processes, rss_mib, start_gateway, start_sim


async def traffic(client: httpx.AsyncClient, n: int, body: dict, concurrency: int = 8) -> None:
    sent = 0

    async def one() -> None:
        nonlocal sent
        while sent < n:
            sent += 1
            resp = await client.post("/chat/completions", json=body)
            resp.raise_for_status()

    await asyncio.gather(*(one() for _ in range(concurrency)))


async def measure(url: str, key: str, data: Path, pid: int, requests: int) -> list[tuple[str, float]]:
    out = [("after start", rss_mib(pid))]
    chat = {"model": "sim-small", "max_tokens": 8, "messages": [{"role": "user", "content": "how much?"}]}
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
        await traffic(client, requests, chat)
        out.append((f"after {requests} chat requests", rss_mib(pid)))
        await asyncio.to_thread(subprocess.run, [*CLI, "tenants", "guards", "--data-dir", str(data), "--tenant",
                                "default", "--input", "injection=block", "pii=redact", "--output", "pii=redact",
                                "secrets=redact"], check=True, capture_output=True)
        await asyncio.sleep(2.5)  # the policy cache
        await traffic(client, 200, {**chat, "messages": [{"role": "user", "content": "mail jane@example.com"}]})
        out.append(("+ guards (pii, secrets, injection), 200 guarded requests", rss_mib(pid)))
        resp = await client.post("/embeddings", json={"model": "local/all-MiniLM-L6-v2-int8", "input": "hello"})
        resp.raise_for_status()
        out.append(("+ the packaged embedder (one /v1/embeddings)", rss_mib(pid)))
        await client.post("/collections", json={"name": "mem"})
        docs = [{"source": f"d{i}.md", "text": f"# Doc {i}\n\n" + "Budgets hold under concurrency. " * 40}
                for i in range(20)]
        (await client.post("/collections/mem/documents", json={"documents": docs})).raise_for_status()
        await client.post("/retrieval/search", json={"collection": "mem", "query": "budgets", "context_tokens": 300})
        await traffic(client, 50, {**chat, "retrieval": {"collection": "mem", "context_tokens": 300}})
        out.append(("+ a collection ingested and searched, 50 chats with retrieval", rss_mib(pid)))
        out.append(("  beside it: the document parser's worker processes", workers_mib(pid)))
    return out


def workers_mib(pid: int) -> float:
    """The RSS of a process's worker processes (multiprocessing's spawned children: the document parser's,
    the prompt renderer's), not of the embedded PostgreSQL and Redis it also started."""
    total = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                total += rss_mib(child)
        except FileNotFoundError:  # ended meanwhile
            pass
    return total


def run(requests: int, preload: bool) -> list[tuple[str, float]]:
    workdir = Path(tempfile.mkdtemp(prefix="tollway-mem-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOLLWAY_PRELOAD_EMBEDDER": "true" if preload else "false"}
    procs = Processes(workdir, env, stop_s=30)
    try:
        sim_url, _ = start_sim(procs)
        data = workdir / "data"
        tw = start_gateway(procs, sim_url, data=data, ready_s=180)
        return asyncio.run(measure(tw.url, tw.key, data, tw.process.pid, requests))
    finally:
        procs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    lazy = run(args.requests, preload=False)
    eager = run(args.requests, preload=True)
    print("| gateway process RSS (MiB) | embedder on first use (default) | embedder at start (before) |")
    print("|---|---|---|")
    for (what, a), (_, b) in zip(lazy, eager, strict=True):
        print(f"| {what} | {a:.0f} | {b:.0f} |")


if __name__ == "__main__":
    main()
