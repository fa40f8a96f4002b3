"""Hard budgets, rate limits and economic circuit breakers, enforced in Redis.

Admission is one Lua script, atomic over every counter that applies to the request (tenant, key, end
user and session budgets in each window, tenant and key rate limits), plus the retry-storm and
spend-velocity checks: either the worst case fits in all of them and is reserved in all of them, or
nothing is reserved and the request is refused before anything is sent upstream.

A reservation is a lease: it carries an expiry, renewed while the request runs. Every script first
drops expired leases, so a gateway killed mid-request (SIGKILL) leaves budget locked for at most the
lease time. Settlement replaces the lease by what the upstream actually used.

Amounts are integers: USD in nano-dollars (rounded up), tokens, requests. Keys share a hash tag per
tenant (``{t:ID}``), so one script touches one Redis Cluster slot.

When Redis fails, the tenant's policy decides: ``closed`` (default) refuses with 503 and spends
nothing; ``open`` admits against conservative local counters (a share of the headroom last seen in
Redis); the reconciliation job later rewrites Redis from the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tollway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from tollway.gateway.keys import Principal
from tollway.gateway.policy import EACH, Budget, TenantRules

log = logging.getLogger("tollway.quota")

NANO = Decimal(10**9)
NO_LIMIT = -1
USD, TOK, REQ = 0, 1, 2
DIM_NAMES = ("usd", "tokens", "requests")
VELOCITY_BUCKET_S = 10
VELOCITY_BUCKETS = 6  # one minute

# KEYS: storm, velocity-over, velocity buckets (newest first) x6, then (hash, leases, amounts) per counter
# ARGV: now_ms, lease_ms, rid, storm_limit, storm_window_s, velocity_hard_nano, n, then per counter:
#       lim_usd, lim_tok, lim_req, amt_usd, amt_tok, amt_req, ttl_s
RESERVE = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local rid = ARGV[3]
local storm_limit = tonumber(ARGV[4])
local vel_hard = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
if storm_limit > 0 then
  local seen = redis.call('HINCRBY', KEYS[1], 'n', 1)
  if seen == 1 then
    redis.call('HSET', KEYS[1], 'first', now)
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  end
  if seen > storm_limit then
    return {2, redis.call('PTTL', KEYS[1]), tonumber(redis.call('HGET', KEYS[1], 'first')), seen}
  end
end
local velocity = 0
for b = 3, 8 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
if vel_hard >= 0 and velocity > vel_hard then
  local since = tonumber(redis.call('GET', KEYS[2])) or now
  local first = redis.call('SET', KEYS[2] .. ':refused', 1, 'NX', 'EX', 60) and 1 or 0
  return {3, velocity, since, first}
end
local function purge(h, z, a)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(expired) do
    local amt = redis.call('HGET', a, id)
    if amt then
      local u, t, r = string.match(amt, '(%d+):(%d+):(%d+)')
      redis.call('HINCRBY', h, 'r_usd', -tonumber(u))
      redis.call('HINCRBY', h, 'r_tok', -tonumber(t))
      redis.call('HINCRBY', h, 'r_req', -tonumber(r))
      redis.call('HDEL', a, id)
    end
    redis.call('ZREM', z, id)
  end
end
local used = {}
for i = 0, n - 1 do
  local h, z, a = KEYS[9 + 3 * i], KEYS[10 + 3 * i], KEYS[11 + 3 * i]
  purge(h, z, a)
  local v = redis.call('HMGET', h, 's_usd', 's_tok', 's_req', 'r_usd', 'r_tok', 'r_req')
  for d = 1, 3 do
    local lim = tonumber(ARGV[7 + 7 * i + d])
    local amt = tonumber(ARGV[10 + 7 * i + d])
    local u = (tonumber(v[d]) or 0) + (tonumber(v[d + 3]) or 0)
    if lim >= 0 and u + amt > lim then
      return {0, i, d - 1, u, lim}
    end
    used[3 * i + d] = u + amt
  end
end
for i = 0, n - 1 do
  local h, z, a = KEYS[9 + 3 * i], KEYS[10 + 3 * i], KEYS[11 + 3 * i]
  local base = 7 + 7 * i
  local u, t, r = ARGV[base + 4], ARGV[base + 5], ARGV[base + 6]
  redis.call('HINCRBY', h, 'r_usd', u)
  redis.call('HINCRBY', h, 'r_tok', t)
  redis.call('HINCRBY', h, 'r_req', r)
  redis.call('ZADD', z, now + lease, rid)
  redis.call('HSET', a, rid, u .. ':' .. t .. ':' .. r)
  local ttl = tonumber(ARGV[base + 7])
  if ttl > 0 then
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', z, ttl)
    redis.call('EXPIRE', a, ttl)
  end
end
local out = {1, velocity}
for k = 1, 3 * n do out[#out + 1] = used[k] end
return out
"""

