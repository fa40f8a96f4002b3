"""Prompts: render latency on the request path, label-move propagation between two gateway processes, push
latency through the API and through `git push`.

    python bench/prompts/run.py [--prompts 1000] [--versions 10] [--renders 20000] [--moves 30] [--pushes 30]

1. Render: one tenant with ``--prompts`` prompts of ``--versions`` versions each (rows written straight
   into PostgreSQL, loaded by the gateway's registry), each with a ``production`` label; then per request
   what the chat stage does: label lookup, variable checks, render (templates compiled on first use and
   cached per version), and the tiktoken count of the rendered messages that routing needs.
2. Propagation: two `tollway serve` processes on one embedded PostgreSQL and Redis; the label moves on
   gateway A (admin API); the time until gateway B answers with the new version (B is polled as fast as
   it answers, ~2 ms per request, so the figure includes up to one poll).
3. Push: `POST /v1/prompts/{name}/versions` and `git push` (Debian's git) of one changed prompt each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import Processes, free_port, p50_p99, wait_http  # noqa: E402

PROMPT = """model: {model}
messages:
  - {{role: system, content: "You are the {name} assistant (v{v}). Answer {{{{ customer }}}} in {{{{ language }}}}, briefly."}}
  - {{role: user, content: "{{{{ question }}}}"}}
variables:
  customer: {{type: string}}
  language: {{type: string, default: English}}
  question: {{type: string}}
