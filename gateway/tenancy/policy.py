"""Tenant policies and budgets: what a tenant may spend, and how the gateway behaves when it cannot tell.

Definitions live in PostgreSQL. Every change is recorded in the change channel (``changes``), whose
notification makes every replica drop its cached rules for that tenant at once; the short-TTL cache
(``policy_cache_ttl_s``) is the fallback while a replica's listener is disconnected. Counters live in
Redis (``tollway.gateway.metering.quota``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tollway.errors import InvalidRequest, NotFound, ServiceUnavailable
from tollway.gateway.tenancy.keys import tenant_id
from tollway.guardrails import GuardPolicy, PolicyError, parse_policy
from tollway.infra import changes
from tollway.jsontypes import JSON
from tollway.keep import KEEP, Keep
from tollway.lastgood import LastGood

log = logging.getLogger("tollway.gateway")

PERIODS = ("minute", "hour", "day", "month", "lifetime")
SCOPES = ("tenant", "key", "user", "session")
EACH = "*"  # a budget for each key / user / session


@dataclass(frozen=True, slots=True)
class Budget:
    id: int
    tenant_id: int
    scope: str
    subject: str
    period: str
    limit_usd: Decimal | None
    limit_tokens: int | None
    reset_at: datetime | None = None
    # alerts: shares of the limit, and whether a forecast past it alerts; None: the gateway's defaults
    alert_thresholds: Sequence[float] | None = None
    alert_forecast: bool | None = None

    def alerts(self, default: tuple[tuple[float, ...], bool]) -> tuple[tuple[float, ...], bool]:
        if self.alert_thresholds is None and self.alert_forecast is None:
            return default
        return tuple(self.alert_thresholds or ()), bool(self.alert_forecast)

    def describe(self, tenant: str) -> str:
        who = {"tenant": f"tenant '{tenant}'", "key": f"key {self.subject}", "user": f"user '{self.subject}'",
               "session": f"session '{self.subject}'"}[self.scope]
        if self.subject == EACH:
            who = f"each {self.scope} of tenant '{tenant}'"
        return f"the {self.period} budget of {who}"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "scope": self.scope, "subject": self.subject, "window": self.period,
                "limit_usd": None if self.limit_usd is None else str(self.limit_usd),
                "limit_tokens": self.limit_tokens,
                "reset_at": None if self.reset_at is None else self.reset_at.isoformat(),
                "alerts": None if self.alert_thresholds is None and self.alert_forecast is None else
                [*(f"{t:g}" for t in self.alert_thresholds or ()), *(["forecast"] if self.alert_forecast else [])]}


def parse_alerts(values: Sequence[str] | None, param: str = "alerts") -> tuple[tuple[float, ...], bool] | None:
    """["0.8", "1", "forecast"] -> ((0.8, 1.0), True): shares of a budget's limit that raise an alert once
    per window, and whether a forecast past the limit does. None stays None (the gateway's defaults)."""
    if values is None:
        return None
    shares: list[float] = []
    forecast = False
    for value in (v.strip() for v in values):
        if value == "forecast":
            forecast = True
            continue
        try:
            share = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            share = -1.0
        if not 0 < share <= 10:
            raise InvalidRequest(f"an alert is a share of the limit such as 0.8 or 80%, or 'forecast' (got {value!r})",
                                 param=param)
        shares.append(share)
    return tuple(sorted(set(shares))), forecast


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    tenant_id: int
    redis_failure: str = "closed"
    default_max_tokens: int = 4096
    rpm: int | None = None
    tpm: int | None = None
    max_parallel_requests: int | None = None  # the tenant's requests in flight at once, across every gateway
    velocity_soft_usd_per_min: Decimal | None = None
    velocity_hard_usd_per_min: Decimal | None = None
    retry_storm_limit: int = 20
    retry_storm_window_s: int = 10
    route_threshold: float = 0.5
    allowed_models: tuple[str, ...] | None = None
    quality_floor: str | None = None
    degraded_answers: bool = False
    response_cache: bool = True
    store_content: bool = False  # prompts and answers of samples, eval items and stored responses may be kept
    content_retention_days: int = 30  # for this long

    def __post_init__(self) -> None:
        if isinstance(self.allowed_models, list):  # from the database's text[]
            object.__setattr__(self, "allowed_models", tuple(self.allowed_models))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Decimal) else \
                list(value) if isinstance(value, tuple) else value
        return out


