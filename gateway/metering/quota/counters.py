"""The counters a request is admitted against: one per budget that applies (tenant, key, end user,
session, in its window), one per rate limit and one per cap on requests in flight; amounts are integers
(nano-USD rounded up, tokens, requests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import redis.asyncio as aioredis

from tollway.gateway.metering.quota.windows import window
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import EACH, Budget, TenantRules
from tollway.keyspace import budget_prefix, parallel_key, rate_key, subject_key

NANO = Decimal(10**9)
NO_LIMIT = -1
USD, TOK, REQ = 0, 1, 2
DIM_NAMES = ("usd", "tokens", "requests")


def to_nano(usd: Decimal) -> int:
    return math.ceil(usd * NANO)


def from_nano(nano: int) -> Decimal:
    return Decimal(nano) / NANO


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    limits: tuple[int, int, int]
    ttl_s: int
    reset_at: datetime | None
    budget: Budget | None = None  # None: a rate limit or a cap on requests in flight
    rate_scope: str = ""  # "tenant" or "key" for rate limits and caps
    parallel: bool = False  # a cap on requests in flight: held while a request is, never counted as spent

    def spent(self, demand: Demand) -> tuple[int, int, int]:
        """What settling ``demand`` (what a request actually used) adds to this counter."""
        return (0, 0, 0) if self.parallel else demand.amounts(self)


@dataclass(slots=True)
class Demand:
    usd_nano: int
    tokens: int
    requests: int = 1

    def amounts(self, counter: Counter) -> tuple[int, int, int]:
        # Rate limits count requests and tokens only; budgets count USD and tokens; a cap, the request.
        if counter.parallel:
            return 0, 0, self.requests
        if counter.budget is None:
            return 0, self.tokens, self.requests
        return self.usd_nano, self.tokens, self.requests


def budget_counter(budget: Budget, subject: str, now: datetime) -> Counter:
    """The Redis counter of one budget for one subject ('' for the tenant, a key id, a user or session id)."""
    win = window(budget.period, now)
    limits = (NO_LIMIT if budget.limit_usd is None else to_nano(budget.limit_usd),
              NO_LIMIT if budget.limit_tokens is None else budget.limit_tokens, NO_LIMIT)
    hashed = subject if budget.scope in ("tenant", "key") else subject_key(subject)
    return Counter(f"{budget_prefix(budget.tenant_id, budget.id)}{hashed}:{win.label}", limits, win.ttl_s, win.end,
                   budget)


async def clear_counters(redis_client: aioredis.Redis, budgets: Sequence[Budget]) -> int:
    """Delete every Redis counter of these budgets (a reset); the number deleted."""
    cleared = 0
    for budget in budgets:
        async for key in redis_client.scan_iter(match=budget_prefix(budget.tenant_id, budget.id) + "*", count=500):
            cleared += int(await redis_client.delete(key))
    return cleared


def counters_for(principal: Principal, rules: TenantRules, *, end_user: str | None, session: str | None,
                 now: datetime) -> list[Counter]:
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
        out.append(Counter(rate_key(principal.tenant_id, "tenant", minute.label),
                           (NO_LIMIT, policy.tpm or NO_LIMIT, policy.rpm or NO_LIMIT),
                           minute.ttl_s, minute.end, rate_scope="tenant"))
    if principal.rpm or principal.tpm:
        out.append(Counter(rate_key(principal.tenant_id, f"key:{principal.key_id}", minute.label),
                           (NO_LIMIT, principal.tpm or NO_LIMIT, principal.rpm or NO_LIMIT),
                           minute.ttl_s, minute.end, rate_scope="key"))
    # no window and no expiry: what it holds goes back as each request settles or its lease runs out
    if rules.parallel:  # the policy's cap, else the gateway's default
        out.append(Counter(parallel_key(principal.tenant_id, "tenant"),
                           (NO_LIMIT, NO_LIMIT, rules.parallel), 0, None, rate_scope="tenant", parallel=True))
    if principal.max_parallel_requests:
        out.append(Counter(parallel_key(principal.tenant_id, f"key:{principal.key_id}"),
                           (NO_LIMIT, NO_LIMIT, principal.max_parallel_requests), 0, None, rate_scope="key",
                           parallel=True))
    return out


class CounterLists:
    """``counters_for``, remembered for the second it was asked in: every request of one key (and end user and
    session) in that second gets the same counters, and working out their windows cost ~2% of a request's CPU.
    A new rules object (a budget or policy changed) or a new second asks again; the windows' TTLs may be up to
    a second longer than computed exactly (they outlive their window by an hour)."""

    def __init__(self) -> None:
        self._second = -1
        self._lists: dict[tuple[object, ...], tuple[TenantRules, list[Counter]]] = {}

    def get(self, principal: Principal, rules: TenantRules, *, end_user: str | None, session: str | None,
            now: datetime) -> list[Counter]:
        second = math.floor(now.timestamp())
        if second != self._second:
            self._second, self._lists = second, {}
        key = (id(rules), principal.tenant_id, principal.key_id, principal.rpm, principal.tpm,
               principal.max_parallel_requests, end_user, session)
        hit = self._lists.get(key)
        if hit is not None and hit[0] is rules:  # held here, so its id cannot be another object's this second
            return hit[1]
        found = counters_for(principal, rules, end_user=end_user, session=session, now=now)
        self._lists[key] = (rules, found)
        return found
