"""The upstream HTTP client: aiohttp (what the gateway's OpenAI-compatible upstreams use, configured by
``routing.upstream.new_session``) against httpcore (the connection pool under httpx) and httpx itself,
side by side in one run (issue 27, "the server and the client").

One scripted upstream process (zero latency); this process drives it with ``--concurrency`` tasks on uvloop
(the loop `tollway serve` runs), each posting the load benches' chat body and reading the whole answer (or,
with ``--stream``, its SSE lines), for ``--duration`` seconds per client, the clients alternately,
``--rounds`` times. Per round: requests/s and CPU per request = this process's user + system time
(``time.process_time``) over the round, divided by the requests completed. The upstream's own CPU is not
counted: the figure is what the gateway would spend in its client.

    python bench/overhead/clients.py [--duration 5] [--rounds 3] [--concurrency 16] [--stream] [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpcore
import httpx
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BENCH_BODY, Processes, start_sim

from tollway.routing.upstream import new_session

HEADERS = {"content-type": "application/json", "authorization": "Bearer sim"}
Call = Callable[[], Awaitable[int]]


def aiohttp_call(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> Call:
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)

    async def call() -> int:
        async with session.post(url, data=body, headers=HEADERS, timeout=timeout) as resp:
            if stream:
                n = 0
                async for line in resp.content:
                    n += line.startswith(b"data:")
                return n
            orjson.loads(await resp.read())
            return resp.status

    return call


def httpcore_call(pool: httpcore.AsyncConnectionPool, url: str, body: bytes, stream: bool) -> Call:
    headers = list(HEADERS.items())

    async def call() -> int:
        if stream:
            n = 0
            async with pool.stream("POST", url, headers=headers, content=body) as resp:
                buffer = b""
                async for part in resp.aiter_stream():
                    buffer += part
                    *lines, buffer = buffer.split(b"\n")
                    n += sum(line.startswith(b"data:") for line in lines)
            return n
        resp = await pool.request("POST", url, headers=headers, content=body)
        orjson.loads(resp.content)
        return resp.status

    return call


def httpx_call(client: httpx.AsyncClient, url: str, body: bytes, stream: bool) -> Call:
    async def call() -> int:
        if stream:
            n = 0
            async with client.stream("POST", url, headers=HEADERS, content=body) as resp:
                async for line in resp.aiter_lines():
                    n += line.startswith("data:")
            return n
        resp = await client.post(url, headers=HEADERS, content=body)
        orjson.loads(resp.content)
        return resp.status_code

    return call


async def load(call: Call, concurrency: int, duration: float) -> tuple[int, float, float]:
    """(requests completed, seconds, CPU seconds of this process)."""
    done = 0
    end = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - t0, time.process_time() - cpu0


async def run(args: argparse.Namespace, base: str) -> None:
    url = base + "/chat/completions"
    body = orjson.dumps({**BENCH_BODY, "stream": args.stream} if args.stream else BENCH_BODY)
    session = new_session()
    pool = httpcore.AsyncConnectionPool(max_connections=None, keepalive_expiry=60)
    client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None, keepalive_expiry=60))
    calls = {"aiohttp (the gateway's)": aiohttp_call(session, url, body, args.stream),
             "httpcore": httpcore_call(pool, url, body, args.stream),
             "httpx": httpx_call(client, url, body, args.stream)}
    try:
        for call in calls.values():  # connections opened and code warm before any round counts
            await load(call, args.concurrency, 1.0)
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                n, seconds, cpu = await load(call, args.concurrency, args.duration)
                rows[name].append((n / seconds, cpu / n * 1e6))
        kind = "streamed" if args.stream else "JSON"
        print(f"\n{kind} chat completions, {args.concurrency} concurrent, {args.duration:.0f} s per round, "
              f"{args.rounds} rounds alternating")
        print("| client | req/s per round | CPU per request per round | CPU per request, mean |")
        print("|---|---|---|---|")
        for name, got in rows.items():
            rates = " / ".join(f"{r:,.0f}" for r, _ in got)
            cpus = " / ".join(f"{c:.0f} us" for _, c in got)
            print(f"| {name} | {rates} | {cpus} | {statistics.mean(c for _, c in got):.0f} us |")
    finally:
        await session.close()
        await pool.aclose()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="streamed answers (SSE lines) instead of JSON")
    parser.add_argument("--asyncio", action="store_true", help="the standard event loop instead of uvloop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollway-clients-") as tmp:
        procs = Processes(Path(tmp), dict(os.environ))
        try:
            base, _ = start_sim(procs)
            (asyncio.run if args.asyncio else uvloop.run)(run(args, base))
        finally:
            procs.stop()


if __name__ == "__main__":
    sys.exit(main())
