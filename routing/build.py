"""Building the router from the catalog and the upstream clients (called by the composition root)."""

from __future__ import annotations

import redis.asyncio as aioredis

from tollway.routing.cache import ResponseCache
from tollway.routing.catalog import Catalog
from tollway.routing.fallback import Caller, RetryBudget
from tollway.routing.health import Health
from tollway.routing.router import Router
from tollway.routing.upstream import Upstream


def build_router(catalog: Catalog, upstreams: dict[str, Upstream], redis_client: aioredis.Redis) -> Router:
    config = catalog.routing
    health = Health(upstreams, config.breaker, config.saturation)
    caller = Caller(upstreams, health, RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s),
                    max_attempts=config.max_attempts, balance=config.balance)
    cache = ResponseCache(redis_client, ttl_s=config.cache.ttl_s, max_entry_bytes=config.cache.max_entry_bytes) \
        if config.cache.enabled else None
    return Router(catalog=catalog, caller=caller, health=health, cache=cache)
