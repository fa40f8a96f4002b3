"""Helpers shared by the benchmark scripts (they run as plain scripts, not as a package)."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

CLI = [sys.executable, "-m", "tollway.cli"]
# The request the load benches repeat (the tenant's retry-storm breaker is off for it: ``start_gateway``).
BENCH_BODY = {"model": "sim-large", "messages": [{"role": "user", "content": "hello from the benchmark"}],
              "max_tokens": 8}
# A wrk script that POSTs one JSON body with a bearer key and prints completed requests, duration, errors.
WRK_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  io.write(string.format("TW_RESULT %d %d %d\\n", summary.requests, summary.duration,
           summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def module_at(rev: str, path: str, folder: Path) -> ModuleType:
    """A source file of the repository as it was at ``rev`` (``git show``), loaded as a module of its own
    (named after the file, ``_before`` appended), for a bench that runs it beside today's."""
    root = Path(__file__).parents[1]
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    name = f"{Path(path).stem}_before"
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


PACKAGE_DIRS = {"gateway": "gateway", "routing": "routing", "retrieval": "retrieval", "guardrails": "guardrails",
                "prompts": "prompts", "evals": "evals"}  # pyproject's package-dir: tollway.X lives in X/


def package_at(rev: str, folder: Path) -> dict[str, str]:
    """The whole ``tollway`` package as it was at ``rev`` (``git archive``), laid out as an install would
    (``tollway.gateway`` in ``gateway/``, ...); the environment a process needs to import it instead of
    today's (``PYTHONPATH`` ahead of the editable install), for a bench that runs both side by side."""
    root = Path(__file__).parents[1]
    tree = folder / f"tree-{rev.replace('/', '_')}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=root, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        shim = tree / "_site"
        shim.mkdir()
        (shim / "tollway").symlink_to(tree / "tollway")
        for sub, where in PACKAGE_DIRS.items():
            if not (tree / "tollway" / sub).exists():
                (tree / "tollway" / sub).symlink_to(tree / where)
    return {"PYTHONPATH": str(tree / "_site")}


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A process's memory from /proc in MiB: ``VmRSS`` now, or ``VmHWM``, its peak since start or the last
    ``echo 5 > /proc/PID/clear_refs``; nan if the field is missing."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path,
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early; log:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout}s; log:\n{log.read_text()[-3000:]}")


def wrk_script(workdir: Path, key: str, body: dict[str, Any] | None = None, name: str = "wrk") -> Path:
    """The wrk script that POSTs ``body`` (default: ``BENCH_BODY``) with ``key``."""
    script = workdir / f"{name}.lua"
    script.write_text(WRK_LUA.replace("{body}", json.dumps(body or BENCH_BODY)).replace("{key}", key))
    return script


def wrk_argv(script: Path, url: str, duration: float, connections: int = 16) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-s", str(script), url]


def wrk_result(out: str) -> tuple[int, int, float]:
    """What a run of ``wrk_script`` printed: (requests, errors, seconds)."""
    match = re.search(r"TW_RESULT (\d+) (\d+) (\d+)", out)
    assert match, out
    requests, micros, errors = map(int, match.groups())
    return requests, errors, micros / 1e6


