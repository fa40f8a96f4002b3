"""A quick-start gateway's memory over a long run: RSS sampled every 10k requests up to 1M.

One run starts the scripted upstream and `tollway serve --upstream` (no config file: embedded PostgreSQL and
Redis, no guard policy, no litellm model) and drives it with wrk (16 connections, the load benches' chat
body; the tenant's retry-storm breaker off, as in bench/overhead) in short rounds. After each round it reads
the serving process's RSS (/proc; the stores are processes of their own) and the requests completed so far,
and keeps a sample at every 10k. It prints RSS after start, after the warm-up (the first --warmup requests:
pools, caches and allocator arenas grow to their working size there), every 100k, the largest RSS seen, and
the growth after the warm-up; `--csv` writes every sample.

    .venv/bin/python bench/memory/soak.py [--requests 1000000] [--warmup 50000] [--csv FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Processes, rss_mib, start_gateway, start_sim, wrk_argv, wrk_result, wrk_script

EVERY = 10_000
ROUND_S = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=50_000)
    parser.add_argument("--csv", type=Path, help="write every sample here: requests, errors, RSS MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollway-soak-") as tmp:
        work = Path(tmp)
        procs = Processes(work, {**os.environ, "HF_HUB_OFFLINE": "1"}, stop_s=30)
        try:
            sim, _ = start_sim(procs)
            gw = start_gateway(procs, sim, data=work / "data", ready_s=180)
            pid = gw.process.pid
            script = wrk_script(work, gw.key)
            samples = [(0, 0, rss_mib(pid))]
            done = errors = 0
            mark = EVERY
            while done < args.requests:
                out = subprocess.run(wrk_argv(script, gw.url + "/chat/completions", ROUND_S), capture_output=True,
                                     text=True, check=True).stdout
                n, failed, _ = wrk_result(out)
                done, errors = done + n, errors + failed
                if done >= mark:
                    samples.append((done, errors, rss_mib(pid)))
                    mark = (done // EVERY + 1) * EVERY
                if gw.process.poll() is not None:
                    raise SystemExit("the gateway exited")
            report(samples, args.warmup)
            if args.csv:
                args.csv.write_text("requests,errors,rss_mib\n" + "".join(f"{r},{e},{m:.1f}\n" for r, e, m in samples))
        finally:
            procs.stop()


def report(samples: list[tuple[int, int, float]], warmup: int) -> None:
    print(f"{'requests':>10} {'errors':>7} {'RSS MiB':>8}")
    shown = 0
    for requests, errors, mib in samples:
        if requests == 0 or requests >= shown:
            print(f"{requests:>10,} {errors:>7,} {mib:>8.1f}")
            shown = (requests // 100_000 + 1) * 100_000
    after = [m for r, _, m in samples if r >= warmup]
    base = after[0] if after else float("nan")
    print(f"after start {samples[0][2]:.1f} MiB; at the end of the warm-up ({warmup:,} requests) {base:.1f} MiB; "
          f"largest {max(m for *_, m in samples):.1f} MiB; last {samples[-1][2]:.1f} MiB after {samples[-1][0]:,} "
          f"requests ({samples[-1][1]:,} errors); growth after the warm-up {max(after) - base:+.1f} MiB (largest) "
          f"{samples[-1][2] - base:+.1f} MiB (last)")


if __name__ == "__main__":
    main()
