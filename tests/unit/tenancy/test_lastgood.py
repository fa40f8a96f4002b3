"""The last-good cache that keys and tenant rules share: one load per key at a time, the last good value
while the store is down, a short wait at most, and no None served past its TTL."""

from __future__ import annotations

import asyncio

import pytest

from tollway.errors import ServiceUnavailable
from tollway.lastgood import LastGood


class Store:
    def __init__(self) -> None:
        self.loads = 0
        self.down = False
        self.delay = 0.0
        self.value: str | None = "v1"

    async def load(self) -> str | None:
        self.loads += 1
        await asyncio.sleep(self.delay)
        if self.down:
            raise ServiceUnavailable("down")
        return self.value


async def test_concurrent_reads_share_one_load():
    store, cache = Store(), LastGood[str, str | None](ttl_s=60, down=ServiceUnavailable)
    store.delay = 0.05
    got = await asyncio.gather(*(cache.get("k", store.load) for _ in range(20)))
    assert got == ["v1"] * 20
    assert store.loads == 1


async def test_the_last_good_value_serves_while_the_store_is_down():
    store, cache = Store(), LastGood[str, str | None](ttl_s=0, down=ServiceUnavailable, stale_wait_s=0.05,
                                                      retry_s=10)
    assert await cache.get("k", store.load) == "v1"
    store.down, store.value = True, "v2"
    assert await cache.get("k", store.load) == "v1"  # the reload failed: last good
    loads = store.loads
    assert await cache.get("k", store.load) == "v1"  # within retry_s: no load at all
    assert store.loads == loads
    with pytest.raises(ServiceUnavailable):
        await cache.get("other", store.load)  # nothing good to fall back on


async def test_a_slow_store_costs_a_known_key_the_short_wait_only():
    store, cache = Store(), LastGood[str, str | None](ttl_s=0, down=ServiceUnavailable, stale_wait_s=0.05)
    assert await cache.get("k", store.load) == "v1"
    store.delay, store.value = 0.3, "v2"
    cache.ttl_s = 60  # what the reload lands stays fresh
    assert await asyncio.wait_for(cache.get("k", store.load), 0.2) == "v1"
    await asyncio.sleep(0.35)  # the reload went on without the request and landed
    assert await cache.get("k", store.load) == "v2"
    assert store.loads == 2


async def test_none_is_not_served_past_its_ttl():
    store, cache = Store(), LastGood[str, str | None](ttl_s=0, down=ServiceUnavailable)
    store.value = None
    assert await cache.get("k", store.load) is None
    store.down = True
    with pytest.raises(ServiceUnavailable):
        await cache.get("k", store.load)