POLICY_FIELDS = tuple(f.name for f in fields(TenantPolicy) if f.name != "tenant_id")
# Dollar amounts of budgets and policies are numeric(20, 10): under 10^10, at most 10 decimal places (an amount
# finer than that would be stored rounded, 1e-11 as a limit of 0).
USD_BOUND, USD_PLACES = Decimal(10) ** 10, 10
# The fields that always hold a value (their columns are NOT NULL): null is no way to clear them.
VALUED_FIELDS = {f.name: f.default for f in fields(TenantPolicy) if f.name != "tenant_id" and f.default is not None}


@dataclass(frozen=True, slots=True)
class TenantRules:
    policy: TenantPolicy
    budgets: tuple[Budget, ...]
    guards: GuardPolicy | None = None  # the tenant's guard policy (``tollway.guardrails.policy``)
    default_parallel: int | None = None  # the gateway's cap for a tenant whose policy sets none

    @property
    def parallel(self) -> int | None:
        """The tenant's cap on requests in flight at once: its policy's, else the gateway's default
        (``TOLLWAY_DEFAULT_MAX_PARALLEL_REQUESTS``), else none."""
        return self.policy.max_parallel_requests or self.default_parallel


def policy_json(policy: TenantPolicy, default_parallel: int | None) -> dict[str, Any]:
    """A policy as the API and the CLI show it: its fields as stored, and under ``effective`` what a gateway
    applies where a field is unset and a gateway-wide default stands in (``TOLLWAY_DEFAULT_MAX_PARALLEL_REQUESTS``)."""
    return {**policy.as_json(),
            "effective": {"max_parallel_requests": TenantRules(policy, (), default_parallel=default_parallel).parallel}}


_BUDGET_COLUMNS = ("id, tenant_id, scope, subject, period, limit_usd, limit_tokens, reset_at, alert_thresholds,"
                   " alert_forecast")


class PolicyStore:
    """A tenant's rules, cached for ``cache_ttl_s`` (a change on the channel drops them at once). While the
    database is unreachable the last good rules keep serving: a request waits at most ``stale_wait_s`` for a
    reload (which goes on in the background), and for ``retry_s`` after a failed one none waits again."""

    def __init__(self, pool: AsyncConnectionPool, *, cache_ttl_s: float, stale_wait_s: float = 0.25,
                 retry_s: float = 2.0, default_parallel: int | None = None) -> None:
        self._pool = pool
        self.default_parallel = default_parallel
        self._cache: LastGood[int, TenantRules] = LastGood(ttl_s=cache_ttl_s, down=ServiceUnavailable,
                                                           stale_wait_s=stale_wait_s, retry_s=retry_s)

    async def rules(self, tenant_id: int) -> TenantRules:
        return await self._cache.get(tenant_id, lambda: self._load(tenant_id))

    async def _load(self, tenant_id: int) -> TenantRules:
        try:
            async with self._pool.connection(timeout=2) as conn:
                rules = await load_rules(conn, tenant_id)
                return rules if self.default_parallel is None else replace(rules,
                                                                           default_parallel=self.default_parallel)
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise ServiceUnavailable("Tenant policies are unavailable; try again shortly.") from exc

    def forget(self, tenant_id: int) -> None:
        self._cache.drop(tenant_id)


async def load_rules(conn: psycopg.AsyncConnection[Any], tenant_id: int) -> TenantRules:
    cur = await conn.execute(f"SELECT tenant_id, {', '.join(POLICY_FIELDS)} FROM tenant_policies"
                             " WHERE tenant_id = %s", (tenant_id,))
    row = await cur.fetchone()
    policy = TenantPolicy(*row) if row is not None else TenantPolicy(tenant_id)
    cur = await conn.execute(f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE tenant_id = %s ORDER BY id",
                             (tenant_id,))
    budgets = tuple(Budget(*r) for r in await cur.fetchall())
    cur = await conn.execute("SELECT policy FROM guard_policies WHERE tenant_id = %s", (tenant_id,))
    guard_row = await cur.fetchone()
    guards = None
    if guard_row is not None:
        try:
            guards = parse_policy(guard_row[0], extra=_ANY_EXTRA)
        except PolicyError:
            log.exception("tenant %s: the stored guard policy no longer parses; its guards are off", tenant_id)
    return TenantRules(policy, budgets, guards)


