"""Fallback under load: success rate and added latency when the large model misbehaves.

One run starts an embedded PostgreSQL and Redis once, then for each scenario two scripted upstreams
(`tollway sim-upstream`: the large model's replica, scripted to fail, and a healthy small model) and
a fresh `tollway serve` with a config whose large tier has a 0.5 s deadline (0.3 s to the first token
of a stream) and whose breaker opens after 5 consecutive failures for 2 s. Load is open-loop at a fixed
rate (latency counted from each request's scheduled start), every request names the large model.

Scenarios: healthy (the baseline), dead (nothing listening), error (500s), hang (never answers),
flap (every other request fails), stall (streams: headers, then nothing), saturated (a queue that
vLLM's /metrics shows growing: 4 slots, 200 ms each, far below the offered rate).

Per scenario it prints: success rate; p50/p99 latency and what each adds over the healthy baseline;
requests that reached the large replica, its breaker trips and half-open probes, and how many
reached it after its breaker first opened beyond those probes (a sim-side count, independent of the
gateway's own bookkeeping; "-" where nothing listens).

    python bench/fallback/run.py [--rate 100] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import Processes, free_port, p50_p99, wait_http  # noqa: E402

from tollway.local.embedded import EmbeddedPostgres, EmbeddedRedis  # noqa: E402

DEADLINE_S, TTFT_DEADLINE_S = 0.5, 0.3
BREAKER = {"consecutive_failures": 5, "open_s": 2.0, "half_open_probes": 1}


@dataclass
class Scenario:
    name: str
    primary_args: list[str] | None  # None: nothing listens
    stream: bool = False
    vllm_metrics: bool = False


SCENARIOS = [
    Scenario("healthy", []),
    Scenario("dead", None),
    Scenario("error", ["--fault", "error"]),
    Scenario("hang", ["--fault", "timeout"]),
    Scenario("flap", ["--fault", "flap"]),
    Scenario("stall (stream)", ["--ttft-ms", "60000"], stream=True),
    Scenario("saturated", ["--max-concurrency", "4", "--ttft-ms", "200"], vllm_metrics=True),
]


@dataclass
class Outcome:
    ok: int
    failed: int
    latencies: list[float]
    replica: dict[str, Any]
    primary_received: int | None


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tollway.cli", *args], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def start_sim(procs: Processes, args: list[str], name: str) -> str:
    port = free_port()
    proc, log = procs.spawn([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(port),
                             "--completion-tokens", "16", *args], name)
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(url + "/models", 30, proc, log)
    return url


def config_for(scenario: Scenario, primary: str, fallback: str) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "large-0", "base_url": primary, "vllm_metrics": scenario.vllm_metrics},
                      {"name": "small-0", "base_url": fallback}],
        "models": [{"name": "large", "upstream": "large-0", "upstream_model": "sim-large", "tier": "large",
                    "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
                   {"name": "small", "upstream": "small-0", "upstream_model": "sim-small", "tier": "small",
                    "price": {"input_per_mtok": "0.15", "output_per_mtok": "0.6"}}],
        "routing": {"tiers": [{"name": "large", "deadline_s": DEADLINE_S, "ttft_deadline_s": TTFT_DEADLINE_S},
                              {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}],
                    "breaker": BREAKER,
                    "saturation": {"poll_interval_s": 0.1, "max_waiting": 4},
                    "cache": {"enabled": False}},
    }


async def load(url: str, key: str, rate: int, duration: float, stream: bool,
               model: str = "large") -> tuple[int, int, list[float]]:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    latencies: list[float] = []
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(i: int, scheduled: float) -> None:
            nonlocal failed
            body = {"model": model, "messages": [{"role": "user", "content": f"fallback bench {i}"}],
                    "max_tokens": 16, "stream": stream}
            try:
                async with session.post(url + "/chat/completions", data=json.dumps(body), headers=headers) as resp:
                    raw = await resp.read()
                    good = resp.status == 200 and (not stream or (b"data: [DONE]" in raw and b'"error"' not in raw))
            except (aiohttp.ClientError, TimeoutError):
                good = False
            if not good:
                failed += 1
                return
            latencies.append(time.perf_counter() - scheduled)

        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * duration)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return len(latencies), failed, latencies


def get_json(url: str, key: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def run_scenario(scenario: Scenario, args: argparse.Namespace, env: dict[str, str], keys: tuple[str, str],
                 workdir: Path) -> Outcome:
    procs = Processes(workdir, env)
    try:
        slug = scenario.name.split()[0]
        primary = "http://127.0.0.1:9/v1" if scenario.primary_args is None else \
            start_sim(procs, scenario.primary_args, f"{slug}-primary")
        fallback = start_sim(procs, [], f"{slug}-fallback")
        config = workdir / f"{slug}.yaml"
        config.write_text(yaml.safe_dump(config_for(scenario, primary, fallback)))
        port = free_port()
        proc, log = procs.spawn([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--config",
                                 str(config), "--log-level", "error"], f"{slug}-tollway")
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", 60, proc, log)
        # warm-up on the small model: pools and lazy imports, without touching the large replica's breaker
        asyncio.run(load(base + "/v1", keys[0], 20, 1, scenario.stream, model="small"))
        ok, failed, latencies = asyncio.run(load(base + "/v1", keys[0], args.rate, args.duration, scenario.stream))
        replica = get_json(base + "/v1/admin/routing", keys[1])["replicas"]["large-0"]
        received = None if scenario.primary_args is None else \
            int(get_json(primary.removesuffix("/v1") + "/sim/stats")["total"])
        return Outcome(ok, failed, latencies, replica, received)
    finally:
        procs.stop()


def report(results: dict[str, Outcome], args: argparse.Namespace) -> None:
    base50, base99 = p50_p99(results["healthy"].latencies, 1000)
    header = ["scenario", "success", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "large got", "trips",
              "probes", "beyond probes"]
    rows = []
    for name, out in results.items():
        p50, p99 = p50_p99(out.latencies, 1000)
        total = out.ok + out.failed
        rep = out.replica
        first = rep.get("calls_at_first_trip")
        beyond = "-" if out.primary_received is None or first is None else \
            str(out.primary_received - first - rep["probes"])
        rows.append([name, f"{100 * out.ok / total:.2f}% ({out.failed} failed)", f"{p50:.1f}", f"{p99:.1f}",
                     f"{p50 - base50:+.1f}", f"{p99 - base99:+.1f}",
                     str(out.primary_received if out.primary_received is not None else f"{rep['calls']} (gw)"),
                     str(rep["trips"]), str(rep["probes"]), beyond])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\nfallback under load: {args.rate} req/s open loop for {args.duration:g}s per scenario; large tier deadline "
          f"{DEADLINE_S}s (stream TTFT {TTFT_DEADLINE_S}s), breaker {BREAKER}")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"\ntargets: success >= 99.9% with a dead primary; p99 added <= deadline + 50 ms "
          f"({DEADLINE_S * 1000 + 50:.0f} ms; {TTFT_DEADLINE_S * 1000 + 50:.0f} ms for streams); 0 beyond probes "
          "(flap: a successful probe closes the breaker, so later calls are normal traffic)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--only", help="comma-separated scenario names (healthy always runs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tollway-bench-fallback-"))
    pg, redis_server = EmbeddedPostgres(workdir / "pg"), EmbeddedRedis(workdir / "redis")
    pg.start()
    redis_url = redis_server.start()
    env = {**os.environ, "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "0",
           "TOLLWAY_DATA_DIR": str(workdir / "data")}
    try:
        cli(env, "migrate")
        cli(env, "tenants", "create", "bench")
        app_key = cli(env, "keys", "create", "--tenant", "bench")
        admin_key = cli(env, "keys", "create", "--tenant", "bench", "--role", "admin")
        wanted = None if not args.only else {"healthy", *args.only.split(",")}
        results = {}
        for scenario in SCENARIOS:
            if wanted is None or scenario.name.split()[0] in wanted:
                print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
                results[scenario.name] = run_scenario(scenario, args, env, (app_key, admin_key), workdir)
        report(results, args)
    finally:
        redis_server.stop()
        pg.stop()


if __name__ == "__main__":
    main()
