"""Reconciliation: compare the Redis budget counters with the ledger (the source of truth), correct
and report the drift.

Counters fall behind the ledger when settlements were lost (Redis down, a fail-open outage counted
locally, an embedded Redis restarted without persistence): those are raised to the ledger's figure.
A counter ahead of the ledger is reported but lowered only when asked (``allow_decrease``), because
the usual cause is ledger rows still queued or spilled, and lowering then would let spend through.
Each correction is compare-and-set, so a settlement that lands meanwhile is never overwritten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from tollway.gateway.metering.quota import budget_counter, from_nano, to_nano, window
from tollway.gateway.tenancy.policy import EACH, Budget, load_rules

log = logging.getLogger("tollway.reconcile")

# KEYS[1] counter hash; ARGV: expected s_usd, expected s_tok, new s_usd, new s_tok, ttl
_SET_IF_UNCHANGED = """
local usd = redis.call('HGET', KEYS[1], 's_usd') or '0'
local tok = redis.call('HGET', KEYS[1], 's_tok') or '0'
if usd ~= ARGV[1] or tok ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 's_usd', ARGV[3], 's_tok', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5])) end
return 1
"""

def _text(value: bytes | str | None) -> str:
    if value is None:
        return "0"
    return value.decode() if isinstance(value, bytes) else value


SUBJECT_COLUMN = {"key": "key_id::text", "user": "end_user", "session": "session_id"}  # ledger column per scope
_ROLLUP_DIM = {"tenant": "model", "key": "key", "user": "user"}  # ledger_daily dimensions per budget scope


def rollup_dim(budget: Budget, start: datetime, end: datetime) -> str | None:
    """The ``ledger_daily`` dimension that answers for this budget over [start, end), when the window starts
    at midnight UTC and has not ended (a day, a month, a lifetime); None: read the ledger itself."""
    if start.astimezone(UTC).time() != time() or end <= datetime.now(UTC):
        return None
    return _ROLLUP_DIM.get(budget.scope)


@dataclass
class Drift:
    budget_id: int
    subject: str
    redis_usd: Decimal
    ledger_usd: Decimal
    redis_tokens: int
    ledger_tokens: int
    corrected: bool

    def as_json(self) -> dict[str, Any]:
        return {"budget_id": self.budget_id, "subject": self.subject, "redis_usd": str(self.redis_usd),
                "ledger_usd": str(self.ledger_usd), "redis_tokens": self.redis_tokens,
                "ledger_tokens": self.ledger_tokens, "corrected": self.corrected}


@dataclass
class ReconcileReport:
    checked: int = 0
    drifts: list[Drift] = field(default_factory=list)

    @property
    def corrected(self) -> int:
        return sum(d.corrected for d in self.drifts)

    def as_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "corrected": self.corrected,
                "drifts": [d.as_json() for d in self.drifts]}


async def subjects(conn: Any, budget: Budget, start: datetime, end: datetime) -> list[str]:
    """Whom a budget counts in [start, end): "" for a tenant budget, its one subject, or (a budget for each
    key / user / session) those the ledger saw."""
    if budget.scope == "tenant":
        return [""]
    if budget.subject != EACH:
        return [budget.subject]
    dim = rollup_dim(budget, start, end)
    if dim is not None:
        cur = await conn.execute("SELECT DISTINCT value FROM ledger_daily WHERE tenant_id = %s AND dim = %s"
                                 " AND day >= %s AND value <> '(none)'", (budget.tenant_id, dim, start.date()))
        return [str(r[0]) for r in await cur.fetchall()]
    column = SUBJECT_COLUMN[budget.scope]
    cur = await conn.execute(
        f"SELECT DISTINCT {column} FROM ledger WHERE tenant_id = %s AND {column} IS NOT NULL"
        " AND created_at >= %s AND created_at < %s", (budget.tenant_id, start, end))
    return [str(r[0]) for r in await cur.fetchall()]


async def ledger_usage(conn: Any, budget: Budget, subject: str, start: datetime,
                       end: datetime) -> tuple[Decimal, int, int]:
    """What the ledger says one budget subject used in [start, end): USD, tokens, requests. A window that
    starts at midnight UTC and has not ended (a day, a month, a lifetime) is read from the daily rollup,
    which the ledger's inserts keep exact; the same sums from thousands of rows instead of millions."""
    dim = rollup_dim(budget, start, end)
    if dim is not None:
        where = "tenant_id = %s AND dim = %s AND day >= %s"
        params: list[Any] = [budget.tenant_id, dim, start.astimezone(UTC).date()]
        if budget.scope != "tenant":
            where += " AND value = %s"
            params.append(subject)
        cur = await conn.execute("SELECT coalesce(sum(spend_usd), 0), coalesce(sum(input_tokens + output_tokens), 0),"
                                 f" coalesce(sum(requests), 0) FROM ledger_daily WHERE {where}", params)
    else:
        where = "tenant_id = %s AND created_at >= %s AND created_at < %s AND role <> 'shadow'"
        params = [budget.tenant_id, start, end]
        if budget.scope != "tenant":
            where += f" AND {SUBJECT_COLUMN[budget.scope]} = %s"
            params.append(subject)
        cur = await conn.execute(f"SELECT coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens + output_tokens), 0),"
                                 f" count(*) FILTER (WHERE role = 'answer') FROM ledger WHERE {where}", params)
    row = await cur.fetchone()
    return Decimal(row[0]), int(row[1]), int(row[2])


