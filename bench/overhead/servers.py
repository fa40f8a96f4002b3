"""The same gateway app under two HTTP servers: uvicorn (uvloop + httptools, what `tollway serve` runs) and
granian (Rust/hyper, ASGI, uvloop), side by side in one run (issue 27, "the server and the client").

One embedded PostgreSQL and Redis, one zero-latency scripted upstream; each server runs the app from the
same resolved settings (the factory `tollway serve --workers N` hands its workers), one worker, the tenant's
retry-storm breaker off (the load repeats one body). Each target is loaded with wrk (16 connections), the
servers alternately, ``--rounds`` times; per round: requests/s, and CPU per request = the server's process
tree's utime + stime over the wrk run (/proc), divided by the requests completed. The scripted upstream
direct is the reference (the issue's goal: CPU per proxied request <= ~2.8x the upstream's).
``--redis-py`` adds the gateway with its budget scripts through redis-py instead of its own multiplexed
connection (``TOLLWAY_REDIS_SCRIPT_CHANNEL=false``). ``--before REV`` adds the gateway as it was at an earlier commit (its package from ``git archive``, the same
database and tenant), for a change's before and after in one run. ``--workers 2`` adds `tollway serve --workers 2` (uvicorn's supervisor and two workers: the whole process tree
is counted), for the issue's "workers add no per-request CPU"; ``--no-granian`` leaves granian out. ``--floor`` adds three bare Python proxies on the same server
and client (``floor.py``: bytes through, JSON parsed both ways, plus one Redis script per request): the least a
gateway of this shape spends per request.

    pip install 'granian[uvloop]'          # not a dependency of Tollway: measured, not shipped
    python bench/overhead/servers.py [--duration 8] [--rounds 3] [--budget] [--workers 2] [--no-granian] [--redis-py] [--before REV] [--floor]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    Processes,
    free_port,
    package_at,
    start_gateway,
    start_sim,
    wait_http,
    wrk_argv,
    wrk_result,
    wrk_script,
)

from tollway.app import SERVE_SETTINGS_ENV
from tollway.local.embedded import EmbeddedPostgres, EmbeddedRedis
from tollway.settings import Settings

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    name: str
    url: str
    key: str
    pid: int
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and every descendant, in seconds."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(p for p, parent in parents.items() if parent == pid)
    return total


def load(target: Target, duration: float, workdir: Path) -> None:
    script = wrk_script(workdir, target.key)
    before = tree_cpu_s(target.pid)
    out = subprocess.run(wrk_argv(script, target.url + "/chat/completions", duration), capture_output=True,
                         text=True, check=True).stdout
    used = tree_cpu_s(target.pid) - before
    requests, errors, seconds = wrk_result(out)
    ok = requests - errors
    if errors > requests * 0.01:
        print(f"  {target.name}: {errors} errors of {requests}", file=sys.stderr)
    target.rates.append(ok / seconds)
    target.cpu_us.append(used / max(ok, 1) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", action="store_true", help="a (never reached) monthly budget: every request leases")
    parser.add_argument("--workers", type=int, default=1, help="also `tollway serve --workers N` (N > 1)")
    parser.add_argument("--no-granian", action="store_true")
    parser.add_argument("--before", metavar="REV",
                        help="also the gateway as it was at this commit (same database; the two take turns)")
    parser.add_argument("--floor", action="store_true",
                        help="also bare Python proxies on the same server and client (bench/overhead/floor.py)")
    parser.add_argument("--redis-py", action="store_true",
                        help="also the gateway with its budget scripts through redis-py (TOLLWAY_REDIS_SCRIPT_CHANNEL=false)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed (apt-get install wrk)")
    if not args.no_granian and shutil.which("granian", path=str(Path(sys.executable).parent)) is None:
        sys.exit("granian is not installed in this environment: pip install 'granian[uvloop]'")

    workdir = Path(tempfile.mkdtemp(prefix="tollway-servers-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    procs = Processes(workdir, env, stop_s=30)
    pg = EmbeddedPostgres(workdir / "pg")
    redis = EmbeddedRedis(workdir / "redis")
    try:
        database_url, redis_url = pg.start(), redis.start()
        sim_url, sim = start_sim(procs)
        shared = {"TOLLWAY_DATABASE_URL": database_url, "TOLLWAY_REDIS_URL": redis_url,
                  "TOLLWAY_DATA_DIR": str(workdir / "data")}
        uv = start_gateway(procs, sim_url, data=None, name="uvicorn", env=shared, budget=args.budget)
        targets = [Target("upstream (direct)", sim_url, "none", sim.pid),
                   Target("tollway on uvicorn (httptools)", uv.url, uv.key, uv.process.pid)]
        if args.redis_py:  # the same database: the tenant set up above
            rp = start_gateway(procs, sim_url, data=None, name="uvicorn-redis-py",
                               env={**shared, "TOLLWAY_REDIS_SCRIPT_CHANNEL": "false"}, bench_tenant=False)
            targets.append(Target("tollway on uvicorn, budget scripts through redis-py", rp.url, uv.key,
                                  rp.process.pid))
        if args.before:  # the same database and tenant; the code of an earlier commit
            old = start_gateway(procs, sim_url, data=None, name="uvicorn-before",
                                env={**shared, **package_at(args.before, workdir)}, bench_tenant=False)
            targets.append(Target(f"tollway at {args.before}", old.url, uv.key, old.process.pid))
        if args.workers > 1:  # the same database: the tenant set up above
            mw = start_gateway(procs, sim_url, data=None, name="uvicorn-workers", env=shared,
                               args=["--workers", str(args.workers)], bench_tenant=False)
            targets.append(Target(f"tollway on uvicorn, --workers {args.workers}", mw.url, uv.key, mw.process.pid))
        if args.floor:  # the least a Python proxy on this server and client costs (floor.py's levels)
            for level in ("pass", "json", "budget"):
                port = free_port()
                fl, fl_log = procs.spawn([sys.executable, str(Path(__file__).with_name("floor.py")), "--upstream",
                                          sim_url, "--port", str(port), "--level", level, "--redis", redis_url],
                                         f"floor-{level}")
                wait_http(f"http://127.0.0.1:{port}/healthz", 60, fl, fl_log)
                targets.append(Target(f"bare Python proxy: {level}", f"http://127.0.0.1:{port}/v1", uv.key, fl.pid))
        if not args.no_granian:
            settings = Settings(database_url=database_url, redis_url=redis_url, data_dir=workdir / "data",
                                upstreams=[sim_url], bootstrap=False, log_level="warning", local_model=False)
            gr_port = free_port()
            gr, gr_log = procs.spawn([str(Path(sys.executable).parent / "granian"), "--interface", "asgi",
                                      "--factory", "--loop", "uvloop", "--http", "1", "--workers", "1", "--host",
                                      "127.0.0.1", "--port", str(gr_port), "tollway.app:create_app_from_env"],
                                     "granian", env={SERVE_SETTINGS_ENV: settings.model_dump_json()})
            wait_http(f"http://127.0.0.1:{gr_port}/healthz", 120, gr, gr_log)
            targets.append(Target("tollway on granian (asgi)", f"http://127.0.0.1:{gr_port}/v1", uv.key, gr.pid))
        time.sleep(2.5)  # the policy cache TTL

        for target in targets[1:]:
            load(target, 2, workdir)  # warm-up, not counted
            target.rates.clear()
            target.cpu_us.clear()
        for _ in range(args.rounds):
            for target in targets:
                load(target, args.duration, workdir)
    finally:
        procs.stop()
        redis.stop()
        pg.stop()

    upstream_cpu = sum(targets[0].cpu_us) / len(targets[0].cpu_us)
    budget = ", tenant with a budget" if args.budget else ""
    print(f"\n{args.rounds} rounds of wrk (16 connections, {args.duration:.0f} s each, targets alternating{budget})\n")
    print("| target | req/s per round | CPU per request per round | CPU vs upstream (mean) |")
    print("|---|---|---|---|")
    for t in targets:
        mean_cpu = sum(t.cpu_us) / len(t.cpu_us)
        print(f"| {t.name} | {' / '.join(f'{r:,.0f}' for r in t.rates)} | "
              f"{' / '.join(f'{c:,.0f} us' for c in t.cpu_us)} | {mean_cpu / upstream_cpu:.1f}x |")


if __name__ == "__main__":
    main()
