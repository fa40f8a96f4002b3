"""Hard budgets, rate limits and economic circuit breakers, enforced in Redis.

Admission is one Lua script, atomic over every counter that applies to the request (tenant, key, end
user and session budgets in each window, tenant and key rate limits), plus the retry-storm and
spend-velocity checks: either the worst case fits in all of them and is reserved in all of them, or
nothing is reserved and the request is refused before anything is sent upstream.

A reservation is a lease: it carries an expiry, renewed while the request runs. Leases are kept per
tenant (a sorted set by expiry and a hash of what each one reserved where); every admission first
gives back the tenant's expired leases, so a gateway killed mid-request (SIGKILL) leaves budget locked
for at most the lease time. Settlement replaces the lease by what the upstream actually used; it runs
after the answer has been sent.

Amounts are integers: USD in nano-dollars (rounded up), tokens, requests. Keys share a hash tag per
tenant (``{t:ID}``), so one script touches one Redis Cluster slot.

When Redis fails, the tenant's policy decides: ``closed`` (default) refuses with 503 and spends
nothing; ``open`` admits against conservative local counters (a share of the headroom last seen in
Redis); the reconciliation job later raises the Redis counters to what the ledger recorded.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tollway.background import Background
from tollway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from tollway.gateway.keys import Principal
from tollway.gateway.tenant_policy import EACH, Budget, TenantRules

log = logging.getLogger("tollway.quota")

NANO = Decimal(10**9)
NO_LIMIT = -1
USD, TOK, REQ = 0, 1, 2
DIM_NAMES = ("usd", "tokens", "requests")
VELOCITY_BUCKET_S = 10
VELOCITY_BUCKETS = 6  # one minute

# Counter hashes hold settled amounts (s_usd, s_tok, s_req) and one field r = "usd:tok:req" reserved.
# Leases are per tenant: a sorted set of request ids by expiry, and a hash from request id to what it
# reserved where ("key,usd,tok,req;key,usd,tok,req"). Purging or settling a lease gives that back.
_LEASE_LIB = """
local function triple(s)
  if not s then return 0, 0, 0 end
  local a, b, c = string.match(s, '(%d+):(%d+):(%d+)')
  return tonumber(a), tonumber(b), tonumber(c)
end
local function release(rec)
  for key, u, t, r in string.gmatch(rec, '([^,;]+),(%d+),(%d+),(%d+)') do
    local cur = redis.call('HGET', key, 'r')
    if cur then
      local a, b, c = triple(cur)
      redis.call('HSET', key, 'r', string.format('%d:%d:%d', math.max(0, a - tonumber(u)),
        math.max(0, b - tonumber(t)), math.max(0, c - tonumber(r))))
    end
  end
end
"""

# KEYS: storm, leases zset, leases hash, one counter hash per counter, then (only when velocity is
#       watched) velocity-over, the velocity buckets, newest first, x6, and velocity-held
# ARGV: now_ms, lease_ms, rid, storm_limit, storm_window_s, velocity (-2: not watched, -1: read only,
#       >= 0: the hard line in nano-USD/min), n, then per counter:
#       lim_usd, lim_tok, lim_req, amt_usd, amt_tok, amt_req, ttl_s; then this request's worst-case USD
# Under a hard line, the worst case of every request in flight (velocity-held, a lease like any other
# reservation) counts toward the velocity: the ceiling holds to within one request's cost.
RESERVE = _LEASE_LIB + """
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
local held_key = nil
if vel_hard >= 0 then held_key = KEYS[4 + n + 7] end
if n == 0 and not held_key then
  if vel_hard == -1 then
    local velocity = 0
    for b = 5, 10 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
    return {1, velocity}
  end
  return {1, 0}
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #expired > 0 then
  for _, id in ipairs(expired) do
    local rec = redis.call('HGET', KEYS[3], id)
    if rec then release(rec) end
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local velocity = 0
if vel_hard >= -1 then
  local over = 4 + n
  for b = over + 1, over + 6 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
  if held_key then
    local in_flight = triple(redis.call('HGET', held_key, 'r'))
    if velocity + in_flight > vel_hard then
      local since = tonumber(redis.call('GET', KEYS[over])) or now
      local first = redis.call('SET', KEYS[over] .. ':refused', 1, 'NX', 'EX', 60) and 1 or 0
      return {3, velocity + in_flight, since, first}
    end
  end