class _AnyName(frozenset[str]):
    """Stored policies were checked against the configured validators when they were written."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY_EXTRA = _AnyName()


async def set_guards(conn: psycopg.AsyncConnection[Any], tenant: str, policy: JSON | None, *,
                     extra: frozenset[str] = frozenset(), author: str = "system",
                     reason: str | None = None) -> GuardPolicy | None:
    """Replace a tenant's guard policy (None: remove it, and with it every guard of the tenant's own).
    ``extra``: the names of the validators the config adds, which the policy may name."""
    try:
        parsed = None if policy is None else parse_policy(policy, extra=extra)
    except PolicyError as exc:
        raise InvalidRequest(str(exc), param="guards", code="invalid_guard_policy") from exc
    async with conn.transaction():
        tid = await tenant_id(conn, tenant)
        cur = await conn.execute("SELECT policy FROM guard_policies WHERE tenant_id = %s FOR UPDATE", (tid,))
        old = await cur.fetchone()
        if parsed is None:
            await conn.execute("DELETE FROM guard_policies WHERE tenant_id = %s", (tid,))
        else:
            await conn.execute(
                "INSERT INTO guard_policies (tenant_id, policy) VALUES (%s, %s) ON CONFLICT (tenant_id)"
                " DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()",
                (tid, Jsonb(parsed.model_dump(exclude_none=True))))
        await changes.record(conn, author=author, kind="guards", subject=tenant,
                             action="delete" if parsed is None else "set", tenant_id=tid,
                             before=None if old is None else old[0],
                             after=None if parsed is None else parsed.model_dump(exclude_none=True), reason=reason)
    return parsed


async def get_guards(conn: psycopg.AsyncConnection[Any], tenant: str) -> GuardPolicy | None:
    return (await load_rules(conn, await tenant_id(conn, tenant))).guards


def _check_subject(scope: str, subject: str | None) -> str:
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}", param="scope")
    if scope == "tenant":
        if subject:
            raise InvalidRequest("a tenant budget has no subject", param="subject")
        return ""
    if not subject:
        raise InvalidRequest(f"a {scope} budget needs a subject ('{EACH}' for each {scope})", param="subject")
    return subject


async def set_budget(conn: psycopg.AsyncConnection[Any], tenant: str, *, scope: str, subject: str | None,
                     period: str, limit_usd: Decimal | Keep | None = KEEP, limit_tokens: int | Keep | None = KEEP,
                     author: str = "system", reason: str | None = None,
                     alerts: Sequence[str] | Keep | None = KEEP) -> Budget:
    """Create a budget, or change only what is given of an existing one (``None`` clears a limit; alerts
    ``None`` means the gateway's defaults). A budget keeps at least one limit."""
    if period not in PERIODS:
        raise InvalidRequest(f"window must be one of {', '.join(PERIODS)}", param="window")
    if all(isinstance(v, Keep) for v in (limit_usd, limit_tokens, alerts)):
        raise InvalidRequest("nothing to change: give a USD limit, a token limit or alerts", param="limit_usd")
    for value in (limit_usd, limit_tokens):
        if isinstance(value, Decimal | int) and value < 0:
            raise InvalidRequest("limits cannot be negative", param="limit_usd")
    subject = _check_subject(scope, subject)
    parsed = KEEP if isinstance(alerts, Keep) else (parse_alerts(alerts) or (None, None))
    async with conn.transaction():
        tid = await tenant_id(conn, tenant)
        if scope == "key" and subject != EACH:
            cur = await conn.execute("SELECT 1 FROM api_keys WHERE id = %s AND tenant_id = %s",
                                     (int(subject) if subject.isdigit() else -1, tid))
            if await cur.fetchone() is None:
                raise NotFound(f"key {subject} is not a key of tenant {tenant!r}", param="subject",
                               code="key_not_found")
        cur = await conn.execute(f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE tenant_id = %s AND scope = %s"
                                 " AND subject = %s AND period = %s FOR UPDATE", (tid, scope, subject, period))
        old = await cur.fetchone()
        before = None if old is None else Budget(*old)
        usd = (before.limit_usd if before else None) if isinstance(limit_usd, Keep) else limit_usd
        tokens = (before.limit_tokens if before else None) if isinstance(limit_tokens, Keep) else limit_tokens
        if isinstance(parsed, Keep):
            thresholds = None if before is None or before.alert_thresholds is None else list(before.alert_thresholds)
            forecast = None if before is None else before.alert_forecast
        else:
            thresholds = None if parsed[0] is None else list(parsed[0])
            forecast = parsed[1]
        if usd is None and tokens is None:
            raise InvalidRequest("a budget needs a USD limit, a token limit, or both (to remove it, delete it)",
                                 param="limit_usd")
        cur = await conn.execute(
            f"INSERT INTO budgets (tenant_id, scope, subject, period, limit_usd, limit_tokens, alert_thresholds,"
            f" alert_forecast) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (tenant_id, scope, subject, period) DO UPDATE"
            f" SET limit_usd = EXCLUDED.limit_usd, limit_tokens = EXCLUDED.limit_tokens,"
            f" alert_thresholds = EXCLUDED.alert_thresholds, alert_forecast = EXCLUDED.alert_forecast,"
            f" updated_at = now() RETURNING {_BUDGET_COLUMNS}",
            (tid, scope, subject, period, usd, tokens, thresholds, forecast))
        row = await cur.fetchone()
        assert row is not None
        budget = Budget(*row)
        await changes.record(conn, author=author, kind="budget", subject=budget.id, action="set", tenant_id=tid,
                             before=None if before is None else before.as_json(), after=budget.as_json(),
                             reason=reason)
    return budget


RECENT_ROWS = 1000  # how far back into a tenant's ledger the unpriced-model warning looks


async def unpriced_models(conn: psycopg.AsyncConnection[Any], tid: int,
                          serving: Collection[str] = ()) -> list[str]:
    """The models whose answers a USD limit cannot see (they cost $0 here): those among the tenant's last
    ``RECENT_ROWS`` ledger rows that were served without a price and have none stored since, and ``serving``
    (the unpriced models a running gateway serves now: it knows them from discovery, the CLI does not).
    Read from the newest rows of the tenant's index, so a large ledger costs no scan."""
    cur = await conn.execute(
        "SELECT DISTINCT model FROM (SELECT model, price_source FROM ledger WHERE tenant_id = %s"
        " ORDER BY created_at DESC LIMIT %s) AS recent"
        " WHERE price_source = 'unpriced' AND model NOT IN (SELECT model FROM model_prices)",
        (tid, RECENT_ROWS))
    return sorted({r[0] for r in await cur.fetchall()} | set(serving))


def unpriced_warning(models: Sequence[str]) -> JSON:
    """What ``PUT /v1/admin/budgets`` and ``tollway budgets set`` say when a USD limit meets such models."""
    return {"code": "unpriced_models", "models": list(models),
            "message": f"{', '.join(models)} {'has' if len(models) == 1 else 'have'} no price: their answers cost"
                       " $0 here and never count toward limit_usd (a token limit does count them); price them"
                       " with `tollway models price` or PUT /v1/admin/models/{model}/price"}


async def delete_budget(conn: psycopg.AsyncConnection[Any], tenant: str, budget_id: int, *, author: str = "system",
                        reason: str | None = None) -> bool:
    async with conn.transaction():
        tid = await tenant_id(conn, tenant)
        cur = await conn.execute(f"DELETE FROM budgets WHERE id = %s AND tenant_id = %s RETURNING {_BUDGET_COLUMNS}",
                                 (budget_id, tid))
        row = await cur.fetchone()
        if row is None:
            return False
        await changes.record(conn, author=author, kind="budget", subject=budget_id, action="delete", tenant_id=tid,
                             before=Budget(*row).as_json(), reason=reason)
    return True


async def set_policy(conn: psycopg.AsyncConnection[Any], tenant: str, *, tiers: Collection[str] | None = None,
                     author: str = "system", reason: str | None = None, **fields_: Any) -> TenantPolicy:
    """Upsert a tenant's policy fields. With ``tiers`` (the routing config's tier names), a quality floor
    naming no tier is refused instead of silently acting as no floor."""
    unknown = set(fields_) - set(POLICY_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown policy field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    floor = fields_.get("quality_floor")
    if tiers is not None and floor is not None and floor not in tiers:
        raise InvalidRequest(f"quality_floor {floor!r} is not a routing tier (tiers: {', '.join(tiers)})",
                             param="quality_floor")
    for name, value in fields_.items():
        if value is None and name in VALUED_FIELDS:
            raise InvalidRequest(f"{name} always has a value (the default is {VALUED_FIELDS[name]!r}); null does not "
                                 "clear it: send a value, or leave the field out to keep the current one",
                                 param=name)
    if fields_.get("redis_failure", "closed") not in ("closed", "open"):
        raise InvalidRequest("redis_failure must be 'closed' or 'open'", param="redis_failure")
    columns = list(fields_)
    assignments = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns) or "tenant_id = EXCLUDED.tenant_id"
    try:
        async with conn.transaction():
            tid = await tenant_id(conn, tenant)
            before = (await load_rules(conn, tid)).policy
            await conn.execute(
                f"INSERT INTO tenant_policies (tenant_id{''.join(', ' + c for c in columns)})"
                f" VALUES (%s{', %s' * len(columns)})"
                f" ON CONFLICT (tenant_id) DO UPDATE SET {assignments}, updated_at = now()",
                (tid, *(list(v) if isinstance(v, tuple) else v for v in fields_.values())))
            after = (await load_rules(conn, tid)).policy
            await changes.record(conn, author=author, kind="policy", subject=tenant, action="set", tenant_id=tid,
                                 before=before.as_json(), after=after.as_json(), reason=reason)
    except psycopg.errors.CheckViolation as exc:
        raise InvalidRequest(f"invalid policy value: {exc.diag.constraint_name}") from exc
    except psycopg.errors.NotNullViolation as exc:  # a column made NOT NULL after VALUED_FIELDS was written
        raise InvalidRequest(f"{exc.diag.column_name} may not be null", param=exc.diag.column_name) from exc
    return after


async def set_key_limits(conn: psycopg.AsyncConnection[Any], key_id: int, *, rpm: int | None,
                         tpm: int | None, max_parallel_requests: int | None = None, author: str = "system",
                         reason: str | None = None) -> dict[str, Any]:
    """Replace a key's limits (None: no limit of that kind); the limits as now set."""
    after = {"rpm": rpm, "tpm": tpm, "max_parallel_requests": max_parallel_requests}
    try:
        async with conn.transaction():
            cur = await conn.execute("SELECT tenant_id, rpm, tpm, max_parallel_requests FROM api_keys WHERE id = %s"
                                     " FOR UPDATE", (key_id,))
            old = await cur.fetchone()
            if old is None:
                raise NotFound(f"key {key_id} does not exist", param="key", code="key_not_found")
            await conn.execute("UPDATE api_keys SET rpm = %s, tpm = %s, max_parallel_requests = %s WHERE id = %s",
                               (rpm, tpm, max_parallel_requests, key_id))
            await changes.record(conn, author=author, kind="key", subject=key_id, action="limits", tenant_id=old[0],
                                 before={"rpm": old[1], "tpm": old[2], "max_parallel_requests": old[3]}, after=after,
                                 reason=reason)
    except psycopg.errors.CheckViolation as exc:  # as set_policy: a limit under 1 (the CLI, a direct caller)
        raise InvalidRequest(f"invalid key limit: {exc.diag.constraint_name}") from exc
    return {"key_id": key_id, **after}


async def list_budgets(conn: psycopg.AsyncConnection[Any], tenant: str) -> list[Budget]:
    return list((await load_rules(conn, await tenant_id(conn, tenant))).budgets)


async def mark_reset(conn: psycopg.AsyncConnection[Any], tenant: str, budget_id: int | None, *,
                     author: str = "system", reason: str | None = None) -> list[Budget]:
    """Record a reset (the reconciler counts usage from it); the caller clears the Redis counters."""
    async with conn.transaction():
        tid = await tenant_id(conn, tenant)
        cur = await conn.execute(
            f"UPDATE budgets SET reset_at = now() WHERE tenant_id = %s AND (%s::bigint IS NULL OR id = %s)"
            f" RETURNING {_BUDGET_COLUMNS}", (tid, budget_id, budget_id))
        rows = [Budget(*r) for r in await cur.fetchall()]
        if budget_id is not None and not rows:
            raise NotFound(f"budget {budget_id} does not exist for tenant {tenant!r}", param="budget_id",
                           code="budget_not_found")
        for budget in rows:
            await changes.record(conn, author=author, kind="budget", subject=budget.id, action="reset", tenant_id=tid,
                                 after=budget.as_json(), reason=reason)
    return rows
