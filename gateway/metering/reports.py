"""Cost reports for finance, straight from the ledger: spend, tokens and requests per group, with the
use of the budgets that apply. Totals are one ``SUM`` over the same rows, so they equal the ledger
to the last decimal; amounts travel as decimal strings, never floats."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tollway.errors import InvalidRequest, PermissionDenied
from tollway.gateway.metering import GROUPS
from tollway.gateway.metering.quota import window
from tollway.gateway.metering.reconcile import ledger_usage
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import EACH, load_rules
from tollway.gateway.tenancy.roles import Can, may, require, roles_that
from tollway.routing import Catalog

# The route kind (ledger_route_kind in migration 0011); 'auto' splits into auto-large (the top tier) and
# auto-small here, where the top tier is known.
_ROUTE_KIND = "ledger_route_kind(l.role, l.cache_hit, l.degraded, l.attempt, l.route_reason)"
_EXPR = {
    "day": "to_char(l.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "coalesce(l.model, '(none)')",
    "tier": "coalesce(l.tier, '')",
    "key": "l.key_id::text",
    "user": "coalesce(l.end_user, '(none)')",
    "tag": "t.tag",
    "prompt": "coalesce(l.prompt_name || '@' || l.prompt_version, '(none)')",
    "route": f"{_ROUTE_KIND} || '/' || coalesce(l.tier, '')",
    "role": "l.role",
    "endpoint": "l.endpoint",
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
         " count(*) FILTER (WHERE l.role = 'answer' AND l.guard_outcome @> '[{\"action\": \"redact\"}]'),"
         " coalesce(sum(l.cost_usd) FILTER (WHERE l.role = 'answer' AND NOT l.cache_hit AND l.status < 400), 0),"
         " coalesce(sum(l.baseline_usd), 0)")
_SUMMED = ("spend_usd", "input_tokens", "output_tokens", "cached_tokens", "requests", "errors", "cache_hits",
           "cache_saved_usd", "failed_attempts", "shadow_usd", "guard_blocked", "guard_fallbacks", "guard_redacted",
           "served_usd", "top_tier_usd")
# The same sums from the daily rollup (ledger_daily: one row per day, tenant and dimension value).
_ROLLED = ", ".join(f"coalesce(sum(r.{c}), 0)" for c in (*_SUMMED[:-1], "baseline_usd"))
# What a report shows per group: the sums, and what routing saved (the served answers at the top tier's
# prices minus what they cost).
_FIELDS = (*_SUMMED[:13], "top_tier_usd", "routing_saved_usd")
_MONEY = frozenset({"spend_usd", "cache_saved_usd", "shadow_usd", "served_usd", "top_tier_usd",
                    "routing_saved_usd"})
# Report groups read from which rollup dimension, by which column.
_ROLLUP = {"day": ("model", "r.day::text"), "model": ("model", "r.value"), "tier": ("model", "r.tier"),
           "tenant": ("model", "tn.name"), "key": ("key", "r.value"), "user": ("user", "r.value"),
           "tag": ("tag", "r.value"), "prompt": ("prompt", "r.value"), "route": ("route", "r.value || '/' || r.tier"),
           "role": ("role", "r.value"), "endpoint": ("endpoint", "r.value")}


@dataclass(frozen=True)
class ReportQuery:
    start: datetime
    end: datetime
    group_by: str
    tenant_ids: list[int] | None  # None: every tenant (admin)
    top_tier: str | None = None  # the catalog's top tier: route kind 'auto' splits by it

    @property
    def whole_days(self) -> bool:
        """Both ends at midnight UTC: the daily rollup answers (the same sums, read from far fewer rows)."""
        return all(t.astimezone(UTC).time() == time() for t in (self.start, self.end))

    def parts(self) -> list[tuple[ReportQuery, int]]:
        """The window as sums to add (+1) or take away (-1), each over whole UTC days (read from the rollup)
        or a part of one day (read from the ledger): the whole days inside it; for a part day at either end,
        the part itself when it is at most half the day, else the whole day less the rest of it. Any window
        then reads at most half a day of ledger rows at each end."""
        if self.whole_days:
            return [(self, 1)]
        first, last = _midnight(self.start), _midnight(self.end)
        if first == last:
            return self._part_day(first, self.start, self.end)
        out: list[tuple[ReportQuery, int]] = []
        whole_from = first
        if self.start > first:
            whole_from = first + timedelta(days=1)
            out += self._part_day(first, self.start, whole_from)
        if last > whole_from:
            out.append((dataclasses.replace(self, start=whole_from, end=last), 1))
        if self.end > last:
            out += self._part_day(last, last, self.end)
        return out

    def _part_day(self, day: datetime, a: datetime, b: datetime) -> list[tuple[ReportQuery, int]]:
        nxt = day + timedelta(days=1)
        if b - a <= timedelta(hours=12):
            return [(dataclasses.replace(self, start=a, end=b), 1)]
        rest = [(x, y) for x, y in ((day, a), (b, nxt)) if x < y]
        return [(dataclasses.replace(self, start=day, end=nxt), 1),
                *((dataclasses.replace(self, start=x, end=y), -1) for x, y in rest)]


def _midnight(t: datetime) -> datetime:
    return datetime.combine(t.astimezone(UTC).date(), time(), UTC)


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
MAX_WINDOW = timedelta(days=3700)  # a report covers at most about ten years


def parse_instant(value: str) -> datetime:
    """A report bound: an ISO date (its midnight, UTC) or date-time (UTC unless it names a zone). ValueError
    when it is neither. The API, the CLI and the console read a period through this."""
    if len(value) == 10:
        return datetime.combine(date.fromisoformat(value), time(), UTC)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _parse_time(value: str | None, param: str, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = parse_instant(value)
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' must be an ISO date or date-time, e.g. 2026-11-01", param=param) from exc
    if not EARLIEST <= parsed < LATEST:
        raise InvalidRequest(f"'{param}' must be between 1970 and 2999", param=param)
    return parsed


def default_period(now: datetime) -> tuple[date, date]:
    """The period a report covers when it is not told: the current calendar month (UTC) so far, both days
    included. The API, the CLI and the console all use this one."""
    today = now.astimezone(UTC).date()
    return today.replace(day=1), today


async def build_query(pool: AsyncConnectionPool, principal: Principal, *, start: str | None, end: str | None,
                      group_by: str, tenant: str | None, top_tier: str | None = None,
                      can: Can = Can.READ_COSTS) -> ReportQuery:
    """The report's window and tenants; keys with ``can`` other than admin see their own tenant only."""
    require(principal.role, can, f"This report needs a key of role {' or '.join(roles_that(can))}.")
    if group_by not in GROUPS:
        raise InvalidRequest(f"'group_by' must be one of {', '.join(GROUPS)}", param="group_by")
    first, last = default_period(datetime.now(UTC))
    end = end or last.isoformat()
    end_at = _parse_time(end, "to", datetime.now(UTC))
    if len(end) == 10:
        end_at += timedelta(days=1)  # a date as 'to' includes that whole day
    start_at = _parse_time(start, "from", datetime.combine(first, time(), UTC))
    if start_at >= end_at:
        raise InvalidRequest("'from' must be before 'to'", param="from")
    if end_at - start_at > MAX_WINDOW:
        raise InvalidRequest(f"a report covers at most {MAX_WINDOW.days} days", param="from")
    if not may(principal.role, Can.ADMINISTER):
        if group_by == "tenant" or (tenant is not None and tenant != principal.tenant):
            raise PermissionDenied("A finance key sees its own tenant only.", code="tenant_not_allowed")
        return ReportQuery(start_at, end_at, group_by, [principal.tenant_id], top_tier)
    if tenant is None:
        return ReportQuery(start_at, end_at, group_by, None, top_tier)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant,))
        row = await cur.fetchone()
    if row is None:
        raise InvalidRequest(f"tenant {tenant!r} does not exist", param="tenant", code="tenant_not_found")
    return ReportQuery(start_at, end_at, group_by, [int(row[0])], top_tier)