end
local used = {}
local fresh = {}
local held = {}
for i = 0, n - 1 do
  local v = redis.call('HMGET', KEYS[4 + i], 's_usd', 's_tok', 's_req', 'r')
  fresh[i] = not (v[1] or v[2] or v[3] or v[4])
  local ru, rt, rr = triple(v[4])
  local reserved = {ru, rt, rr}
  held[i] = reserved
  for d = 1, 3 do
    local lim = tonumber(ARGV[7 + 7 * i + d])
    local amt = tonumber(ARGV[10 + 7 * i + d])
    local u = (tonumber(v[d]) or 0) + reserved[d]
    if lim >= 0 and u + amt > lim then
      return {0, i, d - 1, u, lim}
    end
    used[3 * i + d] = u
  end
end
local rec = {}
local out = {1, velocity}
for i = 0, n - 1 do
  local base = 7 + 7 * i
  local key = KEYS[4 + i]
  local u, t, r = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  local a, b, c = held[i][1], held[i][2], held[i][3]
  redis.call('HSET', key, 'r', string.format('%d:%d:%d', a + u, b + t, c + r))
  local ttl = tonumber(ARGV[base + 7])
  if fresh[i] and ttl > 0 then redis.call('EXPIRE', key, ttl) end
  rec[#rec + 1] = string.format('%s,%d,%d,%d', key, u, t, r)
  out[#out + 1] = used[3 * i + 1] + u
  out[#out + 1] = used[3 * i + 2] + t
  out[#out + 1] = used[3 * i + 3] + r
end
if held_key then
  local worst = tonumber(ARGV[8 + 7 * n])
  local a = triple(redis.call('HGET', held_key, 'r'))
  redis.call('HSET', held_key, 'r', string.format('%d:0:0', a + worst))
  redis.call('PEXPIRE', held_key, lease * 4)
  rec[#rec + 1] = string.format('%s,%d,0,0', held_key, worst)
end
redis.call('ZADD', KEYS[2], now + lease, rid)
redis.call('HSET', KEYS[3], rid, table.concat(rec, ';'))
redis.call('PEXPIRE', KEYS[2], lease * 4)
redis.call('PEXPIRE', KEYS[3], lease * 4)
return out
"""

# KEYS: leases zset, leases hash, one counter hash per counter, then (only when velocity is watched)
#       velocity-over and the velocity buckets, newest (current) first, x6
# ARGV: rid, now_ms, velocity (as in RESERVE), n, then per counter: usd, tok, req, ttl_s; then spent usd
SETTLE = _LEASE_LIB + """
local rid = ARGV[1]
local n = tonumber(ARGV[4])
local rec = redis.call('HGET', KEYS[2], rid)
if rec then
  release(rec)
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[1], rid)
end
for i = 0, n - 1 do
  local key = KEYS[3 + i]
  local base = 4 + 4 * i
  for d, field in ipairs({'s_usd', 's_tok', 's_req'}) do
    local amt = tonumber(ARGV[base + d])
    if amt > 0 then redis.call('HINCRBY', key, field, amt) end
  end
  local ttl = tonumber(ARGV[base + 4])
  if ttl > 0 and redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ttl) end
end
local vel_hard = tonumber(ARGV[3])
local spent = tonumber(ARGV[5 + 4 * n]) or 0
local over = 3 + n
if vel_hard >= -1 and spent > 0 then
  redis.call('INCRBY', KEYS[over + 1], spent)
  redis.call('EXPIRE', KEYS[over + 1], 90)
end
if vel_hard >= 0 then
  local velocity = 0
  for b = over + 1, over + 6 do velocity = velocity + (tonumber(redis.call('GET', KEYS[b])) or 0) end
  if velocity > vel_hard then redis.call('SET', KEYS[over], ARGV[2], 'NX', 'EX', 120) end
end
return 1
"""

RENEW = """
return redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
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

    def bounds(self) -> tuple[datetime, datetime]:
        """[start, end) for queries; a lifetime window spans all time."""
        return (self.start or datetime.min.replace(tzinfo=UTC), self.end or datetime.max.replace(tzinfo=UTC))


def window(period: str, now: datetime) -> Window:
    if period == "lifetime":
        return Window("all", None, None, 0)
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
    elif period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"unknown period {period!r}")
    label, end = _span(period, start)
    # Counters stay an hour past their window, for reconciliation and inspection.
    return Window(label, start, end, int((end - now).total_seconds()) + 3600)


@functools.lru_cache(maxsize=64)
def _span(period: str, start: datetime) -> tuple[str, datetime]:
    """A window's label and end: the same for every request in it (formatting costs more than the rest)."""
    if period == "minute":
        end = start + timedelta(minutes=1)
    elif period == "hour":
        end = start + timedelta(hours=1)
    elif period == "day":
        end = start + timedelta(days=1)
    else:
        end = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y%m%dT%H%M"), end


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
    headroom: float | None = None  # the smallest share left of any budget that applies, after this reservation


def _tenant_tag(tenant_id: int) -> str:
    return f"tw:{{t:{tenant_id}}}"


def budget_counter(budget: Budget, subject: str, now: datetime) -> Counter:
    """The Redis counter of one budget for one subject ('' for the tenant, a key id, a user or session id)."""
    win = window(budget.period, now)
    limits = (NO_LIMIT if budget.limit_usd is None else to_nano(budget.limit_usd),
              NO_LIMIT if budget.limit_tokens is None else budget.limit_tokens, NO_LIMIT)
    hashed = subject if budget.scope in ("tenant", "key") else _subject_key(subject)
    return Counter(f"{_budget_prefix(budget)}{hashed}:{win.label}", limits, win.ttl_s, win.end, budget)


def _budget_prefix(budget: Budget) -> str:
    """Every counter of one budget (each subject, each window) starts with this."""
    return f"{_tenant_tag(budget.tenant_id)}:b:{budget.id}:"


async def clear_counters(redis_client: aioredis.Redis, budgets: Sequence[Budget]) -> int:
    """Delete every Redis counter of these budgets (a reset); the number deleted."""
    cleared = 0
    for budget in budgets:
        async for key in redis_client.scan_iter(match=_budget_prefix(budget) + "*", count=500):
            cleared += int(await redis_client.delete(key))
    return cleared


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
    """velocity-over, the buckets (newest first), velocity-held (the worst case of requests in flight)."""
    tag = _tenant_tag(tenant_id)
    bucket = int(now_s // VELOCITY_BUCKET_S)
    return [f"{tag}:vel:over", *(f"{tag}:vel:{bucket - i}" for i in range(VELOCITY_BUCKETS)), f"{tag}:vel:held"]


def _lease_keys(tenant_id: int) -> list[str]:
    tag = _tenant_tag(tenant_id)
    return [f"{tag}:leases", f"{tag}:lease"]


class Reservation:
    """What one request holds in Redis until it settles (or its lease runs out)."""

    def __init__(self, quota: QuotaService, rid: str, tenant_id: int, counters: list[Counter], demand: Demand,
                 velocity: int, local: bool) -> None:
        self.quota = quota
        self.rid = rid
        self.tenant_id = tenant_id
        self.counters = counters
        self.demand = demand
        self.velocity = velocity  # -2: not watched, -1: watched without a hard line, >= 0: the hard line
        self.local = local
        self.settled = False
        self._renewal: asyncio.TimerHandle | None = None
        if (counters or velocity >= 0) and not local:  # a hard velocity line holds a lease too
            self._schedule_renewal()

    def _schedule_renewal(self) -> None:
        loop = asyncio.get_running_loop()
        self._renewal = loop.call_later(self.quota.lease_s / 3, lambda: self.quota.track(self._renew()))

    async def _renew(self) -> None:
        if self.settled:
            return
        expiry = int(time.time() * 1000 + self.quota.lease_s * 1000)
        try:
            await self.quota.renew_script(keys=_lease_keys(self.tenant_id)[:1], args=[expiry, self.rid])
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
        self.background = Background("budget settlement")  # settlements and lease renewals

    def track(self, work: Coroutine[Any, Any, None]) -> None:
        self.background.spawn(work)

    async def drain(self) -> None:
        await self.background.drain()

    async def admit(self, principal: Principal, rules: TenantRules, *, rid: str, end_user: str | None,
                    session: str | None, fingerprint: str, demand: Demand, count_storm: bool = True) -> Admission:
        """``count_storm=False``: a second try for the same request (a cheaper route after a refusal), which
        the retry-storm breaker has already counted."""
        now = self.clock()
        counters = counters_for(principal, rules, end_user=end_user, session=session, now=now)
        policy = rules.policy
        hard = NO_LIMIT if policy.velocity_hard_usd_per_min is None else to_nano(policy.velocity_hard_usd_per_min)
        now_s = now.timestamp()
        keys = [f"{_tenant_tag(principal.tenant_id)}:storm:{fingerprint}", *_lease_keys(principal.tenant_id)]
        watch = hard if hard != NO_LIMIT else (-1 if policy.velocity_soft_usd_per_min is not None else -2)
        args: list[Any] = [int(now_s * 1000), int(self.lease_s * 1000), rid,
                           policy.retry_storm_limit if count_storm else 0,
                           policy.retry_storm_window_s, watch, len(counters)]
        for counter in counters:
            keys.append(counter.key)
            args.extend([*counter.limits, *demand.amounts(counter), counter.ttl_s])
        if watch != -2:
            keys.extend(_velocity_keys(principal.tenant_id, now_s))
        args.append(demand.usd_nano)
        try:
            reply = await self.reserve_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            return self._admit_without_redis(principal, rules, rid, counters, demand, watch, exc)
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
        soft = policy.velocity_soft_usd_per_min
        reservation = Reservation(self, rid, principal.tenant_id, counters, demand, watch, local=False)
        return Admission(reservation, _headers(counters, used, now),
                         step_down=soft is not None and velocity > to_nano(soft), headroom=_headroom(counters, used))

    def _admit_without_redis(self, principal: Principal, rules: TenantRules, rid: str, counters: list[Counter],
                             demand: Demand, velocity: int, exc: Exception) -> Admission:
        if rules.policy.redis_failure != "open":
            raise ServiceUnavailable("Budgets cannot be checked right now (Redis is unreachable); "
                                     "nothing was spent.", code="quota_unavailable") from exc
        log.warning("redis unreachable (%s); tenant %s fails open on local counters", exc, principal.tenant_id)
        refused = self.local.admit(counters, demand)
        if refused is not None:
            raise QuotaExceeded(f"{_name(principal, refused)} has no local headroom left while budgets "
                                "cannot be checked centrally.", code="insufficient_quota") from exc
        return Admission(Reservation(self, rid, principal.tenant_id, counters, demand, velocity, local=True),
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
        if not reservation.counters and reservation.velocity == -2:
            return  # nothing was reserved and no velocity is watched: no round trip
        now_s = self.clock().timestamp()
        keys = _lease_keys(reservation.tenant_id)
        args: list[Any] = [reservation.rid, int(now_s * 1000), reservation.velocity, len(reservation.counters)]
        spent = Demand(usd_nano, tokens, reservation.demand.requests)
        for counter in reservation.counters:
            keys.append(counter.key)
            args.extend([*spent.amounts(counter), counter.ttl_s])
        args.append(usd_nano)
        if reservation.velocity != -2:
            keys.extend(_velocity_keys(reservation.tenant_id, now_s))
        try:
            await self.settle_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # The lease expires on its own; the ledger has the truth and reconciliation restores it.
            log.warning("settlement of %s failed (%s); reconciliation will correct the counters",
                        reservation.rid, exc)


def _name(principal: Principal, counter: Counter) -> str:
    assert counter.budget is not None
    return counter.budget.describe(principal.tenant)


def _headroom(counters: list[Counter], used: list[int]) -> float | None:
    shares = [max(0, limit - used[3 * i + dim]) / limit
              for i, counter in enumerate(counters) if counter.budget is not None
              for dim, limit in ((USD, counter.limits[USD]), (TOK, counter.limits[TOK])) if limit > 0]
    return min(shares) if shares else None


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
