"""Overhead of the gateway over calling the upstream directly, side by side with LiteLLM proxy.

One run starts a zero-latency scripted upstream, `tollway serve` (auth and ledger on, embedded
PostgreSQL and Redis), and LiteLLM proxy 1.106.2 (its own venv, one worker, master-key auth, same
upstream), then measures each target the same way:

- open-loop load at fixed rates (100 and 500 req/s by default): p50/p99 latency, and the added
  latency over the direct upstream at the same rate;
- closed-loop load with wrk (16 connections): the maximum sustained rate.

    python bench/overhead/run.py [--duration 10] [--rates 100,500] [--no-litellm] [--before REV] [--rounds N] [--floor]

``--before REV`` adds the gateway as it was at an earlier commit (its own embedded stores, the same upstream);
``--rounds N`` measures every target's open loop N times, the targets taking turns, each round's figure printed;
``--floor`` adds a bare Python proxy on the same server and client (``floor.py``), what any such gateway adds.
The load generator's own garbage collector is held off while it measures (its pauses, up to tens of
milliseconds, were counted as the targets' latency).

Needs `wrk` (Debian package) for the sustained-rate column; without it that column is skipped.
The LiteLLM venv is created in bench/.venv-litellm on first use (pip install 'litellm[proxy]==1.106.2').
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402  (bench/common.py, shared by the benches)
    BENCH_BODY,
    Processes,
    free_port,
    p50_p99,
    package_at,
    start_gateway,
    start_sim,
    wait_http,
    wrk_argv,
    wrk_result,
    wrk_script,
)

LITELLM_VENV = REPO / "bench" / ".venv-litellm"


@dataclass
class Target:
    name: str
    url: str  # base, ending in /v1
    key: str


@dataclass
class Result:
    latencies_ms: dict[int, list[tuple[float, float, int, int]]] = field(default_factory=dict)  # rate -> rounds of p50, p99, ok, err
    sustained_rps: float | None = None


async def open_loop(target: Target, rate: int, duration: float) -> tuple[float, float, int, int]:
    """Send at a fixed rate regardless of answers (no coordinated omission): latency is measured
    from each request's scheduled start."""
    headers = {"authorization": f"Bearer {target.key}", "content-type": "application/json"}
    payload = json.dumps(BENCH_BODY).encode()
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                async with session.post(target.url + "/chat/completions", data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append((time.perf_counter() - scheduled) * 1000)

        gc.collect()
        gc.freeze()
        gc.disable()  # this process's collections would stall its reading of answers: not the target's latency
        try:
            loop_start = time.perf_counter()
            total = int(rate * duration)
            tasks = []
            for i in range(total):
                scheduled = loop_start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(scheduled)))
            await asyncio.gather(*tasks)
        finally:
            gc.enable()
            gc.unfreeze()
    return (*p50_p99(latencies), len(latencies), errors)


def sustained(target: Target, duration: float, connections: int, workdir: Path) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = wrk_script(workdir, target.key, name=target.name)
    out = subprocess.run(wrk_argv(script, target.url + "/chat/completions", duration, connections),
                         capture_output=True, text=True, check=True).stdout
    requests, errors, seconds = wrk_result(out)
    if errors > requests * 0.01:
        print(f"  {target.name}: {errors} errors of {requests} under wrk", file=sys.stderr)
    return (requests - errors) / seconds


