"""One tenant's flood of chats against another tenant's chats on an upstream of limited capacity, with and without
a cap on the flooding tenant's requests in flight (``max_parallel_requests``), side by side in one run.

The scripted upstream serves ``--capacity`` requests at once and queues the rest (as vLLM does past its batch),
each taking ``--ttft-ms``; one `tollway serve --upstream` (embedded PostgreSQL and Redis) in front of it. Tenant B
sends one chat at a time; its p50 / p99 are reported with nothing else running, while tenant A floods from
``--threads`` threads with no cap, and while it floods under a cap. A's threads do what the official SDKs do with
a 429: wait its ``retry-after``, then send again.

    .venv/bin/python bench/security/parallel_cap.py [--seconds 8] [--threads 32] [--capacity 8] [--cap 4]
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import embedded_stores, p50_p99, start_gateway, start_sim


def body(n: int) -> dict[str, object]:
    return {"model": "sim-large", "messages": [{"role": "user", "content": f"question {n}"}], "max_tokens": 16}


def probe(base: str, key: str, seconds: float) -> list[float]:
    took = []
    end = time.monotonic() + seconds
    n = 0
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < end:
            n += 1
            t = time.perf_counter()
            client.post(f"{base}/chat/completions", headers={"authorization": f"Bearer {key}"},
                        json=body(n)).raise_for_status()
            took.append(time.perf_counter() - t)
    return took


def flood(base: str, key: str, stop: threading.Event, done: collections.Counter[int]) -> None:
    n = threading.get_ident() % 100_000 * 1000
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            n += 1
            r = client.post(f"{base}/chat/completions", headers={"authorization": f"Bearer {key}"}, json=body(n))
            done[r.status_code] += 1
            if r.status_code == 429:
                stop.wait(float(r.headers.get("retry-after", "1")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, default=32, help="tenant A's concurrent chats")
    parser.add_argument("--capacity", type=int, default=8, help="requests the upstream serves at once")
    parser.add_argument("--ttft-ms", type=float, default=100)
    parser.add_argument("--cap", type=int, default=4, help="tenant A's max_parallel_requests in the capped row")
    args = parser.parse_args()
    with embedded_stores("tollway-bench-cap-") as stores:
        procs, cli = stores.procs, stores.cli
        sim_url, _ = start_sim(procs, "--max-concurrency", str(args.capacity), "--ttft-ms", str(args.ttft_ms))
        base = start_gateway(procs, sim_url, data=None, bench_tenant=False).url
        for name in ("a", "b"):
            cli("tenants", "create", name)
        keys = {name: cli("keys", "create", "--tenant", name) for name in ("a", "b")}
        print(f"upstream: {args.capacity} requests at once, {args.ttft_ms:g} ms each; tenant A: {args.threads} "
              f"threads; tenant B: one chat at a time, {args.seconds:g} s a row (ms)\n")
        print("| tenant A | A's answers (status: count) | B chat p50 / p99 | B chats |")
        print("|---|---|---|---|")
        for label, threads, cap in (("nothing", 0, None), ("floods, no cap", args.threads, None),
                                    (f"floods, max_parallel_requests {args.cap}", args.threads, args.cap)):
            if cap is not None:  # the policy reaches the gateway through the change channel
                cli("tenants", "policy", "--tenant", "a", "--max-parallel-requests", str(cap))
                time.sleep(1)
            stop, done = threading.Event(), collections.Counter[int]()
            workers = [threading.Thread(target=flood, args=(base, keys["a"], stop, done)) for _ in range(threads)]
            for w in workers:
                w.start()
            time.sleep(1.0 if threads else 0)  # the upstream's queue is full before B starts
            took = probe(base, keys["b"], args.seconds)
            stop.set()
            for w in workers:
                w.join()
            p50, p99 = p50_p99(took, 1000)
            answers = ", ".join(f"{s}: {c}" for s, c in sorted(done.items())) or "-"
            print(f"| {label} | {answers} | {p50:.0f} / {p99:.0f} | {len(took)} |", flush=True)


if __name__ == "__main__":
    main()
