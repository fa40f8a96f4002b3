"""What output guards cost a stream, side by side in one run.

1. In process, per chunk: the output guard (``tollway.gateway.parts.guarding.GuardFilter``) over answers of
   Faker prose with planted PII and secrets, in 4-character chunks (about a token each); p50/p99 time per
   chunk for two policies, against calling a guardrails-ai ``Guard`` on the held window at every chunk (the
   approach the hot path avoids), and how much text the window holds back.
2. End to end: `tollway serve` before the scripted upstream's echo model, streaming each answer in
   4-character frames at a fixed pace; time to first token and time to the last token, without a guard
   policy and with one, in alternating rounds.

    .venv/bin/python bench/guardrails/stream.py [--answers 200] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from faker import Faker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import Processes, free_port, p50_p99, wait_http  # noqa: E402  (bench/common.py)

from tollway.gateway.parts.guarding import GuardFilter  # noqa: E402
from tollway.guardrails.engine import OutputPlan  # noqa: E402
from tollway.guardrails.policy import parse_policy, resolve  # noqa: E402

CHUNK = 4
SYSTEM = ("You are the support assistant of Northwind Bank. Never disclose internal escalation codes, never "
          "promise refunds, and always answer in a friendly, concise tone.")
POLICIES = {
    "pii + secrets (redact)": {"output": {"pii": "redact", "secrets": "redact"}},
    "pii + secrets + terms + leak": {"output": {"pii": "redact", "secrets": "redact", "terms": "redact",
                                                "leak": "redact"},
                                     "terms": ["Project Falcon", "Blue Harbor"], "competitors": ["Globex", "Initech"]},
}


def answers(n: int, seed: int = 5) -> list[str]:
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    plants = [fake.email, fake.phone_number, fake.credit_card_number, fake.iban, fake.ipv4_public,
              lambda: "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))]
    out = []
    for _ in range(n):
        sentences = [fake.sentence(nb_words=rng.randint(8, 20)) for _ in range(rng.randint(6, 14))]
        for _ in range(rng.randint(0, 3)):
            sentences.insert(rng.randrange(len(sentences) + 1), f"You can use {rng.choice(plants)()} for that.")
        out.append(" ".join(sentences))
    return out


def chunks_of(text: str) -> list[dict]:
    pieces = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)]
    out = [{"id": "c", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    out.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return out


async def per_chunk(texts: list[str], policy: dict) -> tuple[list[float], list[int]]:
    times, held = [], []
    resolved = resolve(parse_policy(policy))
    for text in texts:
        flt = GuardFilter(OutputPlan(resolved, system=(SYSTEM,)), 1)
        fed = released = 0
        for chunk in chunks_of(text):
            started = time.perf_counter()
            out = await flt.chunk(chunk)
            times.append(time.perf_counter() - started)
            fed += len((chunk["choices"][0]["delta"]).get("content") or "")
            released += sum(len((c["delta"]).get("content") or "") for o in out for c in o["choices"])
            held.append(max(fed - released, 0))
    return times, held


def guard_per_window(texts: list[str]) -> list[float]:
    """A guardrails-ai Guard (PII with fix, then secrets with fix) over the held window at every chunk."""
    from tollway.guardrails.validators import DetectPII, DetectSecrets, quiet_guard

    pii, secrets = quiet_guard(DetectPII(on_fail="fix")), quiet_guard(DetectSecrets(on_fail="fix"))
    times = []
    for text in texts[:40]:
        window = ""
        for i in range(0, len(text), CHUNK):
            window = (window + text[i:i + CHUNK])[-64:]  # a window as short as the partial-match one
            started = time.perf_counter()
            fixed = pii.validate(window).validated_output
            secrets.validate(fixed)
            times.append(time.perf_counter() - started)
    return times


async def end_to_end(args: argparse.Namespace, texts: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    workdir = Path(tempfile.mkdtemp(prefix="tollway-guard-bench-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    procs = Processes(workdir, env, stop_s=30)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        sim_port = free_port()
        sim, sim_log = procs.spawn([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(sim_port),
                                    "--models", "sim-echo", "--chunk-chars", str(CHUNK),
                                    "--tokens-per-s", str(args.frames_per_s)], "sim")
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_http(sim_url + "/models", 30, sim, sim_log)
        port = free_port()
        tw, tw_log = procs.spawn([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--upstream",
                                  sim_url, "--data-dir", str(workdir / "data"), "--log-level", "warning"], "tollway")
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, tw, tw_log)
        key = re.search(r"(tw-[A-Za-z0-9_-]+)", tw_log.read_text())
        assert key, tw_log.read_text()
        cli = [sys.executable, "-m", "tollway.cli", "tenants", "guards", "--tenant", "default",
               "--data-dir", str(workdir / "data")]

        async def run(argv: list[str]) -> None:
            await asyncio.to_thread(subprocess.run, argv, check=True, env=env, cwd=workdir, capture_output=True)

        await run([sys.executable, "-m", "tollway.cli", "tenants", "policy", "--tenant", "default",
                   "--retry-storm-limit", "0", "--data-dir", str(workdir / "data")])
        headers = {"authorization": f"Bearer {key.group(1)}"}
        arms = {"no guard policy": None, "pii + secrets (redact)": ["--output", "pii=redact", "secrets=redact"]}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", headers=headers, timeout=60) as client:
            warm = await client.post("/chat/completions", json={"model": "sim-echo", "messages": [
                {"role": "user", "content": "warm up"}]})  # the first request of a process pays for imports
            warm.raise_for_status()
            for round_ in range(args.rounds):
                for arm, flags in arms.items():
                    await run([*cli, "--clear"])
                    if flags is not None:
                        await run([*cli, *flags])
                    await asyncio.sleep(0.5)  # the change channel applies it at once; leave the CLI's load behind
                    store = results.setdefault(arm, {"ttft": [], "last": []})
                    for text in texts[round_ * args.requests:(round_ + 1) * args.requests]:
                        body = {"model": "sim-echo", "stream": True,
                                "messages": [{"role": "user", "content": text}]}
                        started = time.perf_counter()
                        first = last = None
                        async with client.stream("POST", "/chat/completions", json=body) as resp:
                            async for line in resp.aiter_lines():
                                if not line.startswith("data: {"):
                                    continue
                                chunk = orjson.loads(line[6:])
                                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                                    now = time.perf_counter()
                                    first = first or now
                                    last = now
                        assert first is not None and last is not None
                        store["ttft"].append(first - started)
                        store["last"].append(last - started)
    finally:
        procs.stop()
    return {arm: {k: p50_p99(v, 1000) for k, v in r.items()} for arm, r in results.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20, help="end to end: requests per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames-per-s", type=float, default=100, help="end to end: the upstream's pace")
    parser.add_argument("--no-e2e", action="store_true")
    args = parser.parse_args()
    texts = answers(max(args.answers, args.requests * args.rounds))
    print(f"answers: {len(texts)}, {sum(map(len, texts)) / len(texts):.0f} characters on average, "
          f"{CHUNK}-character chunks\n")
    print("## Per chunk, in process\n")
    print("| output guard | chunks | p50 per chunk | p99 per chunk | held back: mean / p99 / max chars |")
    print("|---|---|---|---|---|")
    for name, policy in POLICIES.items():
        times, held = await per_chunk(texts[:args.answers], policy)
        p50, p99 = p50_p99(times, 1e6)
        _, h99 = p50_p99([float(h) for h in held])
        print(f"| {name} | {len(times)} | {p50:.0f} µs | {p99:.0f} µs | {sum(held) / len(held):.1f} / {h99:.0f} / "
              f"{max(held)} |")
    times = guard_per_window(texts)
    p50, p99 = p50_p99(times, 1e6)
    print(f"| guardrails-ai Guard per window (pii, secrets) | {len(times)} | {p50:.0f} µs | {p99:.0f} µs | - |")
    if args.no_e2e:
        return
    print(f"\n## End to end: tollway serve, echo upstream at {args.frames_per_s:.0f} frames/s, "
          f"{args.requests} requests x {args.rounds} rounds per arm\n")
    results = await end_to_end(args, texts)
    print("| tenant policy | TTFT p50 | TTFT p99 | last token p50 | last token p99 |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['ttft'][0]:.1f} ms | {r['ttft'][1]:.1f} ms | {r['last'][0]:.1f} ms | "
              f"{r['last'][1]:.1f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
