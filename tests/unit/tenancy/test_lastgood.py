"""The last-good cache that keys and tenant rules share: one load per key at a time, the last good value
while the store is down, a short wait at most, and no None served past its TTL."""

from __future__ import annotations

import asyncio
import gc

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


async def test_a_key_in_use_is_reloaded_before_it_expires_and_no_read_waits_for_it():
    store, cache = Store(), LastGood[str, str | None](ttl_s=0.4, down=ServiceUnavailable)
    assert await cache.get("k", store.load) == "v1"
    store.delay, store.value = 0.05, "v2"
    await asyncio.sleep(0.15)
    assert await cache.get("k", store.load) == "v1"  # three quarters of the TTL left: no reload
    assert store.loads == 1
    await asyncio.sleep(0.17)  # now in the TTL's last quarter
    reads = await asyncio.wait_for(asyncio.gather(*(cache.get("k", store.load) for _ in range(10))), 0.02)
    assert reads == ["v1"] * 10  # answered from the entry, none waiting on the reload
    assert store.loads == 2  # one reload for all of them
    await asyncio.sleep(0.1)  # it landed before the old entry ran out
    assert await asyncio.wait_for(cache.get("k", store.load), 0.02) == "v2"
    assert store.loads == 2


async def test_a_drop_discards_a_load_that_was_already_reading():
    value, loads = "v1", 0
    cache = LastGood[str, str](ttl_s=60, down=ServiceUnavailable)

    async def load() -> str:
        nonlocal loads
        loads += 1
        read = value  # what the store said when the load read it
        await asyncio.sleep(0.05)
        return read

    reading = asyncio.ensure_future(cache.get("k", load))
    await asyncio.sleep(0.01)
    value = "revoked"  # changed after the load in flight read
    cache.drop("k")
    assert await reading == "v1"  # its own reader has it
    assert await cache.get("k", load) == "revoked"  # the cache does not: the next read loads afresh
    assert loads == 2


async def test_a_background_reload_that_fails_keeps_the_entry_and_is_not_left_unretrieved(caplog):
    store, cache = Store(), LastGood[str, str | None](ttl_s=0.2, down=ServiceUnavailable, retry_s=10)
    assert await cache.get("k", store.load) == "v1"
    store.down = True
    await asyncio.sleep(0.16)  # the TTL's last quarter
    assert await cache.get("k", store.load) == "v1"  # answered; the reload fails in the background
    await asyncio.sleep(0.01)
    loads = store.loads
    await asyncio.sleep(0.05)  # expired now, the store failed a moment ago: the last good value, no load
    assert await cache.get("k", store.load) == "v1"
    assert store.loads == loads
    gc.collect()
    assert "exception was never retrieved" not in caplog.text
