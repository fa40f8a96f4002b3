"""Cost reports for finance, straight from the ledger: spend, tokens and requests per group, with the
use of the budgets that apply. Totals are one ``SUM`` over the same rows, so they equal the ledger
to the last decimal; amounts travel as decimal strings, never floats."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tollway.errors import InvalidRequest, PermissionDenied
from tollway.gateway.keys import Principal
from tollway.gateway.quota import window
from tollway.gateway.reconcile import ledger_usage
from tollway.gateway.tenant_policy import EACH, load_rules

GROUPS = ("day", "model", "key", "user", "tag", "tenant")
_EXPR = {
    "day": "to_char(l.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "coalesce(l.model, '(none)')",
    "key": "l.key_id::text",
    "user": "coalesce(l.end_user, '(none)')",
    "tag": "t.tag",
    "tenant": "tn.name",
}
_FROM = {
    "tag": "ledger l CROSS JOIN LATERAL unnest(coalesce(l.tags, ARRAY['(none)'])) AS t(tag)",
    "tenant": "ledger l JOIN tenants tn ON tn.id = l.tenant_id",
}
# Spend is what the tenant's budgets count (answers and failed attempts that cost money); shadow
# samples sent to candidate models are the operator's evaluation spend, reported beside it.
_SUMS = ("coalesce(sum(l.cost_usd) FILTER (WHERE l.role <> 'shadow'), 0),"
         " coalesce(sum(l.input_tokens) FILTER (WHERE l.role <> 'shadow'), 0),"
         " coalesce(sum(l.output_tokens) FILTER (WHERE l.role <> 'shadow'), 0),"
         " coalesce(sum(l.cached_tokens) FILTER (WHERE l.role <> 'shadow'), 0),"
         " count(*) FILTER (WHERE l.role = 'answer'),"
         " count(*) FILTER (WHERE l.role = 'answer' AND l.status >= 400),"
         " count(*) FILTER (WHERE l.cache_hit), coalesce(sum(l.saved_usd), 0),"
         " count(*) FILTER (WHERE l.role = 'attempt'),"
         " coalesce(sum(l.cost_usd) FILTER (WHERE l.role = 'shadow'), 0),"
         " count(*) FILTER (WHERE l.role = 'answer' AND l.guard_outcome @> '[{\"action\": \"block\"}]'),"
         " count(*) FILTER (WHERE l.role = 'answer' AND l.guard_outcome @> '[{\"action\": \"fallback\"}]'),"
         " count(*) FILTER (WHERE l.role = 'answer' AND l.guard_outcome @> '[{\"action\": \"redact\"}]')")
_FIELDS = ("spend_usd", "input_tokens", "output_tokens", "cached_tokens", "requests", "errors", "cache_hits",
           "cache_saved_usd", "failed_attempts", "shadow_usd", "guard_blocked", "guard_fallbacks", "guard_redacted")
_MONEY = frozenset({"spend_usd", "cache_saved_usd", "shadow_usd"})


@dataclass(frozen=True)
class ReportQuery:
    start: datetime
    end: datetime
    group_by: str
    tenant_ids: list[int] | None  # None: every tenant (admin)


def _parse_time(value: str | None, param: str, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' must be an ISO date or date-time, e.g. 2026-11-01", param=param) from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def build_query(pool: AsyncConnectionPool, principal: Principal, *, start: str | None, end: str | None,
                      group_by: str, tenant: str | None,
                      roles: tuple[str, ...] = ("finance", "admin")) -> ReportQuery:
    """The report's window and tenants; keys of ``roles`` other than admin see their own tenant only."""
    if principal.role not in roles:
        raise PermissionDenied(f"This report needs a key of role {' or '.join(roles)}.", code="role_not_allowed")
    if group_by not in GROUPS:
        raise InvalidRequest(f"'group_by' must be one of {', '.join(GROUPS)}", param="group_by")
    now = datetime.now(UTC)
    end_at = _parse_time(end, "to", now)
    if end is not None and len(end) == 10:
        end_at += timedelta(days=1)  # a date as 'to' includes that whole day
    start_at = _parse_time(start, "from", end_at - timedelta(days=30))
    if start_at >= end_at:
        raise InvalidRequest("'from' must be before 'to'", param="from")
    if principal.role != "admin":
        if group_by == "tenant" or (tenant is not None and tenant != principal.tenant):
            raise PermissionDenied("A finance key sees its own tenant only.", code="tenant_not_allowed")
        return ReportQuery(start_at, end_at, group_by, [principal.tenant_id])
    if tenant is None:
        return ReportQuery(start_at, end_at, group_by, None)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant,))
        row = await cur.fetchone()
    if row is None:
        raise InvalidRequest(f"tenant {tenant!r} does not exist", param="tenant", code="tenant_not_found")
    return ReportQuery(start_at, end_at, group_by, [int(row[0])])


