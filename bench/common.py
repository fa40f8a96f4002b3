"""Helpers shared by the benchmark scripts (they run as plain scripts, not as a package)."""

from __future__ import annotations

import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path


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


def quantiles_ms(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies given in seconds, in milliseconds."""
    if len(samples) < 2:
        return (samples[0] * 1000, samples[0] * 1000) if samples else (float("nan"), float("nan"))
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return qs[49] * 1000, qs[98] * 1000
