"""Breakers shared between gateway processes: two gateways on one Redis; when the first finds an upstream
dead (its breaker opens on its own failed attempts), the second opens its breaker for that upstream within
a second and sends it nothing, without a failed attempt of its own."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import redis.asyncio as aioredis
from support.config import write_config

from tollway.keyspace import BREAKER_CHANNEL
from tollway.local.embedded import free_port
from tollway.routing.shared import POLL_S, STOP_S, SharedBreakers


async def test_an_upstream_one_gateway_finds_dead_gets_nothing_from_another(app_factory, sim, make_tenant, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = write_config(tmp_path / "tollway.yaml", sim.url,
                          extra_upstreams=[{"name": "dead", "base_url": dead, "timeout_s": 1}],
                          extra_models=[{"name": "dead-model", "upstream": "dead", "tier": "small",
                                         "price": {"input_per_mtok": "1", "output_per_mtok": "2"}}])
    tenant = make_tenant()
    body = {"model": "dead-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with app_factory(config=config) as first, app_factory(config=config) as second:
        for _ in range(200):  # both listeners subscribed (up to 10 s on a loaded machine)
            [(_channel, subscribers)] = await first.state.redis.pubsub_numsub(BREAKER_CHANNEL)
            if subscribers >= 2:
                break
            await asyncio.sleep(0.05)
        assert subscribers >= 2
        seen_by_first = first.state.routing.health["dead"]
        seen_by_second = second.state.routing.health["dead"]
        statuses = []
        for _ in range(20):
            statuses.append((await first.client.post("/v1/chat/completions", headers=tenant.headers,
                                                     json=body)).status_code)
            if seen_by_first.state == "open":
                break
        tripped = time.monotonic()
        for _ in range(400):  # up to 2 s
            if seen_by_second.state == "open":
                break
            await asyncio.sleep(0.005)
        learned_in = time.monotonic() - tripped
        started = time.monotonic()
        refused = await second.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        refused_in = time.monotonic() - started
    assert seen_by_first.state == "open", statuses
    assert seen_by_first.failures >= 1
    assert learned_in < 1.0
    assert (seen_by_second.adopted, seen_by_second.calls, seen_by_second.failures) == (1, 0, 0)
    assert refused.status_code >= 500  # no replica of the model is available: an OpenAI-shaped error at once
    assert "error" in refused.json()
    assert refused_in < 0.5
    # sim, the other upstream, was never touched by the trip
    assert first.state.routing.health["sim"].state == second.state.routing.health["sim"].state == "closed"


class _Deaf:
    """A subscription whose reads take no cancellation, as redis-py's can when it lands at the wrong moment
    (redis/redis-py#2028, #2551): a cancelled read is read again."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def subscribe(self, *channels: str) -> None:
        await self.inner.subscribe(*channels)

    async def get_message(self, **kwargs: Any) -> Any:
        while True:
            try:
                return await self.inner.get_message(**kwargs)
            except asyncio.CancelledError:
                continue

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_listener_whose_read_swallows_its_cancellation_does_not_hold_up_the_shutdown(redis_url):
    """The in-process gateway's shutdown hung in the listener's stop (a test's teardown, under load): the
    listener read on after its cancellation. It now sees the stop between reads."""
    client = aioredis.from_url(redis_url)
    made = client.pubsub
    client.pubsub = lambda **kwargs: _Deaf(made(**kwargs))  # type: ignore[method-assign]
    shared = SharedBreakers(client, SimpleNamespace(replicas={}))  # type: ignore[arg-type]
    shared.start()
    try:
        await asyncio.wait_for(shared.subscribed.wait(), 10)
        await asyncio.sleep(0.05)  # inside a read
        began = time.monotonic()
        await asyncio.wait_for(shared.stop(), 4 * STOP_S)
        assert shared._listener is not None and shared._listener.done()
        assert time.monotonic() - began <= POLL_S + 0.5
    finally:
        await client.aclose()
