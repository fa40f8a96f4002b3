"""A cache of what a store last said, for reads that must keep answering while the store is unreachable
(API keys, tenant rules).

An entry is fresh for ``ttl_s``. In the last quarter of that, a read starts its reload in the background and
is answered from the entry: a key in use is reloaded before it expires, and the requests that arrive at the
end of its TTL do not wait on the store. Past the TTL, the next read reloads it, once per key however many
requests ask at the same moment (they share one load). Either way no value older than ``ttl_s`` is served
while the store answers. A load in flight when its entry is dropped lands in no entry. While the store
fails, the entry's last good value keeps serving for up to ``stale_max_s``: a request waits at most
``stale_wait_s`` for the reload (which goes on in the background and lands when it can), and for
``retry_s`` after a failed reload no request waits on the store at all. A key with no value yet waits for
its load and sees its failure. A ``None`` value (say, "no such key") is never served past its TTL.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LastGood(Generic[K, V]):
    def __init__(self, *, ttl_s: float, down: type[Exception], stale_max_s: float = math.inf,
                 stale_wait_s: float = 0.25, retry_s: float = 2.0, max_size: int | None = None) -> None:
        """``down``: the exception a load raises when the store is unreachable (others propagate)."""
        self.ttl_s = ttl_s
        self._down_error = down
        self._stale_max = stale_max_s
        self._stale_wait = stale_wait_s
        self._retry = retry_s
        self._max_size = max_size
        self._down_until = 0.0
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()  # key -> (fresh until, value)
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._generation = 0  # moved on by a drop: loads started before it land in no entry

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            if hit[0] - now < self.ttl_s / 4 and key not in self._inflight and now >= self._down_until:
                self._load(key, load)  # in the TTL's last quarter: reloaded ahead of expiry, in the background
            return hit[1]
        stale = hit if hit is not None and hit[1] is not None and now - hit[0] <= self._stale_max else None
        if stale is not None and now < self._down_until:
            return stale[1]  # the store failed a moment ago: do not make this request wait on it
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._load(key, load)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), None if stale is None else self._stale_wait)
        except (self._down_error, TimeoutError):
            if stale is None:
                raise
            return stale[1]

    def _load(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        pending = self._inflight[key] = asyncio.ensure_future(load())
        generation = self._generation
        pending.add_done_callback(lambda done: self._landed(key, done, generation))
        return pending

    def _landed(self, key: K, done: asyncio.Future[V], generation: int) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if done.cancelled():
            return
        if done.exception() is not None:  # (retrieved here, so a background load's failure is not logged as lost)
            self._down_until = time.monotonic() + self._retry
            return
        if generation != self._generation:
            return  # read before a drop (a key revoked, limits changed): its waiters have it, the cache does not
        self._entries[key] = (time.monotonic() + self.ttl_s, done.result())
        self._entries.move_to_end(key)
        while self._max_size is not None and len(self._entries) > self._max_size:
            self._entries.popitem(last=False)

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)
        self._forget_loads()

    def drop_where(self, matches: Callable[[V], bool]) -> None:
        for key in [k for k, (_, value) in self._entries.items() if matches(value)]:
            del self._entries[key]
        self._forget_loads()

    def clear(self) -> None:
        self._entries.clear()
        self._forget_loads()

    def _forget_loads(self) -> None:
        """Loads in flight may have read the store before the change that made the caller drop: their values
        are not cached, and the next read loads afresh."""
        self._generation += 1
        self._inflight.clear()