def _where(q: ReportQuery, alias: str = "l", column: str = "created_at") -> tuple[str, list[Any]]:
    params: list[Any]
    if column == "day":
        where, params = f"{alias}.day >= %s AND {alias}.day < %s", [q.start.date(), q.end.date()]
    else:
        where, params = f"{alias}.{column} >= %s AND {alias}.{column} < %s", [q.start, q.end]
    if q.tenant_ids is not None:
        where += f" AND {alias}.tenant_id = ANY(%s)"
        params.append(q.tenant_ids)
    return where, params


def _numbers(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_SUMMED, row, strict=True))
    out["routing_saved_usd"] = Decimal(out["top_tier_usd"]) - Decimal(out.pop("served_usd"))
    return {k: _money(Decimal(v or 0)) if k in _MONEY else int(v) for k, v in out.items()}


def top_tier(catalog: Catalog) -> str | None:
    return catalog.tiers[0].name if catalog.tiers else None


def route_label(kind_and_tier: str, top_tier: str | None) -> str:
    """'auto/large' -> 'auto-large' when large is the top tier, else 'auto-small'; other kinds as they are."""
    kind, _, tier = kind_and_tier.partition("/")
    if kind == "auto":
        return "auto-large" if top_tier is not None and tier == top_tier else "auto-small"
    return kind.replace("_", "-")


def _signed(numbers: dict[str, Any], sign: int) -> dict[str, Any]:
    """Sums to take away (a whole day's, less what lies outside the window) as negative numbers."""
    if sign == 1:
        return numbers
    return {k: _money(-Decimal(v)) if k in _MONEY else -v for k, v in numbers.items()}


def _money(amount: Decimal) -> str:
    return str(amount.normalize()) if amount else "0"  # never "-0" or "0E-10"