# KEYS: velocity-over, velocity bucket (current), velocity buckets x6, then (hash, leases, amounts) per counter
# ARGV: rid, now_ms, velocity_hard_nano, n, then per counter: usd, tok, req, ttl_s
SETTLE = """
local rid = ARGV[1]
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local h, z, a = KEYS[9 + 3 * i], KEYS[10 + 3 * i], KEYS[11 + 3 * i]
  local amt = redis.call('HGET', a, rid)
  if amt then
    local u, t, r = string.match(amt, '(%d+):(%d+):(%d+)')
    redis.call('HINCRBY', h, 'r_usd', -tonumber(u))
    redis.call('HINCRBY', h, 'r_tok', -tonumber(t))
    redis.call('HINCRBY', h, 'r_req', -tonumber(r))
    redis.call('HDEL', a, rid)
    redis.call('ZREM', z, rid)
  end
  local base = 4 + 4 * i
  redis.call('HINCRBY', h, 's_usd', ARGV[base + 1])
  redis.call('HINCRBY', h, 's_tok', ARGV[base + 2])
  redis.call('HINCRBY', h, 's_req', ARGV[base + 3])
  local ttl = tonumber(ARGV[base + 4])
  if ttl > 0 then redis.call('EXPIRE', h, ttl) end
end
local spent = tonumber(ARGV[5 + 4 * n]) or 0
if spent > 0 then
  redis.call('INCRBY', KEYS[2], spent)
  redis.call('EXPIRE', KEYS[2], 90)
end
local vel_hard = tonumber(ARGV[3])
if vel_hard >= 0 then
  local velocity = 0
  for b = 3, 8 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
  if velocity > vel_hard then redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', 120) end
end
return 1
"""

RENEW = """
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], 'XX', ARGV[1], ARGV[2]) end
return 1
"""


def to_nano(usd: Decimal) -> int:
    return math.ceil(usd * NANO)


def from_nano(nano: int) -> Decimal:
    return Decimal(nano) / NANO


@dataclass(frozen=True, slots=True)
class Window:
    label: str
    start: datetime | None
    end: datetime | None
    ttl_s: int  # how long the counter outlives now (0: forever)


def window(period: str, now: datetime) -> Window:
    if period == "lifetime":
        return Window("all", None, None, 0)
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    elif period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Counters stay an hour past their window, for reconciliation and inspection.
    return Window(start.strftime("%Y%m%dT%H%M"), start, end, int((end - now).total_seconds()) + 3600)