params: {{temperature: 0.2, max_tokens: 64}}
"""


async def render_bench(database_url: str, prompts: int, versions: int, renders: int) -> dict[str, float]:
    import psycopg

    from tollway.gateway.tenancy.keys import create_tenant
    from tollway.infra.db import migrate
    from tollway.prompts import Registry
    from tollway.routing import count_messages

    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        tid = await create_tenant(conn, f"bench{os.getpid()}")
        rows = [(tid, f"p{i}", f"{i:05d}{v:035d}", "0" * 40, PROMPT.format(model="sim-large", name=f"p{i}", v=v),
                 "bench", "bench") for i in range(prompts) for v in range(versions)]
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO prompt_versions (tenant_id, name, version, blob, content, message,"
                                  " author) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
            await cur.executemany("INSERT INTO prompt_labels (tenant_id, name, label, version) VALUES (%s, %s, %s, %s)",
                                  [(tid, f"p{i}", "production", f"{i:05d}{versions - 1:035d}") for i in range(prompts)])
        loads: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(5):  # a gateway's registry holds the labelled versions' text; the CLI's, every version's
            for everything in (False, True):  # the last, holding every text, serves the renders below
                registry = Registry(None)
                started = time.perf_counter()
                await registry.load_with(conn, tid, everything=everything)
                loads[everything].append(time.perf_counter() - started)
        load_s, load_all_s = statistics.median(loads[False]), statistics.median(loads[True])
    variables = {"customer": "Ada", "question": "How much does this cost?"}
    for i in range(prompts):  # first use compiles; the steady state is what a request pays
        await registry.render(tid, "warm", {"name": f"p{i}", "variables": variables})
    samples = []
    for n in range(renders):
        ref = {"name": f"p{n % prompts}", "variables": variables}
        t0 = time.perf_counter()
        rendered = await registry.render(tid, f"user-{n}", ref)
        count_messages(list(rendered.messages))
        samples.append(time.perf_counter() - t0)
    cold = []
    for i in range(min(prompts, 500)):  # a version not yet compiled: first render of it
        t0 = time.perf_counter()
        await registry.render(tid, "cold", {"name": f"p{i}", "version": f"{i:05d}{0:035d}", "variables": variables})
        cold.append(time.perf_counter() - t0)
    p50, p99 = p50_p99(samples, 1e6)
    c50, c99 = p50_p99(cold, 1e6)
    return {"load_s": load_s, "load_all_s": load_all_s, "p50_us": p50, "p99_us": p99, "cold_p50_us": c50,
            "cold_p99_us": c99}


def git(cwd: Path, *args: str) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_TERMINAL_PROMPT": "0"}
    subprocess.run(["git", "-c", "user.name=Bench", "-c", "user.email=b@example.com", *args], cwd=cwd, env=env,
                   check=True, capture_output=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--renders", type=int, default=20000)
    parser.add_argument("--moves", type=int, default=30)
    parser.add_argument("--pushes", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tollway-bench-prompts-"))
    env = {**os.environ, "TOLLWAY_DATA_DIR": str(work / "data"), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "HF_HUB_OFFLINE": "1"}
    procs = Processes(work, env)
    try:
        from tollway.local.embedded import EmbeddedPostgres, EmbeddedRedis

        pg = EmbeddedPostgres(work / "data" / "postgres")
        database_url = pg.start()
        redis = EmbeddedRedis(work / "data" / "redis")
        redis_url = redis.start()
        render = asyncio.run(render_bench(database_url, args.prompts, args.versions, args.renders))

        sim_port = free_port()
        sim, sim_log = procs.spawn([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(sim_port)], "sim")
        wait_http(f"http://127.0.0.1:{sim_port}/v1/models", 30, sim, sim_log)
        shared = {"TOLLWAY_DATABASE_URL": database_url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "0"}
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            proc, log = procs.spawn([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--upstream",
                                     f"http://127.0.0.1:{sim_port}/v1"], f"tollway-{i}", env=shared)
            wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc, log)
        subprocess.run([sys.executable, "-m", "tollway.cli", "tenants", "create", "pe"], env={**env, **shared},
                       check=True, capture_output=True, text=True)
        key = subprocess.run([sys.executable, "-m", "tollway.cli", "keys", "create", "--tenant", "pe", "--role",
                              "prompt_engineer"], env={**env, **shared}, check=True, capture_output=True,
                             text=True).stdout.strip()
        a, b = (f"http://127.0.0.1:{p}/v1" for p in ports)
        headers = {"authorization": f"Bearer {key}"}
        client = httpx.Client(timeout=30)
        content = PROMPT.format(model="sim-large", name="greet", v=0)
        api_push = []
        versions = []
        for i in range(args.pushes):
            t0 = time.perf_counter()
            resp = client.post(f"{a}/prompts/greet/versions", headers=headers,
                               json={"content": content.replace("(v0)", f"(v{i})"), "message": f"v{i}"})
            api_push.append(time.perf_counter() - t0)
            resp.raise_for_status()
            versions.append(resp.json()["version"])
        chat = {"model": "prompt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "prompt": {"name": "greet", "variables": {"customer": "Ada", "question": "hi"}}}
        propagation = []
        polls = 0
        for i in range(args.moves):
            target = versions[i % 2]  # back and forth between two versions: every move is a change
            client.put(f"{a}/prompts/greet/labels/production", headers=headers, json={"version": target}).raise_for_status()
            moved = time.perf_counter()
            while True:  # a fresh body each poll: identical ones would trip the retry-storm breaker
                polls += 1
                r = client.post(f"{b}/chat/completions", headers=headers, json={**chat, "user": f"poll-{polls}"})
                if r.headers.get("x-tollway-prompt-version") == f"greet@{target}":
                    break
            propagation.append(time.perf_counter() - moved)
        repo = work / "repo"
        url = a.replace("http://", f"http://git:{key}@") + "/prompts.git"
        git(work, "clone", url, "repo")
        git_push = []
        for i in range(args.pushes):
            (repo / "greet.yaml").write_text(content.replace("(v0)", f"(git {i})"))
            git(repo, "commit", "-qam", f"git {i}")
            t0 = time.perf_counter()
            git(repo, "push", "-q", "origin", "HEAD:main")
            git_push.append(time.perf_counter() - t0)
        results = {
            "render": render,
            "propagation_ms": p50_p99(propagation, 1000), "propagation_max_ms": max(propagation) * 1000,
            "api_push_ms": p50_p99(api_push, 1000), "git_push_ms": p50_p99(git_push, 1000),
        }
        print(json.dumps(results, indent=2))
        r = render
        print(f"\n| measure | p50 | p99 | target |\n|---|---|---|---|\n"
              f"| render ({args.prompts} prompts x {args.versions} versions; label + render + token count) "
              f"| {r['p50_us']:.1f} us | {r['p99_us']:.1f} us | p50 <= 50 us |\n"
              f"| render, first use of a version (compiles) | {r['cold_p50_us']:.0f} us | {r['cold_p99_us']:.0f} us | - |\n"
              f"| label move on A -> served by B ({args.moves} moves) | {results['propagation_ms'][0]:.1f} ms "
              f"| {results['propagation_ms'][1]:.1f} ms (max {results['propagation_max_ms']:.1f}) | < 100 ms |\n"
              f"| push through the API | {results['api_push_ms'][0]:.1f} ms | {results['api_push_ms'][1]:.1f} ms | - |\n"
              f"| `git push` (client included) | {results['git_push_ms'][0]:.1f} ms | {results['git_push_ms'][1]:.1f} ms | - |\n"
              f"| registry load of {args.prompts * args.versions} versions, the labelled ones' text (a gateway's) "
              f"| {r['load_s'] * 1000:.0f} ms | | - |\n"
              f"| registry load of {args.prompts * args.versions} versions, every one's text (the CLI's) "
              f"| {r['load_all_s'] * 1000:.0f} ms | | - |")
    finally:
        procs.stop()
        for server in ("redis", "pg"):
            obj = locals().get(server)
            if obj is not None:
                obj.stop()


if __name__ == "__main__":
    main()
