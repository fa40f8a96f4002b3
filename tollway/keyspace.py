"""The Redis key layout, in one place: budget counters, rate limits, leases, breakers (gateway/quota) and
the response cache (routing/cache). Every key of a tenant carries the hash tag ``{t:ID}``, so one Lua
script touches one Redis Cluster slot."""

from __future__ import annotations

import hashlib

VELOCITY_BUCKET_S = 10
BREAKER_CHANNEL = "tw:breakers"  # pub/sub: an upstream's breaker opened in one gateway process (routing.shared)
VELOCITY_BUCKETS = 6  # one minute


def tenant_tag(tenant_id: int) -> str:
    return f"tw:{{t:{tenant_id}}}"


def subject_key(subject: str) -> str:
    """End users and sessions appear in keys hashed (they are the client's strings)."""
    return hashlib.blake2s(subject.encode(), digest_size=10).hexdigest()


def budget_prefix(tenant_id: int, budget_id: int) -> str:
    """Every counter of one budget (each subject, each window) starts with this."""
    return f"{tenant_tag(tenant_id)}:b:{budget_id}:"


def rate_key(tenant_id: int, scope: str, window_label: str) -> str:
    """``scope``: 'tenant', or 'key:ID'."""
    return f"{tenant_tag(tenant_id)}:rl:{scope}:{window_label}"


def parallel_key(tenant_id: int, scope: str) -> str:
    """The requests in flight of a tenant ('tenant') or one of its keys ('key:ID'): reservations only, which
    settling gives back and never counts as spent (the ``:held`` ending says so to the scripts)."""
    return f"{tenant_tag(tenant_id)}:par:{scope}:held"


def storm_key(tenant_id: int, fingerprint: str) -> str:
    return f"{tenant_tag(tenant_id)}:storm:{fingerprint}"


def lease_keys(tenant_id: int) -> list[str]:
    """The tenant's leases: a sorted set of request ids by expiry, a hash of what each reserved where, a hash
    of each one's ledger fields; requests awaiting a ledger row (orphans) and those whose row the sweeper
    wrote (gone), by request id."""
    tag = tenant_tag(tenant_id)
    return [f"{tag}:leases", f"{tag}:lease", f"{tag}:lmeta", f"{tag}:orphans", f"{tag}:gone"]


SWEEPER_LOCK = "tw:sweeper"  # the one gateway process that sweeps this interval


def velocity_keys(tenant_id: int, now_s: float) -> list[str]:
    """velocity-over, the buckets (newest first), velocity-held (the worst case of requests in flight)."""
    tag = tenant_tag(tenant_id)
    bucket = int(now_s // VELOCITY_BUCKET_S)
    return [f"{tag}:vel:over", *(f"{tag}:vel:{bucket - i}" for i in range(VELOCITY_BUCKETS)), f"{tag}:vel:held"]


def response_cache_key(tenant_id: int, digest: str) -> str:
    return f"{tenant_tag(tenant_id)}:rc:{digest}"