def _merge(groups: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Groups with the same label summed (route kinds of several tiers), in label order."""
    merged: dict[str, dict[str, Any]] = {}
    for label, numbers in groups:
        if label in merged:
            into = merged[label]
            for k, v in numbers.items():
                into[k] = _money(Decimal(into[k]) + Decimal(v)) if k in _MONEY else into[k] + v
        else:
            merged[label] = dict(numbers)
    return [{"group": k, **merged[k]} for k in sorted(merged)]


async def grouped(conn: Any, q: ReportQuery, group_by: str) -> list[dict[str, Any]]:
    """One group per value of ``group_by`` with its sums: whole UTC days from the daily rollup, part days
    from the ledger (the same numbers either way), added up."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for part, sign in q.parts():
        rows += [(label, _signed(numbers, sign)) for label, numbers in await _grouped_part(conn, part, group_by)]
    return [g for g in _merge(rows) if any(Decimal(v) != 0 for k, v in g.items() if k != "group")]


async def _grouped_part(conn: Any, q: ReportQuery, group_by: str) -> list[tuple[str, dict[str, Any]]]:
    if q.whole_days:
        dim, expr = _ROLLUP[group_by]
        where, params = _where(q, "r", "day")
        source = "ledger_daily r" + (" JOIN tenants tn ON tn.id = r.tenant_id" if group_by == "tenant" else "")
        sql = f"SELECT {expr} AS grp, {_ROLLED} FROM {source} WHERE r.dim = %s AND {where} GROUP BY grp"
        params = [dim, *params]
    else:
        where, params = _where(q)
        sql = (f"SELECT {_EXPR[group_by]} AS grp, {_SUMS} FROM {_FROM.get(group_by, 'ledger l')} WHERE {where}"
               " GROUP BY grp")
    cur = await conn.execute(sql, params)
    rows = [(str(r[0]), _numbers(r[1:])) for r in await cur.fetchall()]
    if group_by == "route":
        rows = [(route_label(label, q.top_tier), numbers) for label, numbers in rows]
    elif group_by == "tier":
        rows = [(label or "(none)", numbers) for label, numbers in rows]
    return rows


async def totals(conn: Any, q: ReportQuery) -> dict[str, Any]:
    parts = []
    for part, sign in q.parts():
        if part.whole_days:
            where, params = _where(part, "r", "day")
            cur = await conn.execute(f"SELECT {_ROLLED} FROM ledger_daily r WHERE r.dim = 'model' AND {where}",
                                     params)
        else:
            where, params = _where(part)
            cur = await conn.execute(f"SELECT {_SUMS} FROM ledger l WHERE {where}", params)
        parts.append(("", _signed(_numbers(await cur.fetchone() or ()), sign)))
    [total] = _merge(parts)  # one label: the parts added up
    del total["group"]
    return total


@asynccontextmanager
async def snapshot(pool: AsyncConnectionPool) -> AsyncIterator[Any]:
    """A connection whose every statement reads one snapshot of the ledger: a report reads its groups and
    its totals in several statements, and rows the ledger writes meanwhile (in the background) are then in
    all of them or in none, so the groups always add up to the totals."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn


async def cost_report(pool: AsyncConnectionPool, q: ReportQuery) -> dict[str, Any]:
    async with snapshot(pool) as conn:
        groups = await grouped(conn, q, q.group_by)
        total = await totals(conn, q)
        if q.tenant_ids is not None and len(q.tenant_ids) == 1 and q.group_by in ("key", "user", "day"):
            await _budget_use(conn, q, groups)
    return {"object": "cost_report", "currency": "USD", "from": q.start.isoformat(), "to": q.end.isoformat(),
            "group_by": q.group_by, "groups": groups, "totals": total}


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


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run: text that starts with a formula character gets a leading ``'``
    (OWASP's CSV-injection advice). Numbers are left as they are; every CSV the product writes uses this."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class CSVWriter:
    """``csv.writer`` whose every cell goes through ``csv_cell``."""

    def __init__(self, out: io.StringIO) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n")

    def writerow(self, row: Sequence[Any]) -> None:
        self._writer.writerow([csv_cell(v) for v in row])

    def writerows(self, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.writerow(row)


# The one CSV shape of a cost report, for the API, the CLI and the console: a row per group, then the TOTAL
# row of that grouping. The console writes one such table per table on its page, one after the other.
CSV_FIELDS = _FIELDS
CSV_COLUMNS = ("group_by", "group", "from", "to", *CSV_FIELDS)
MONEY_FIELDS = _MONEY


def csv_rows(group_by: str, groups: list[dict[str, Any]], total: dict[str, Any], start: str,
             end: str) -> list[list[Any]]:
    rows = [[group_by, g["group"], start, end, *(g.get(f, "") for f in CSV_FIELDS)] for g in groups]
    return [*rows, [group_by, "TOTAL", start, end, *(total[f] for f in CSV_FIELDS)]]


def to_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = CSVWriter(out)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(report["group_by"], report["groups"], report["totals"], report["from"], report["to"]))
    return out.getvalue()
