"""Exact-match response cache for deterministic requests, in Redis, per tenant, with a TTL.

A request is deterministic when it asks for temperature 0 or names a seed. The key is a hash of the
tenant and the request as sent, minus what does not change the answer (streaming, the end user,
metadata), with JSON keys sorted, so the same question in another key order hits. A hit costs
nothing; what the answer cost when it was made is returned too, so the saving can be recorded.
A Redis failure is a miss, never an error: the cache only ever saves money.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from decimal import Decimal

import orjson
import redis.asyncio as aioredis

from tollway.infra.redisclient import REDIS_FAULTS
from tollway.jsontypes import JSON
from tollway.keyspace import response_cache_key

log = logging.getLogger("tollway.routing.cache")

_IGNORED = frozenset({"stream", "stream_options", "user", "metadata"})


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    payload: JSON  # a chat.completion object
    model: str
    cost_usd: Decimal


def deterministic(data: JSON) -> bool:
    temperature = data.get("temperature")
    return data.get("seed") is not None or (isinstance(temperature, int | float) and temperature == 0)


def cache_key(tenant_id: int, data: JSON, versions: tuple[str | None, ...] = ()) -> str:
    """``versions``: what else shaped the answer (the prompt version, the collection's index version)."""
    canonical = orjson.dumps({k: v for k, v in data.items() if k not in _IGNORED}, option=orjson.OPT_SORT_KEYS)
    if any(versions):
        canonical += orjson.dumps(versions)
    return response_cache_key(tenant_id, hashlib.blake2b(canonical, digest_size=16).hexdigest())


class ResponseCache:
    def __init__(self, redis_client: aioredis.Redis, *, ttl_s: int, max_entry_bytes: int) -> None:
        self.redis = redis_client
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = await self.redis.get(key)
        except REDIS_FAULTS as exc:
            log.warning("response cache unavailable (%s); treating as a miss", exc)
            return None
        if raw is None:
            return None
        try:
            entry = orjson.loads(raw)
            return CachedAnswer(entry["payload"], entry["model"], Decimal(entry["cost_usd"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ArithmeticError):
            return None

    async def put(self, key: str, payload: JSON, model: str, cost_usd: Decimal) -> None:
        raw = orjson.dumps({"payload": payload, "model": model, "cost_usd": str(cost_usd)})
        if len(raw) > self.max_entry_bytes:
            return
        try:
            await self.redis.set(key, raw, ex=self.ttl_s)
        except REDIS_FAULTS as exc:
            log.warning("response cache unavailable (%s); answer not cached", exc)