def _where(q: ReportQuery) -> tuple[str, list[Any]]:
    where = "l.created_at >= %s AND l.created_at < %s"
    params: list[Any] = [q.start, q.end]
    if q.tenant_ids is not None:
        where += " AND l.tenant_id = ANY(%s)"
        params.append(q.tenant_ids)
    return where, params


def _numbers(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_FIELDS, row, strict=True))
    return {k: (str(Decimal(v).normalize() if v else Decimal(0)) if k in _MONEY else int(v)) for k, v in out.items()}


async def cost_report(pool: AsyncConnectionPool, q: ReportQuery) -> dict[str, Any]:
    where, params = _where(q)
    source = _FROM.get(q.group_by, "ledger l")
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT {_EXPR[q.group_by]} AS grp, {_SUMS} FROM {source} WHERE {where}"
                                 " GROUP BY grp ORDER BY grp", params)
        groups = [{"group": r[0], **_numbers(r[1:])} for r in await cur.fetchall()]
        cur = await conn.execute(f"SELECT {_SUMS} FROM ledger l WHERE {where}", params)
        totals = _numbers(await cur.fetchone() or ())
        if q.tenant_ids is not None and len(q.tenant_ids) == 1 and q.group_by in ("key", "user", "day"):
            await _budget_use(conn, q, groups)
    return {"object": "cost_report", "currency": "USD", "from": q.start.isoformat(), "to": q.end.isoformat(),
            "group_by": q.group_by, "groups": groups, "totals": totals}


async def _budget_use(conn: Any, q: ReportQuery, groups: list[dict[str, Any]]) -> None:
    """Per group, the budgets that apply to it: their limit and what the ledger says is used in the
    current window (for day groups: the tenant's daily budget against that day's spend)."""
    assert q.tenant_ids is not None
    tid = q.tenant_ids[0]
    budgets = (await load_rules(conn, tid)).budgets
    now = datetime.now(UTC)
    scope = {"key": "key", "user": "user", "day": "tenant"}[q.group_by]
    for group in groups:
        uses = []
        for budget in budgets:
            if budget.scope != scope or budget.limit_usd is None:
                continue
            if scope != "tenant" and budget.subject not in (EACH, group["group"]):
                continue
            if q.group_by == "day":
                if budget.period != "day":
                    continue
                used = Decimal(group["spend_usd"])
            else:
                used, _, _ = await ledger_usage(conn, budget, group["group"], *window(budget.period, now).bounds())
            uses.append({"budget_id": budget.id, "window": budget.period, "limit_usd": str(budget.limit_usd),
                         "used_usd": str(used.normalize() if used else Decimal(0)),
                         "used_pct": float(round(used / budget.limit_usd * 100, 2)) if budget.limit_usd else None})
        group["budgets"] = uses


def to_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["group_by", "group", "from", "to", *_FIELDS])
    for g in report["groups"]:
        writer.writerow([report["group_by"], g["group"], report["from"], report["to"], *(g[f] for f in _FIELDS)])
    writer.writerow([report["group_by"], "TOTAL", report["from"], report["to"],
                     *(report["totals"][f] for f in _FIELDS)])
    return out.getvalue()
