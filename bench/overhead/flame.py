"""A py-spy flame graph of one `tollway serve` process under wrk load (issue 27: where a proxied request's CPU
goes). The scripted upstream, embedded PostgreSQL and Redis, the bootstrap tenant with its retry-storm breaker
off (the load repeats one body) and, with ``--budget``, a never-reached monthly budget (every request leases).

    pip install py-spy                      # not a dependency of Tollway
    python bench/overhead/flame.py --out bench/overhead/flame-2026-12-04.svg [--seconds 15] [--budget] [--format raw]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Processes, start_gateway, start_sim, wrk_argv, wrk_result, wrk_script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--budget", action="store_true")
    parser.add_argument("--format", choices=("flamegraph", "raw"), default="flamegraph",
                        help="raw: collapsed stacks, one line each with its sample count (for reading by script)")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None or shutil.which("wrk") is None:
        sys.exit("needs py-spy (pip install py-spy) and wrk")
    workdir = Path(tempfile.mkdtemp(prefix="tollway-flame-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    procs = Processes(workdir, env, stop_s=30)
    try:
        sim_url, _ = start_sim(procs)
        tw = start_gateway(procs, sim_url, data=workdir / "data", budget=args.budget)
        time.sleep(2.5)  # the policy cache TTL
        script = wrk_script(workdir, tw.key)
        url = tw.url + "/chat/completions"
        subprocess.run(wrk_argv(script, url, 3), check=True, capture_output=True)  # warm-up
        load = subprocess.Popen(wrk_argv(script, url, args.seconds + 2), stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        subprocess.run([spy, "record", "--pid", str(tw.process.pid), "--duration", str(args.seconds), "--rate",
                        "250", "--format", args.format, "--output", str(args.out)], check=True)
        out, _ = load.communicate()
        requests, errors, seconds = wrk_result(out)
        print(f"{(requests - errors) / seconds:,.0f} req/s under the profiler; {errors} errors")
        print(f"flame graph: {args.out}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
