"""A py-spy flame graph of one `tollway serve` process under wrk load (issue 27: where a proxied request's CPU
goes). The scripted upstream, embedded PostgreSQL and Redis, the bootstrap tenant with its retry-storm breaker
off (the load repeats one body) and, with ``--budget``, a never-reached monthly budget (every request leases).

    pip install py-spy                      # not a dependency of Tollway
    python bench/overhead/flame.py --out bench/overhead/flame-2026-12-04.svg [--seconds 15] [--budget]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import WRK_LUA, Processes, free_port, wait_http

BODY = {"model": "sim-large", "messages": [{"role": "user", "content": "hello from the benchmark"}],
        "max_tokens": 8}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--budget", action="store_true")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None or shutil.which("wrk") is None:
        sys.exit("needs py-spy (pip install py-spy) and wrk")
    workdir = Path(tempfile.mkdtemp(prefix="tollway-flame-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    procs = Processes(workdir, env, stop_s=30)
    try:
        sim_port = free_port()
        sim, sim_log = procs.spawn([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(sim_port)],
                                   "sim")
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_http(sim_url + "/models", 30, sim, sim_log)
        port = free_port()
        data = ["--data-dir", str(workdir / "data")]
        tw, tw_log = procs.spawn([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), "--upstream",
                                  sim_url, "--log-level", "warning", *data], "tollway")
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, tw, tw_log)
        key = re.search(r"(tw-[A-Za-z0-9_-]+)", tw_log.read_text())
        assert key, tw_log.read_text()
        cli = [sys.executable, "-m", "tollway.cli"]
        subprocess.run([*cli, "tenants", "policy", "--tenant", "default", "--retry-storm-limit", "0", *data],
                       check=True, env=env, cwd=workdir, capture_output=True)
        if args.budget:
            subprocess.run([*cli, "budgets", "set", "--tenant", "default", "--window", "month", "--usd", "1000000",
                            *data], check=True, env=env, cwd=workdir, capture_output=True)
        time.sleep(2.5)
        script = workdir / "wrk.lua"
        script.write_text(WRK_LUA.replace("{body}", json.dumps(BODY)).replace("{key}", key.group(1)))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        subprocess.run(["wrk", "-t1", "-c16", "-d3s", "-s", str(script), url], check=True, capture_output=True)
        load = subprocess.Popen(["wrk", "-t1", "-c16", f"-d{args.seconds + 2}s", "-s", str(script), url],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        subprocess.run([spy, "record", "--pid", str(tw.pid), "--duration", str(args.seconds), "--rate", "250",
                        "--format", "flamegraph", "--output", str(args.out)], check=True)
        out, _ = load.communicate()
        match = re.search(r"TW_RESULT (\d+) (\d+) (\d+)", out)
        if match:
            requests, micros, errors = map(int, match.groups())
            print(f"{(requests - errors) / (micros / 1e6):,.0f} req/s under the profiler; {errors} errors")
        print(f"flame graph: {args.out}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
