"""Breaker trips shared by every gateway process (replicas and ``--workers``) through Redis pub/sub.

When a process's breaker for an upstream opens on its own failed calls, it publishes the upstream's name;
every other process opens its breaker for that upstream too, for the same cool-down, before sending it
anything (``ReplicaHealth.adopt``), so an upstream one replica found dead gets no more traffic from the
others within the time a message takes (milliseconds), instead of each replica paying its own
``consecutive_failures`` failed attempts. After the cool-down each process probes for itself: a recovery
is not shared (one replica's successful probe does not close the others'), which errs toward caution.

What is not shared: latency estimates, calls in flight and vLLM saturation readings (each process reads
those itself). Redis being unreachable costs nothing but the sharing: each process's own breakers work as
before, and the listener reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from tollway.keyspace import BREAKER_CHANNEL
from tollway.routing.health import Health

log = logging.getLogger("tollway.routing.shared")
RECONNECT_S = 1.0
POLL_S = 1.0  # the listener's longest read: it sees a stop within this
STOP_S = 2.0  # how long a stop waits for the listener to end, before and after closing its connection


class SharedBreakers:
    def __init__(self, redis_client: aioredis.Redis, health: Health) -> None:
        self.redis, self.health = redis_client, health
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this process: its own messages are skipped
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None  # the listener's subscription, while it has one
        self._stopping = False
        self._sends: set[asyncio.Task[Any]] = set()
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        for replica in self.health.replicas.values():
            replica.on_trip = self._tripped
        self._listener = asyncio.create_task(self._listen(), name="shared-breakers")

    async def stop(self) -> None:
        for replica in self.health.replicas.values():
            replica.on_trip = None
        self._stopping = True
        if self._listener is not None:
            # redis-py can swallow a cancellation that lands at the wrong moment of a read (redis/redis-py
            # #2028, #2551): the listener reads on. It checks the flag between reads of at most POLL_S, and
            # past STOP_S its subscription's connection is closed under it: a shutdown never waits forever.
            self._listener.cancel()
            done, _ = await asyncio.wait({self._listener}, timeout=STOP_S)
            if not done:
                log.info("shared breakers: the listener did not take its cancellation; closing its connection")
                with contextlib.suppress(Exception):
                    await cast(Any, self._pubsub).aclose()
                self._listener.cancel()
                done, _ = await asyncio.wait({self._listener}, timeout=STOP_S)
            if not done:
                log.warning("shared breakers: the listener is still running at shutdown; left behind")
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    def _tripped(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(name))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, name: str) -> None:
        try:
            await self.redis.publish(BREAKER_CHANNEL, orjson.dumps({"upstream": name, "origin": self.origin}))
        except Exception as exc:
            log.info("breaker trip of %s not shared (Redis: %s: %s)", name, type(exc).__name__, exc)

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await self.redis.ping()  # a cluster client learns the slots first (its pub/sub needs them)
                await pubsub.subscribe(BREAKER_CHANNEL)
                self.subscribed.set()
                # a read bounded in time and the flag checked between reads: a stop ends this loop within
                # POLL_S even when redis-py swallows the cancellation (below); a message arrives at once
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
                    if message is not None:
                        self._received(message.get("data"))
            except Exception as exc:
                # redis-py's cluster pub/sub has raised KeyError for a slot while a failover re-mapped it
                self.subscribed.clear()
                if self._stopping:
                    return
                log.info("shared breakers: Redis unreachable (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await cast(Any, pubsub).aclose()  # typed in newer redis-py, untyped in older

    def _received(self, data: Any) -> None:
        try:
            event = orjson.loads(data)
            name, origin = event["upstream"], event["origin"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return
        if origin == self.origin or not isinstance(name, str):
            return
        replica = self.health.replicas.get(name)
        if replica is not None:
            replica.adopt()