def ensure_litellm() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]==1.106.2"], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rates", default="100,500")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="tollway serve --workers N")
    parser.add_argument("--before", metavar="REV", help="also the gateway as it was at this commit")
    parser.add_argument("--rounds", type=int, default=1, help="open-loop rounds, the targets taking turns")
    parser.add_argument("--floor", action="store_true",
                        help="also a bare Python proxy on the same server and client (floor.py, level json)")
    parser.add_argument("--budget", action="store_true",
                        help="give the tenant a (never reached) monthly budget: every request then holds a lease")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    procs = Processes(workdir, env, stop_s=30)

    try:
        sim_url, _ = start_sim(procs)
        targets = [Target("upstream (direct)", sim_url, "none")]
        tw = start_gateway(procs, sim_url, data=workdir / "data", args=["--workers", str(args.workers)],
                           budget=args.budget)
        time.sleep(2.5)  # the policy cache TTL
        name = ("tollway" if args.workers == 1 else f"tollway --workers {args.workers}") \
            + (" (a budget)" if args.budget else "")
        targets.append(Target(name, tw.url, tw.key))
        if args.floor:  # what a proxy with no gateway work adds (bench/overhead/floor.py)
            port = free_port()
            fl, fl_log = procs.spawn([sys.executable, str(HERE / "floor.py"), "--upstream", sim_url, "--port",
                                      str(port), "--level", "json"], "floor")
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, fl, fl_log)
            targets.append(Target("bare Python proxy (json)", f"http://127.0.0.1:{port}/v1", "none"))
        if args.before:  # its own embedded stores and bootstrap key; the code of an earlier commit
            old = start_gateway(procs, sim_url, data=workdir / "data-before", args=["--workers", str(args.workers)],
                                budget=args.budget, env=package_at(args.before, workdir), name="tollway-before")
            time.sleep(2.5)
            targets.append(Target(f"tollway at {args.before}", old.url, old.key))

        if not args.no_litellm:
            binary = ensure_litellm()
            ll_port = free_port()
            config = workdir / "litellm.yaml"
            config.write_text(json.dumps({
                "model_list": [{"model_name": "sim-large", "litellm_params": {
                    "model": "openai/sim-large", "api_base": sim_url, "api_key": "none"}}],
                "general_settings": {"master_key": "sk-bench"},
                "litellm_settings": {"telemetry": False}}))
            ll, ll_log = procs.spawn([str(binary), "--config", str(config), "--port", str(ll_port), "--num_workers", "1"],
                               "litellm", {"LITELLM_LOG": "ERROR"})
            wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", 180, ll, ll_log)
            targets.append(Target("litellm proxy 1.106.2", f"http://127.0.0.1:{ll_port}/v1", "sk-bench"))

        results = {target.name: Result() for target in targets}
        for target in targets:
            asyncio.run(open_loop(target, 50, 2))  # warm-up: pools, caches, JIT-less but lazy imports
        for _ in range(args.rounds):
            for target in targets:
                for rate in rates:
                    results[target.name].latencies_ms.setdefault(rate, []).append(
                        asyncio.run(open_loop(target, rate, args.duration)))
        for target in targets:
            results[target.name].sustained_rps = sustained(target, args.duration, args.connections, workdir)
        report(results, rates, args)
    finally:
        procs.stop()


def report(results: dict[str, Result], rates: list[int], args: argparse.Namespace) -> None:
    base = results["upstream (direct)"]
    header = ["target"]
    for rate in rates:
        header += [f"p50 @{rate}/s", f"p99 @{rate}/s", f"added p50 @{rate}/s", f"added p99 @{rate}/s",
                   f"errors @{rate}/s"]
    header.append(f"max sustained req/s (wrk, {args.connections} conns)")
    rows = []
    for name, res in results.items():
        row = [name]
        for rate in rates:
            rounds, base_rounds = res.latencies_ms[rate], base.latencies_ms[rate]
            row += [" / ".join(f"{r[0]:.2f}" for r in rounds) + " ms", " / ".join(f"{r[1]:.2f}" for r in rounds) + " ms",
                    "-" if res is base else " / ".join(f"{r[0] - b[0]:+.2f}" for r, b in zip(rounds, base_rounds, strict=True)) + " ms",
                    "-" if res is base else " / ".join(f"{r[1] - b[1]:+.2f}" for r, b in zip(rounds, base_rounds, strict=True)) + " ms",
                    f"{sum(r[3] for r in rounds)}/{sum(r[2] + r[3] for r in rounds)}"]
        row.append("n/a (no wrk)" if res.sustained_rps is None else f"{res.sustained_rps:,.0f}")
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    tw = next((r for name, r in results.items() if name.startswith("tollway")), None)
    ll = results.get("litellm proxy 1.106.2")
    if tw and ll and tw.sustained_rps and ll.sustained_rps:
        print(f"\ntollway sustains {tw.sustained_rps / ll.sustained_rps:.1f}x LiteLLM proxy's rate")


if __name__ == "__main__":
    main()
