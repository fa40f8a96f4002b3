"""One way to open Redis, single node or Redis Cluster, for the gateway and the CLI.

Every key of a tenant carries the hash tag ``{t:ID}`` (``tollway.keyspace``), so each Lua script touches one
slot and runs unchanged on a cluster; pub/sub (the shared breakers) works on any node, since a cluster
broadcasts ``PUBLISH``. Which client: ``TOLLWAY_REDIS_CLUSTER`` (true / false), or, unset, what the server
says of itself at start-up (``INFO cluster``); a server that cannot be asked then is taken as one node, with
a warning, because the gateway must start through a Redis outage.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

log = logging.getLogger("tollway.redis")

# What a Redis call may raise when Redis (or a cluster node) is unreachable or changing. Not only RedisError and
# OSError: mid-failover, redis-py's cluster client has raised KeyError (a slot while it re-maps them) and
# AttributeError (a connection torn down under a command) from its own code. So each ``except REDIS_FAULTS``
# wraps one Redis call and nothing else, and every exception there means "Redis did not answer".
REDIS_FAULTS: tuple[type[Exception], ...] = (Exception,)

TIMEOUT_S = 2.0
# A cluster client keeps a pool per node and raises, instead of waiting, when one is exhausted: each node's
# pool is sized well above the single-node pool, whose callers wait for a free connection.
CLUSTER_POOL_FACTOR = 4


def single_node(url: str, max_connections: int) -> aioredis.Redis:
    """A pool that makes callers wait for a free connection (redis-py's default pool raises instead,
    which under load would read as "Redis is down")."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=TIMEOUT_S,
                                                    socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    return aioredis.Redis(connection_pool=pool)


def cluster(url: str, max_connections: int) -> aioredis.Redis:
    """redis-py's cluster client: it learns the slots from any node in ``url``, follows MOVED/ASK and a
    failover (a command to a dead master fails, the next one goes to its promoted replica). Typed as the
    single-node client, whose commands it shares: the gateway uses only commands both have."""
    client = RedisCluster.from_url(url, max_connections=max_connections * CLUSTER_POOL_FACTOR,
                                   socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                   require_full_coverage=False)
    return cast(aioredis.Redis, client)


async def _info(url: str, section: str) -> dict[str, Any] | None:
    """One INFO section of the server at ``url`` (allowed on managed services where CONFIG is not), or None
    when it cannot be asked."""
    probe = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    try:
        return dict(await probe.info(section))
    except (RedisError, OSError):
        return None
    finally:
        await probe.aclose()


async def is_cluster(url: str) -> bool | None:
    """Whether the server at ``url`` runs in cluster mode; None when it cannot be asked."""
    info = await _info(url, "cluster")
    return None if info is None else bool(info.get("cluster_enabled"))


async def eviction_risk(url: str) -> str | None:
    """Why Redis may drop budget state on its own, or None: with a memory limit and an eviction policy other
    than noeviction (managed Redis often defaults to volatile-lru), a full Redis evicts keys, and budget
    counters, leases and breaker state carry TTLs like the response cache's entries beside them, so a tenant
    filling the cache could evict another tenant's counters; until the next reconciliation they count from
    zero."""
    info = await _info(url, "memory")
    if info is None:
        return None
    policy, limit = str(info.get("maxmemory_policy", "noeviction")), int(info.get("maxmemory") or 0)
    if limit == 0 or policy == "noeviction":
        return None
    return (f"Redis evicts keys when full (maxmemory {limit} bytes, maxmemory-policy {policy}): budget counters "
            "and leases may be evicted with the response cache, and a budget then counts from zero until the next "
            "reconciliation; set maxmemory-policy noeviction (docs/reference/production.md)")


async def connect(url: str, max_connections: int = 64, cluster_mode: bool | None = None) -> aioredis.Redis:
    """The client for ``url``: ``cluster_mode`` None asks the server."""
    if cluster_mode is None:
        found = await is_cluster(url)
        if found is None:
            log.warning("Redis at %s did not answer at start-up; taken as a single node (set "
                        "TOLLWAY_REDIS_CLUSTER=true if it is a cluster)", url.split("@")[-1])
        cluster_mode = bool(found)
    if cluster_mode:
        log.info("Redis Cluster client for %s", url.split("@")[-1])
        return cluster(url, max_connections)
    return single_node(url, max_connections)
