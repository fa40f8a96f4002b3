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
from tollway.local.embedded import EmbeddedRedis


@pytest.fixture
def evicting_redis(tmp_path):
    """The embedded redis-server, then given a memory limit and managed Redis's usual policy."""
    import redis

    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    with redis.Redis.from_url(url) as client:
        client.config_set("maxmemory", "64mb")
        client.config_set("maxmemory-policy", "volatile-lru")
    yield url
    server.stop()


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
