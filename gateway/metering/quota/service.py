"""The quota service: admission (one atomic script over every counter, the retry-storm and velocity
breakers), reservations as renewable leases, settlement after the answer, fail-open where allowed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aioredis

from tollway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from tollway.gateway.metering.ledger import LedgerRow
from tollway.gateway.metering.quota.counters import (
    NO_LIMIT,
    REQ,
    USD,
    Counter,
    CounterLists,
    Demand,
    from_nano,
    to_nano,
)
from tollway.gateway.metering.quota.headers import headroom, rate_headers
from tollway.gateway.metering.quota.local import LocalCounters
from tollway.gateway.metering.quota.scripts import ACK, RENEW, RESERVE, SETTLE
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import TenantRules
from tollway.infra.background import Background
from tollway.infra.redisclient import REDIS_FAULTS
from tollway.infra.redisscripts import scripts_for
from tollway.keyspace import VELOCITY_BUCKET_S, VELOCITY_BUCKETS, lease_keys, storm_key, velocity_keys

log = logging.getLogger("tollway.quota")
AWAITING_MAX = 100_000


@dataclass(slots=True)
class Admission:
    reservation: Reservation
    headers: dict[str, str]
    step_down: bool  # above the tenant's spend-velocity soft line: the router should go a tier cheaper
    headroom: float | None = None  # the smallest share left of any budget that applies, after this reservation


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
            await self.quota.renew_script(keys=lease_keys(self.tenant_id)[:1], args=[expiry, self.rid])
        except REDIS_FAULTS as exc:
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


class QuotaService:
    def __init__(self, redis_client: aioredis.Redis, *, lease_s: float, fail_open_share: float,
                 clock: Callable[[], datetime] | None = None, on_trip: Callable[..., None] | None = None,
                 script_channel: bool = True) -> None:
        self.redis = redis_client
        self.lease_s = lease_s
        self.clock = clock or (lambda: datetime.now(UTC))
        self.local = LocalCounters(fail_open_share)
        self.counter_lists = CounterLists()
        # The four scripts every leased request runs go over one multiplexed connection where they can
        # (tollway.infra.redisscripts: a quarter of redis-py's CPU per call); the rest of Redis through redis-py.
        register, self.channel = scripts_for(redis_client, channel=script_channel)
        self.reserve_script = register(RESERVE)
        self.settle_script = register(SETTLE)
        self.renew_script = register(RENEW)
        self.ack_script = register(ACK)
        self.awaiting: dict[str, int] = {}  # request id -> tenant: leased requests whose ledger row is not on disk
        self.on_recovered: Callable[[], None] = lambda: None  # Redis answers again after failing (reconcile)
        self._failing = False
        self.closing = False  # shutting down: ledger acknowledgements are no longer sent
        self.on_trip = on_trip or (lambda **_: None)
        self.background = Background("budget settlement")  # settlements and lease renewals

    def track(self, work: Coroutine[Any, Any, None]) -> None:
        self.background.spawn(work)

    async def drain(self) -> None:
        self.closing = True
        await self.background.drain()

    async def aclose(self) -> None:
        """After ``drain``: the scripts' connection closes."""
        if self.channel is not None:
            await self.channel.aclose()

    def _failed(self) -> None:
        self._failing = True

    def _answered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("redis answers again; reconciling the counters with the ledger")
            self.on_recovered()

    def ack(self, rows: Sequence[LedgerRow]) -> None:
        """These ledger rows are on disk (PostgreSQL or the spill file): their leased requests no longer need
        the sweeper (one call per tenant, off the hot path)."""
        if self.closing:
            return
        done: dict[int, list[str]] = {}
        for row in rows:
            if self.awaiting.pop(row.request_id, None) is not None:
                done.setdefault(row.tenant_id, []).append(row.request_id)
        for tenant_id, rids in done.items():
            self.track(self._ack(tenant_id, rids))

    async def _ack(self, tenant_id: int, rids: list[str]) -> None:
        try:
            await self.ack_script(keys=lease_keys(tenant_id)[3:4], args=rids)
        except REDIS_FAULTS as exc:  # the sweeper will find the rows already written
            log.info("ledger acknowledgement for tenant %s not sent (%s)", tenant_id, exc)

    async def admit(self, principal: Principal, rules: TenantRules, *, rid: str, end_user: str | None,
                    session: str | None, fingerprint: str, demand: Demand, count_storm: bool = True,
                    row: LedgerRow | None = None, model: str | None = None) -> Admission:
        """``count_storm=False``: a second try for the same request (a cheaper route after a refusal), which
        the retry-storm breaker has already counted. ``row``: the request's ledger row as it stands (kept with
        its lease, so that a gateway that dies holding it still leaves a ledger row), ``model`` the model it is
        admitted for."""
        now = self.clock()
        counters = self.counter_lists.get(principal, rules, end_user=end_user, session=session, now=now)
        policy = rules.policy
        hard = NO_LIMIT if policy.velocity_hard_usd_per_min is None else to_nano(policy.velocity_hard_usd_per_min)
        now_s = now.timestamp()
        keys = [storm_key(principal.tenant_id, fingerprint), *lease_keys(principal.tenant_id)]
        watch = hard if hard != NO_LIMIT else (-1 if policy.velocity_soft_usd_per_min is not None else -2)
        args: list[Any] = [int(now_s * 1000), int(self.lease_s * 1000), rid,
                           policy.retry_storm_limit if count_storm else 0,
                           policy.retry_storm_window_s, watch, len(counters)]
        for counter in counters:
            keys.append(counter.key)
            args.extend([*counter.limits, *demand.amounts(counter), counter.ttl_s])
        if watch != -2:
            keys.extend(velocity_keys(principal.tenant_id, now_s))
        args.append(demand.usd_nano)
        args.append(lease_meta(row, demand, model))
        try:
            reply = await self.reserve_script(keys=keys, args=args)
        except REDIS_FAULTS as exc:
            self._failed()
            return self._admit_without_redis(principal, rules, rid, counters, demand, watch, exc)
        self._answered()
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
        if counters or watch >= 0:  # it holds a lease
            if len(self.awaiting) >= AWAITING_MAX:  # rows lost to a bug must not grow this forever
                self.awaiting.pop(next(iter(self.awaiting)))
            self.awaiting[rid] = principal.tenant_id
        return Admission(reservation, rate_headers(counters, used, now),
                         step_down=soft is not None and velocity > to_nano(soft), headroom=headroom(counters, used))

    def _admit_without_redis(self, principal: Principal, rules: TenantRules, rid: str, counters: list[Counter],
                             demand: Demand, velocity: int, exc: Exception) -> Admission:
        if rules.policy.redis_failure != "open":
            raise ServiceUnavailable("Budgets cannot be checked right now (Redis is unreachable); "
                                     "nothing was spent.", code="quota_unavailable") from exc
        log.warning("redis unreachable (%s); tenant %s fails open on local counters", exc, principal.tenant_id)
        refused = self.local.admit(counters, demand)
        if refused is not None and refused.budget is None:
            what, code = (("cap on requests in flight", "parallel_requests_exceeded") if refused.parallel
                          else ("rate limit", "rate_limit_exceeded"))
            raise RateLimited(f"The {refused.rate_scope}'s {what} has no local headroom left while limits cannot be "
                              "checked centrally.", code=code, retry_after=1) from exc
        if refused is not None:
            raise QuotaExceeded(f"{_name(principal, refused)} has no local headroom left while budgets "
                                "cannot be checked centrally.", code="insufficient_quota") from exc
        return Admission(Reservation(self, rid, principal.tenant_id, counters, demand, velocity, local=True),
                         {"x-tollway-budget-mode": "local"}, step_down=True)

    def _refusal(self, principal: Principal, counter: Counter, dim: int, used: int, limit: int, demand: Demand,
                 now: datetime) -> Exception:
        retry_after = None if counter.reset_at is None else max(1, math.ceil((counter.reset_at - now).total_seconds()))
        if counter.parallel:
            owner = "this tenant" if counter.rate_scope == "tenant" else "this key"
            return RateLimited(f"Too many requests in flight for {owner}: limit {limit}, in flight {used}. "
                               "Retry when one of them has finished.", code="parallel_requests_exceeded",
                               retry_after=1)
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
        if reservation.local:  # counted locally at admission; the reconciliation job restores Redis from the ledger
            self.local.release(reservation.counters)  # but a request in flight is one no more
            return
        if not reservation.counters and reservation.velocity == -2:
            return  # nothing was reserved and no velocity is watched: no round trip
        now_s = self.clock().timestamp()
        keys = lease_keys(reservation.tenant_id)
        args: list[Any] = [reservation.rid, int(now_s * 1000), reservation.velocity, len(reservation.counters)]
        spent = Demand(usd_nano, tokens, reservation.demand.requests)
        for counter in reservation.counters:
            keys.append(counter.key)
            args.extend([*counter.spent(spent), counter.ttl_s])
        args.extend([usd_nano, tokens])
        if reservation.velocity != -2:
            keys.extend(velocity_keys(reservation.tenant_id, now_s))
        try:
            await self.settle_script(keys=keys, args=args)
        except REDIS_FAULTS as exc:
            self._failed()
            # The lease expires on its own; the ledger has the truth and reconciliation restores it.
            log.warning("settlement of %s failed (%s); reconciliation will correct the counters",
                        reservation.rid, exc)
        else:
            self._answered()


def _name(principal: Principal, counter: Counter) -> str:
    assert counter.budget is not None
    return counter.budget.describe(principal.tenant)


def lease_meta(row: LedgerRow | None, demand: Demand, model: str | None = None) -> bytes:
    """What a ledger row needs that Redis would not otherwise know, kept with the lease (short keys: it
    travels with every leased admission)."""
    meta: dict[str, Any] = {"usd": demand.usd_nano, "tok": demand.tokens}
    if row is not None:
        meta.update(c=row.created_at.isoformat(), k=row.key_id, e=row.endpoint, m=model or row.model,
                    u=row.end_user, s=row.session_id)
    return orjson.dumps(meta)


def fingerprint(tenant_id: int, body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12, key=str(tenant_id).encode()).hexdigest()


def new_rid() -> str:
    return os.urandom(8).hex()
