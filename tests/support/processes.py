"""Processes the tests start (the scripted upstream, `tollway serve`): their handles, readiness, stopping
them together, and the `tollway` CLI as a client of a running gateway."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Process:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        base = self.url.removesuffix("/v1")
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=5) as resp:
            return bytes(resp.read())

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """A series of its /metrics (``headers``: a gateway's needs an admin key)."""
        for line in self.get("/metrics", headers).decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        stop_all([self])


def stop_all(processes: list[Process]) -> None:
    """SIGTERM to every process at once, then wait for each (20 s, then SIGKILL): a session's servers drain
    in parallel, not one after another."""
    running = [p for p in processes if p.process.poll() is None]
    for p in running:
        p.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in running:
        try:
            p.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.process.kill()
            p.process.wait()


def ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False
    return check


@dataclass
class Served(Process):
    env: dict[str, str]


def bootstrap_key(served: Served, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in served.log.read_text().splitlines():
            if line.strip().startswith("tw-"):
                return line.strip()
        time.sleep(0.1)
    raise AssertionError("no bootstrap key printed:\n" + served.log.read_text())


def client_cli(*args: str, key: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A `tollway` command that is a client of a running gateway (TOLLWAY_API_KEY, TOLLWAY_BASE_URL)."""
    env = {"TOLLWAY_API_KEY": key, "TOLLWAY_BASE_URL": url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