def _subject_key(subject: str) -> str:
    return hashlib.blake2s(subject.encode(), digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    limits: tuple[int, int, int]
    ttl_s: int
    reset_at: datetime | None
    budget: Budget | None = None  # None: a rate limit
    rate_scope: str = ""  # "tenant" or "key" for rate limits

    @property
    def keys(self) -> tuple[str, str, str]:
        return self.key, self.key + ":l", self.key + ":a"


@dataclass(slots=True)
class Demand:
    usd_nano: int
    tokens: int
    requests: int = 1

    def amounts(self, counter: Counter) -> tuple[int, int, int]:
        # Rate limits count requests and tokens only; budgets count USD and tokens.
        if counter.budget is None:
            return 0, self.tokens, self.requests
        return self.usd_nano, self.tokens, self.requests


@dataclass(slots=True)
class Admission:
    reservation: Reservation
    headers: dict[str, str]
    step_down: bool  # above the tenant's spend-velocity soft line: the router should go a tier cheaper


def _tenant_tag(tenant_id: int) -> str:
    return f"tw:{{t:{tenant_id}}}"


def budget_counter(budget: Budget, subject: str, now: datetime) -> Counter:
    """The Redis counter of one budget for one subject ('' for the tenant, a key id, a user or session id)."""
    win = window(budget.period, now)
    limits = (NO_LIMIT if budget.limit_usd is None else to_nano(budget.limit_usd),
              NO_LIMIT if budget.limit_tokens is None else budget.limit_tokens, NO_LIMIT)
    hashed = subject if budget.scope in ("tenant", "key") else _subject_key(subject)
    return Counter(f"{_tenant_tag(budget.tenant_id)}:b:{budget.id}:{hashed}:{win.label}", limits, win.ttl_s,
                   win.end, budget)


def counters_for(principal: Principal, rules: TenantRules, *, end_user: str | None, session: str | None,
                 now: datetime) -> list[Counter]:
    tag = _tenant_tag(principal.tenant_id)
    out: list[Counter] = []
    for budget in rules.budgets:
        if budget.scope == "tenant":
            subject = ""
        elif budget.scope == "key":
            if budget.subject not in (EACH, str(principal.key_id)):
                continue
            subject = str(principal.key_id)
        else:
            value = end_user if budget.scope == "user" else session
            if value is None or budget.subject not in (EACH, value):
                continue
            subject = value
        out.append(budget_counter(budget, subject, now))
    minute = window("minute", now)
    policy = rules.policy
    if policy.rpm or policy.tpm:
        out.append(Counter(f"{tag}:rl:tenant:{minute.label}", (NO_LIMIT, policy.tpm or NO_LIMIT,
                                                                 policy.rpm or NO_LIMIT),
                           minute.ttl_s, minute.end, rate_scope="tenant"))
    if principal.rpm or principal.tpm:
        out.append(Counter(f"{tag}:rl:key:{principal.key_id}:{minute.label}",
                           (NO_LIMIT, principal.tpm or NO_LIMIT, principal.rpm or NO_LIMIT),
                           minute.ttl_s, minute.end, rate_scope="key"))
    return out


def _velocity_keys(tenant_id: int, now_s: float) -> list[str]:
    tag = _tenant_tag(tenant_id)
    bucket = int(now_s // VELOCITY_BUCKET_S)
    return [f"{tag}:vel:over"] + [f"{tag}:vel:{bucket - i}" for i in range(VELOCITY_BUCKETS)]


class Reservation:
    """What one request holds in Redis until it settles (or its lease runs out)."""

    def __init__(self, quota: QuotaService, rid: str, tenant_id: int, counters: list[Counter], demand: Demand,
                 velocity_hard_nano: int, local: bool) -> None:
        self.quota = quota
        self.rid = rid
        self.tenant_id = tenant_id
        self.counters = counters
        self.demand = demand
        self.velocity_hard_nano = velocity_hard_nano
        self.local = local
        self.settled = False
        self._renewal: asyncio.TimerHandle | None = None
        if counters and not local:
            self._schedule_renewal()

    def _schedule_renewal(self) -> None:
        loop = asyncio.get_running_loop()
        self._renewal = loop.call_later(self.quota.lease_s / 3, lambda: self.quota.track(self._renew()))

    async def _renew(self) -> None:
        if self.settled:
            return
        expiry = int(time.time() * 1000 + self.quota.lease_s * 1000)
        try:
            await self.quota.renew_script(keys=["_", *(c.key + ":l" for c in self.counters)],
                                          args=[expiry, self.rid])
        except RedisError as exc:
            log.warning("lease renewal failed for %s: %s", self.rid, exc)
        if not self.settled:
            self._schedule_renewal()

    async def settle(self, cost_usd: Decimal, tokens: int) -> None:
        if self.settled:
            return
        self.settled = True
        if self._renewal is not None:
            self._renewal.cancel()
        await self.quota.settle(self, to_nano(cost_usd), tokens)


class LocalCounters:
    """Fail-open fallback: per-counter usage kept in this process while Redis is unreachable."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.last_seen: dict[str, list[int]] = {}
        self.local: dict[str, list[int]] = {}

    def remember(self, counter: Counter, used: Sequence[int]) -> None:
        self.last_seen[counter.key] = list(used)
        self.local.pop(counter.key, None)

    def admit(self, counters: list[Counter], demand: Demand) -> Counter | None:
        for counter in counters:
            seen = self.last_seen.get(counter.key)
            mine = self.local.get(counter.key, [0, 0, 0])
            for dim, limit in enumerate(counter.limits):
                if limit < 0:
                    continue
                base = seen[dim] if seen is not None else limit // 2  # unknown: assume half used
                allowance = max(0, limit - base) * self.share
                if mine[dim] + demand.amounts(counter)[dim] > allowance:
                    return counter
        for counter in counters:
            mine = self.local.setdefault(counter.key, [0, 0, 0])
            for dim, amount in enumerate(demand.amounts(counter)):
                mine[dim] += amount
        return None


class QuotaService:
    def __init__(self, redis_client: aioredis.Redis, *, lease_s: float, fail_open_share: float,
                 clock: Callable[[], datetime] | None = None, on_trip: Callable[..., None] | None = None) -> None:
        self.redis = redis_client
        self.lease_s = lease_s
        self.clock = clock or (lambda: datetime.now(UTC))
        self.local = LocalCounters(fail_open_share)
        self.reserve_script = redis_client.register_script(RESERVE)
        self.settle_script = redis_client.register_script(SETTLE)
        self.renew_script = redis_client.register_script(RENEW)
        self.on_trip = on_trip or (lambda **_: None)
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def admit(self, principal: Principal, rules: TenantRules, *, rid: str, end_user: str | None,
                    session: str | None, fingerprint: str, demand: Demand) -> Admission:
        now = self.clock()
        counters = counters_for(principal, rules, end_user=end_user, session=session, now=now)
        policy = rules.policy
        hard = NO_LIMIT if policy.velocity_hard_usd_per_min is None else to_nano(policy.velocity_hard_usd_per_min)
        now_s = now.timestamp()
        keys = [f"{_tenant_tag(principal.tenant_id)}:storm:{fingerprint}", *_velocity_keys(principal.tenant_id, now_s)]
        args: list[Any] = [int(now_s * 1000), int(self.lease_s * 1000), rid, policy.retry_storm_limit,
                           policy.retry_storm_window_s, hard, len(counters)]
        for counter in counters:
            keys.extend(counter.keys)
            args.extend([*counter.limits, *demand.amounts(counter), counter.ttl_s])
        try:
            reply = await self.reserve_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            return self._admit_without_redis(principal, rules, rid, counters, demand, hard, exc)
        status = int(reply[0])
        if status == 2:
            retry_after = max(1, math.ceil(int(reply[1]) / 1000))
            if int(reply[3]) == policy.retry_storm_limit + 1:
                self.on_trip(kind="retry_storm", tenant_id=principal.tenant_id, first_offense_ms=int(reply[2]),
                             contained_ms=int(now_s * 1000), detail={"fingerprint": fingerprint,
                                                                     "limit": policy.retry_storm_limit})
            raise RateLimited(f"The same request was sent {int(reply[3])} times in {policy.retry_storm_window_s}s; "
                              "refusing the retry storm.", code="retry_storm", retry_after=retry_after)
        if status == 3:
            if int(reply[3]) == 1:
                self.on_trip(kind="spend_velocity", tenant_id=principal.tenant_id,
                             first_offense_ms=int(reply[2]), contained_ms=int(now_s * 1000),
                             detail={"usd_per_min": str(from_nano(int(reply[1]))),
                                     "hard_usd_per_min": str(policy.velocity_hard_usd_per_min)})
            raise RateLimited(f"Spend velocity ${from_nano(int(reply[1])):.4f}/min is above this tenant's ceiling "
                              f"of ${policy.velocity_hard_usd_per_min}/min.", code="spend_velocity_exceeded",
                              retry_after=VELOCITY_BUCKET_S * VELOCITY_BUCKETS)
        if status == 0:
            raise self._refusal(principal, counters[int(reply[1])], int(reply[2]), int(reply[3]), int(reply[4]),
                                demand, now)
        velocity = int(reply[1])
        used = [int(v) for v in reply[2:]]
        for i, counter in enumerate(counters):
            self.local.remember(counter, used[3 * i: 3 * i + 3])
        reservation = Reservation(self, rid, principal.tenant_id, counters, demand, hard, local=False)
        soft = policy.velocity_soft_usd_per_min
        return Admission(reservation, _headers(counters, used, now),
                         step_down=soft is not None and velocity > to_nano(soft))

    def _admit_without_redis(self, principal: Principal, rules: TenantRules, rid: str, counters: list[Counter],
                             demand: Demand, hard: int, exc: Exception) -> Admission:
        if rules.policy.redis_failure != "open":
            raise ServiceUnavailable("Budgets cannot be checked right now (Redis is unreachable); "
                                     "nothing was spent.", code="quota_unavailable") from exc
        log.warning("redis unreachable (%s); tenant %s fails open on local counters", exc, principal.tenant_id)
        refused = self.local.admit(counters, demand)
        if refused is not None:
            raise QuotaExceeded(f"{_name(principal, refused)} has no local headroom left while budgets "
                                "cannot be checked centrally.", code="insufficient_quota") from exc
        return Admission(Reservation(self, rid, principal.tenant_id, counters, demand, hard, local=True),
                         {"x-tollway-budget-mode": "local"}, step_down=True)

    def _refusal(self, principal: Principal, counter: Counter, dim: int, used: int, limit: int, demand: Demand,
                 now: datetime) -> Exception:
        retry_after = None if counter.reset_at is None else max(1, math.ceil((counter.reset_at - now).total_seconds()))
        if counter.budget is None:
            what = "requests" if dim == REQ else "tokens"
            return RateLimited(f"Rate limit reached for {counter.rate_scope} {what} per minute: limit {limit}, "
                               f"used {used}, requested {demand.amounts(counter)[dim]}.",
                               code="rate_limit_exceeded", retry_after=retry_after)
        if dim == USD:
            amounts = f"limit ${from_nano(limit):f}, used ${from_nano(used):f}, this request up to " \
                      f"${from_nano(demand.usd_nano):f}"
        else:
            amounts = f"limit {limit} tokens, used {used}, this request up to {demand.tokens}"
        return QuotaExceeded(f"This request would exceed {_name(principal, counter)} ({amounts}).",
                             retry_after=retry_after)

    async def settle(self, reservation: Reservation, usd_nano: int, tokens: int) -> None:
        if reservation.local:
            return  # counted locally at admission; the reconciliation job restores Redis from the ledger
        now_s = self.clock().timestamp()
        vel = _velocity_keys(reservation.tenant_id, now_s)
        keys = [vel[0], vel[1], *vel[1:]]
        args: list[Any] = [reservation.rid, int(now_s * 1000), reservation.velocity_hard_nano,
                           len(reservation.counters)]
        for counter in reservation.counters:
            keys.extend(counter.keys)
            amounts = (usd_nano, tokens, reservation.demand.requests) if counter.budget is not None \
                else (0, tokens, reservation.demand.requests)
            args.extend([*amounts, counter.ttl_s])
        args.append(usd_nano)
        try:
            await self.settle_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # The lease expires on its own; the ledger has the truth and reconciliation restores it.
            log.warning("settlement of %s failed (%s); reconciliation will correct the counters",
                        reservation.rid, exc)


def _name(principal: Principal, counter: Counter) -> str:
    assert counter.budget is not None
    return counter.budget.describe(principal.tenant)


def _headers(counters: list[Counter], used: list[int], now: datetime) -> dict[str, str]:
    headers: dict[str, str] = {}
    tightest: Decimal | None = None
    for i, counter in enumerate(counters):
        if counter.budget is not None:
            if counter.limits[USD] >= 0:
                left = from_nano(max(0, counter.limits[USD] - used[3 * i + USD]))
                tightest = left if tightest is None else min(tightest, left)
            continue
        reset = "0s" if counter.reset_at is None else f"{max(0, (counter.reset_at - now).total_seconds()):.0f}s"
        for dim, word in ((REQ, "requests"), (TOK, "tokens")):
            limit = counter.limits[dim]
            if limit < 0 or (f"x-ratelimit-limit-{word}" in headers and counter.rate_scope == "tenant"):
                continue
            headers[f"x-ratelimit-limit-{word}"] = str(limit)
            headers[f"x-ratelimit-remaining-{word}"] = str(max(0, limit - used[3 * i + dim]))
            headers[f"x-ratelimit-reset-{word}"] = reset
    if tightest is not None:
        headers["x-tollway-budget-remaining"] = f"{tightest:.6f}"
    return headers


def fingerprint(tenant_id: int, body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12, key=str(tenant_id).encode()).hexdigest()


def new_rid() -> str:
    return os.urandom(8).hex()
