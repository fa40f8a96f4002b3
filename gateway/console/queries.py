"""The console's own SQL: sessions, the daily series and burn-down points its charts draw, the recent
breaker events and failed attempts. Everything else a page shows comes from the rooms' functions, so the
page's numbers are the API's."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from tollway.gateway.metering.budget_alerts import BudgetUse
from tollway.gateway.metering.reconcile import SUBJECT_COLUMN, rollup_dim
from tollway.gateway.metering.reports import ReportQuery


async def session_key(conn: Any, token_hash: bytes) -> tuple[Any, ...] | None:
    """(key id, tenant id, tenant, role, key name) of a live session on an unrevoked key."""
    cur = await conn.execute(
        "SELECT k.id, k.tenant_id, t.name, k.role, k.name FROM console_sessions s"
        " JOIN api_keys k ON k.id = s.key_id JOIN tenants t ON t.id = k.tenant_id"
        " WHERE s.token_hash = %s AND s.expires_at > now() AND k.revoked_at IS NULL", (token_hash,))
    row: tuple[Any, ...] | None = await cur.fetchone()
    return row


async def open_session(conn: Any, token_hash: bytes, key_id: int, ttl_s: int) -> None:
    await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
    await conn.execute("INSERT INTO console_sessions (token_hash, key_id, expires_at)"
                       " VALUES (%s, %s, now() + make_interval(secs => %s))", (token_hash, key_id, ttl_s))


async def close_session(conn: Any, token_hash: bytes) -> None:
    await conn.execute("DELETE FROM console_sessions WHERE token_hash = %s", (token_hash,))


async def tenant_names(conn: Any) -> dict[int, str]:
    cur = await conn.execute("SELECT id, name FROM tenants")
    return dict(await cur.fetchall())


async def breaker_events(conn: Any, tenant_ids: list[int] | None) -> list[dict[str, Any]]:
    """The last 30 days' breaker trips (at most 50), newest first."""
    cur = await conn.execute(
        "SELECT b.id, t.name, b.kind, b.first_offense_at, b.contained_at, b.detail FROM breaker_events b"
        " LEFT JOIN tenants t ON t.id = b.tenant_id WHERE b.contained_at > now() - interval '30 days'"
        " AND (%s::bigint[] IS NULL OR b.tenant_id = ANY(%s)) ORDER BY b.contained_at DESC LIMIT 50",
        (tenant_ids, tenant_ids))
    return [dict(zip(("id", "tenant", "kind", "first", "contained", "detail"), r, strict=True))
            for r in await cur.fetchall()]


async def failed_attempts(conn: Any) -> list[dict[str, Any]]:
    """The 25 newest failed upstream attempts, every tenant's."""
    cur = await conn.execute(
        "SELECT l.created_at, t.name, l.model, l.upstream, l.status, l.error_code, l.latency_ms, l.request_id"
        " FROM ledger l LEFT JOIN tenants t ON t.id = l.tenant_id WHERE l.role = 'attempt'"
        " ORDER BY l.created_at DESC LIMIT 25")
    return [dict(zip(("at", "tenant", "model", "upstream", "status", "error", "latency_ms", "request_id"),
                     r, strict=True)) for r in await cur.fetchall()]


async def key_labels(conn: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [int(r["group"]) for r in rows if r["group"].isdigit()]
    cur = await conn.execute("SELECT id, coalesce(name, prefix || '…') FROM api_keys WHERE id = ANY(%s)", (ids,))
    names = {str(i): n for i, n in await cur.fetchall()}
    return [{**r, "group": f"{names.get(r['group'], 'key')} (#{r['group']})"} for r in rows]


async def daily(conn: Any, q: ReportQuery, by: str) -> tuple[list[str], list[str], dict[tuple[str, str], Decimal]]:
    column = "r.value" if by == "model" else "nullif(r.tier, '')"
    cur = await conn.execute(
        f"SELECT r.day::text, coalesce({column}, '(none)'), sum(r.spend_usd) FROM ledger_daily r"
        " WHERE r.dim = 'model' AND r.day >= %s AND r.day < %s AND (%s::bigint[] IS NULL OR r.tenant_id = ANY(%s))"
        " GROUP BY 1, 2", (q.start.date(), q.end.date(), q.tenant_ids, q.tenant_ids))
    values = {(d, s): Decimal(v) for d, s, v in await cur.fetchall() if v is not None}  # $0 days show too
    days, day = [], q.start.date()
    while day < q.end.date():
        days.append(day.isoformat())
        day += timedelta(days=1)
    by_spend: dict[str, Decimal] = {}
    for (_, s), v in values.items():
        by_spend[s] = by_spend.get(s, Decimal(0)) + v
    series = sorted(by_spend, key=lambda s: (-by_spend[s], s))
    return days, series, values


async def burn(conn: Any, use: BudgetUse, now: datetime, measure: str = "usd") -> list[tuple[float, Decimal]]:
    """Cumulative use over the window so far: per day (month) or hour (day), as (window share, amount):
    ``measure`` "usd" (spend) or "tokens" (input plus output), as the budget counts them."""
    budget = use.budget
    if use.window.start is None or budget.period not in ("day", "month"):
        return []
    unit = "hour" if budget.period == "day" else "day"
    dim = rollup_dim(budget, use.start, use.end) if unit == "day" else None
    by_subject = budget.scope != "tenant"
    if dim is not None:
        amount = "spend_usd" if measure == "usd" else "input_tokens + output_tokens"
        sql = (f"SELECT day::timestamp AT TIME ZONE 'UTC', sum({amount}) FROM ledger_daily"
               " WHERE tenant_id = %s AND dim = %s AND day >= %s" + (" AND value = %s" if by_subject else ""))
        args: list[Any] = [budget.tenant_id, dim, use.start.date()]
    else:
        amount = "cost_usd" if measure == "usd" else "input_tokens + output_tokens"
        sql = (f"SELECT date_trunc('{unit}', created_at), sum({amount}) FROM ledger WHERE tenant_id = %s"
               " AND created_at >= %s AND created_at < %s AND role <> 'shadow'"
               + (f" AND {SUBJECT_COLUMN[budget.scope]} = %s" if by_subject else ""))
        args = [budget.tenant_id, use.start, now]
    cur = await conn.execute(sql + " GROUP BY 1 ORDER BY 1", args + ([use.subject] if by_subject else []))
    length = (use.end - use.start).total_seconds()
    step = timedelta(hours=1) if unit == "hour" else timedelta(days=1)
    points, running = [(0.0, Decimal(0))], Decimal(0)
    for at, spent in await cur.fetchall():
        running += Decimal(spent or 0)
        points.append((min((at + step - use.start).total_seconds(), (now - use.start).total_seconds()) / length,
                       running))
    return points