def start_sim(procs: Processes, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The scripted upstream: its base URL (ending in /v1) and its process."""
    port = free_port()
    proc, log = procs.spawn([*CLI, "sim-upstream", "--port", str(port), *extra], "sim")
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(url + "/models", 30, proc, log)
    return url, proc


@dataclass
class Gateway:
    url: str  # ending in /v1
    key: str  # the bootstrap tenant's key ("" when not set up here)
    process: subprocess.Popen[bytes]


def start_gateway(procs: Processes, upstream: str, *, data: Path | None, name: str = "tollway",
                  args: Sequence[str] = (), env: dict[str, str] | None = None, ready_s: float = 120,
                  bench_tenant: bool = True, budget: bool = False) -> Gateway:
    """`tollway serve --upstream` (no config file). ``data``: its --data-dir (None: from the environment).
    ``bench_tenant``: read the bootstrap key it printed and switch the tenant's retry-storm breaker off (the
    load benches repeat one body, exactly what that breaker refuses; admission still runs its Redis script
    on every request); ``budget``: also give it a never-reached monthly budget (every request leases)."""
    port = free_port()
    where = ["--data-dir", str(data)] if data is not None else []
    proc, log = procs.spawn([*CLI, "serve", "--port", str(port), "--upstream", upstream, "--log-level", "warning",
                             *where, *args], name, env=env)
    wait_http(f"http://127.0.0.1:{port}/healthz", ready_s, proc, log)
    key = ""
    if bench_tenant:
        found = re.search(r"(tw-[A-Za-z0-9_-]+)", log.read_text())
        assert found, log.read_text()
        key = found.group(1)
        run_env = {**procs.env, **(env or {})}
        subprocess.run([*CLI, "tenants", "policy", "--tenant", "default", "--retry-storm-limit", "0", *where],
                       check=True, env=run_env, cwd=procs.workdir, capture_output=True)
        if budget:
            subprocess.run([*CLI, "budgets", "set", "--tenant", "default", "--window", "month", "--usd", "1000000",
                            *where], check=True, env=run_env, cwd=procs.workdir, capture_output=True)
    return Gateway(f"http://127.0.0.1:{port}/v1", key, proc)


def p50_p99(samples: list[float], scale: float = 1.0) -> tuple[float, float]:
    """p50 and p99 of the samples, times ``scale`` (1000: seconds to milliseconds, 1e6: to microseconds)."""
    if len(samples) < 2:
        return (samples[0] * scale, samples[0] * scale) if samples else (float("nan"), float("nan"))
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return qs[49] * scale, qs[98] * scale


class Processes:
    """Child processes of one benchmark run, each logging to a file in ``workdir``; ``stop`` ends them all.
    A run stopped by SIGTERM or SIGHUP (``kill``, a closed terminal) exits through its ``finally`` blocks too,
    so it stops what it started instead of leaving gateways and upstreams running."""

    def __init__(self, workdir: Path, env: dict[str, str], *, stop_s: float = 15) -> None:
        self.workdir, self.env, self.stop_s = workdir, env, stop_s
        self.procs: list[subprocess.Popen[bytes]] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, _exit_on_signal)

    def spawn(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})}, cwd=self.workdir)
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        """SIGTERM to all, the last started first; what has not ended within ``stop_s`` is killed."""
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(self.stop_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@dataclass
class Stores:
    """An embedded PostgreSQL and Redis for one run, the environment a `tollway` process needs to use them, the
    run's processes, and the CLI on them (``cli``: its stdout; a failure raises)."""

    work: Path
    env: dict[str, str]
    procs: Processes

    def cli(self, *argv: str) -> str:
        return subprocess.run([*CLI, *argv], env=self.env, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def embedded_stores(prefix: str) -> Iterator[Stores]:
    """``Stores`` in a temporary folder; everything stopped and removed on the way out."""
    import os
    import shutil

    from tollway.local.embedded import EmbeddedPostgres, EmbeddedRedis

    work = Path(tempfile.mkdtemp(prefix=prefix))
    pg, redis = EmbeddedPostgres(work / "pg"), EmbeddedRedis(work / "redis")
    env = {**os.environ, "TOLLWAY_DATA_DIR": str(work / "data"), "TOLLWAY_BOOTSTRAP": "false",
           "TOLLWAY_DATABASE_URL": pg.start(), "TOLLWAY_REDIS_URL": redis.start()}
    procs = Processes(work, env)
    try:
        yield Stores(work, env, procs)
    finally:
        procs.stop()
        redis.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@asynccontextmanager
async def bench_tenant(folder: Path | str | None = None) -> AsyncIterator[tuple[Any, int]]:
    """An embedded PostgreSQL, migrated, holding the tenant 'bench': (an autocommit connection, the tenant's
    id). In a temporary folder, or in ``folder``, kept between runs (the tenant made before is the one)."""
    import psycopg

    from tollway.infra.db import migrate
    from tollway.local.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
        pg = EmbeddedPostgres(Path(folder or tmp) / "pg")
        url = pg.start()
        try:
            await migrate(url)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                cur = await conn.execute("INSERT INTO tenants (name) VALUES ('bench') ON CONFLICT (name) DO UPDATE"
                                         " SET name = excluded.name RETURNING id")
                row = await cur.fetchone()
                assert row is not None
                yield conn, int(row[0])
        finally:
            pg.stop()