async def reconcile(pool: AsyncConnectionPool, redis_client: aioredis.Redis, *, tenant_ids: list[int] | None = None,
                    budget_ids: Collection[int] | None = None, allow_decrease: bool = False,
                    now: datetime | None = None, record: bool = True) -> ReconcileReport:
    """Compare each budget's counters with the ledger over its current window and correct them (raise only,
    unless ``allow_decrease``). ``budget_ids``: only those; ``record``: store the run (a seeding is not)."""
    now = now or datetime.now(UTC)
    report = ReconcileReport()
    script = redis_client.register_script(_SET_IF_UNCHANGED)
    async with pool.connection() as conn:
        if tenant_ids is None:
            cur = await conn.execute("SELECT DISTINCT tenant_id FROM budgets")
            tenant_ids = [int(r[0]) for r in await cur.fetchall()]
        for tid in tenant_ids:
            for budget in (await load_rules(conn, tid)).budgets:
                if budget_ids is not None and budget.id not in budget_ids:
                    continue
                win = window(budget.period, now)
                start, end = win.bounds()
                if budget.reset_at is not None and budget.reset_at > start:
                    start = budget.reset_at
                for subject in await subjects(conn, budget, start, end):
                    report.checked += 1
                    usd, tokens, requests = await ledger_usage(conn, budget, subject, start, end)
                    counter = budget_counter(budget, subject, now)
                    raw = await redis_client.hmget(counter.key, "s_usd", "s_tok")
                    r_usd = int(raw[0] or 0)
                    r_tok = int(raw[1] or 0)
                    l_usd = to_nano(usd)
                    # Redis rounds each request up to the nano-dollar: up to one nano per request is not drift.
                    if l_usd - requests <= r_usd <= l_usd + requests and r_tok == tokens:
                        continue
                    raise_it = r_usd < l_usd or r_tok < tokens
                    corrected = False
                    if raise_it or allow_decrease:
                        corrected = bool(await script(keys=[counter.key], args=[
                            _text(raw[0]), _text(raw[1]),
                            max(l_usd, r_usd) if not allow_decrease else l_usd,
                            max(tokens, r_tok) if not allow_decrease else tokens, counter.ttl_s]))
                    report.drifts.append(Drift(budget.id, subject, from_nano(r_usd), usd, r_tok, tokens, corrected))
        if not record:
            return report
        drift_total = sum((abs(d.redis_usd - d.ledger_usd) for d in report.drifts), Decimal(0))
        await conn.execute("INSERT INTO reconciliation_runs (checked, corrected, drift_usd, detail)"
                           " VALUES (%s, %s, %s, %s)", (report.checked, report.corrected, drift_total,
                                                        json.dumps([d.as_json() for d in report.drifts])))
        await conn.commit()
    if report.drifts:
        log.warning("reconciliation: %d counters drifted from the ledger, %d corrected: %s", len(report.drifts),
                    report.corrected, [d.as_json() for d in report.drifts[:5]])
    return report


async def seed_budget(pool: AsyncConnectionPool, redis_client: aioredis.Redis, tenant_id: int, budget_id: int) -> None:
    """A budget created (or raised) mid-window starts from what the ledger says its window has already
    spent, not from zero: its counters are raised to the ledger at once."""
    report = await reconcile(pool, redis_client, tenant_ids=[tenant_id], budget_ids={budget_id}, record=False)
    if report.drifts:
        log.info("budget %s seeded from the ledger: %s", budget_id, [d.as_json() for d in report.drifts[:5]])
