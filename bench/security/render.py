"""One tenant's worst prompt renders against another tenant's latency, side by side in one run.

A `tollway serve` process (embedded PostgreSQL and Redis, the scripted upstream); tenant A's prompt engineer
submits the templates a tenant can make the most of, and A's app key renders them in a loop from a few
threads while tenant B's app key calls `GET /v1/models` and a plain chat completion; B's p50/p99 are
reported with no renders running and with each kind of render running. Target (issue 22): B's p99 rises by
at most 50 ms during the worst render.

    .venv/bin/python bench/security/render.py [--seconds 8] [--threads 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Processes, free_port, p50_p99, wait_http

TEMPLATES = {
    "repetition past the limit": "{{ v * 1000000 }}",
    "nested loops (time limit)": "{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}x",
    "plain template near the output limit": "{{ v }}" * 12,
    "plain template past the output limit": "{{ v }}" * 40,
}


def prompt_file(content: str) -> str:
    return yaml.safe_dump({"model": "sim-small", "messages": [{"role": "user", "content": content}],
                           "variables": {"v": {"type": "string", "default": "x"}}})


def probe(base: str, key: str, seconds: float) -> dict[str, tuple[float, float]]:
    headers = {"authorization": f"Bearer {key}"}
    models: list[float] = []
    chats: list[float] = []
    end = time.monotonic() + seconds
    n = 0
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < end:
            n += 1
            t = time.perf_counter()
            client.get(f"{base}/v1/models", headers=headers).raise_for_status()
            models.append(time.perf_counter() - t)
            t = time.perf_counter()
            client.post(f"{base}/v1/chat/completions", headers=headers, json={
                "model": "sim-small", "max_tokens": 2, "messages": [{"role": "user", "content": f"probe {n}"}]
            }).raise_for_status()
            chats.append(time.perf_counter() - t)
            time.sleep(0.01)
    return {"models": p50_p99(models, 1000), "chat": p50_p99(chats, 1000)}


def render_loop(base: str, key: str, name: str, version: str, stop: threading.Event,
                outcomes: list[tuple[int, float]]) -> None:
    body = {"model": "prompt", "messages": [], "max_tokens": 2,
            "prompt": {"name": name, "version": version, "variables": {"v": "y" * 20_000}}}
    with httpx.Client(timeout=60) as own:
        n = 0
        while not stop.is_set():
            n += 1  # each request its own end user: identical ones in a row would trip the retry-storm breaker
            t = time.perf_counter()
            r = own.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={**body, "user": f"{threading.get_ident()}-{n}"})
            outcomes.append((r.status_code, time.perf_counter() - t))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tollway-bench-render-"))
    env = {**os.environ, "TOLLWAY_DATA_DIR": str(work / "data"), "TOLLWAY_BOOTSTRAP": "false"}
    procs = Processes(work, env)

    def cli(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "tollway.cli", *argv], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    try:
        sim_port, port = free_port(), free_port()
        sim, log = procs.spawn([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(sim_port),
                                "--models", "sim-small"], "sim")
        wait_http(f"http://127.0.0.1:{sim_port}/v1/models", 30, sim, log)
        serve, log = procs.spawn([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--upstream",
                                  f"http://127.0.0.1:{sim_port}/v1"], "serve")
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", 120, serve, log)
        for name in ("a", "b"):
            cli("tenants", "create", name)
        engineer = cli("keys", "create", "--tenant", "a", "--role", "prompt_engineer")
        app_a = cli("keys", "create", "--tenant", "a")
        app_b = cli("keys", "create", "--tenant", "b")
        client = httpx.Client(timeout=60)
        versions = {}
        for i, (label, content) in enumerate(TEMPLATES.items()):
            resp = client.post(f"{base}/v1/prompts/p{i}/versions", headers={"authorization": f"Bearer {engineer}"},
                               json={"content": prompt_file(content), "message": label})
            resp.raise_for_status()
            versions[label] = (f"p{i}", resp.json()["version"])

        rows = [("no renders", probe(base, app_b, args.seconds), None)]
        for label, (name, version) in versions.items():
            stop = threading.Event()
            outcomes: list[tuple[int, float]] = []
            threads = [threading.Thread(target=render_loop, args=(base, app_a, name, version, stop, outcomes))
                       for _ in range(args.threads)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            measured = probe(base, app_b, args.seconds)
            stop.set()
            for t in threads:
                t.join()
            rows.append((label, measured, outcomes))
        base_p99 = rows[0][1]["models"][1]
        print(f"\n{'tenant A renders':<38} {'A status':>9} {'A p50 ms':>9} {'B /models p50/p99 ms':>22} "
              f"{'B chat p50/p99 ms':>19} {'B p99 rise':>11}")
        worst = 0.0
        for label, m, outcomes in rows:
            statuses = "-" if not outcomes else ",".join(sorted({str(s) for s, _ in outcomes}))
            a_p50 = "-" if not outcomes else f"{statistics.median(d for _, d in outcomes) * 1000:.0f}"
            rise = m["models"][1] - base_p99
            worst = max(worst, rise)
            print(f"{label:<38} {statuses:>9} {a_p50:>9} {m['models'][0]:>10.1f} / {m['models'][1]:>8.1f} "
                  f"{m['chat'][0]:>8.1f} / {m['chat'][1]:>7.1f} {rise:>+10.1f}")
        print(f"\ntarget: tenant B's p99 rises by <= 50 ms during the worst render: "
              f"{'met' if worst <= 50 else 'NOT met'} (worst rise {worst:+.1f} ms)")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
