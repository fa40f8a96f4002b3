"""A Redis that evicts keys when full (managed Redis often defaults to volatile-lru) can drop budget counters
and leases along with the response cache beside them: the gateway says so at start and `tollway doctor`
fails on it; Redis without a memory limit, or with noeviction, passes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from tollway.infra.redisclient import eviction_risk
from tollway.local.embedded import free_port, redis_server_binary, wait_until


@pytest.fixture
def evicting_redis(tmp_path):
    port = free_port()
    process = subprocess.Popen([str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def up() -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(up, 20, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


async def test_an_evicting_redis_is_named_at_start_and_fails_the_doctor(evicting_redis, redis_url, pg, app_factory,
                                                                         caplog):
    assert await eviction_risk(redis_url) is None  # the test suite's Redis: no memory limit
    risk = await eviction_risk(evicting_redis)
    assert risk is not None and "volatile-lru" in risk
    with caplog.at_level(logging.WARNING, logger="tollway"):
        async with app_factory(redis_url=evicting_redis):
            pass
    assert any("maxmemory-policy volatile-lru" in r.getMessage() for r in caplog.records)
    env = {"PATH": "/usr/bin:/bin", "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": evicting_redis}
    doctor = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tollway.cli", "doctor"],
                                     capture_output=True, text=True, env=env, timeout=60)
    assert doctor.returncode == 1
    assert "FAIL  redis: RuntimeError: Redis evicts keys when full" in doctor.stdout
    fine = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tollway.cli", "doctor"],
                                   capture_output=True, text=True, env={**env, "TOLLWAY_REDIS_URL": redis_url},
                                   timeout=60)
    assert "ok    redis: Redis" in fine.stdout, fine.stdout
