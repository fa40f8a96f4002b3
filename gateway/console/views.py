"""What the Costs page shows, as plain data: the page, its CSV download and its JSON download are this
one view, so they always agree."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tollway.errors import InvalidRequest
from tollway.gateway.console.queries import daily, key_labels
from tollway.gateway.metering.reports import (
    CSV_COLUMNS,
    CSV_FIELDS,
    MONEY_FIELDS,
    CSVWriter,
    build_query,
    csv_rows,
    default_period,
    grouped,
    parse_instant,
    snapshot,
    top_tier,
    totals,
)
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.roles import Can, may

TOP = 20  # rows per table before the rest are summed into one "(N others)" row


SECTIONS = (("model", "Model"), ("tier", "Tier"), ("route", "Route kind"), ("role", "Ledger role"),
            ("endpoint", "Endpoint"), ("key", "Key"), ("user", "End user"), ("tag", "Tag"), ("prompt", "Prompt version"))


COLUMNS = ("spend_usd", "requests", "errors", "input_tokens", "output_tokens", "cache_hits", "cache_saved_usd",
           "routing_saved_usd", "failed_attempts")


MONEY = MONEY_FIELDS


def _period(params: Any) -> tuple[str, str]:
    """The period as the API takes it (``parse_instant``: ISO dates, both days included, or date-times, UTC
    unless they say), shown as dates or as UTC date-times to the second; default: the current month so far."""
    today = datetime.now(UTC).date()
    first, last = default_period(datetime.now(UTC))
    out = []
    for value, name in ((params.get("from") or first.isoformat(), "from"), (params.get("to") or last.isoformat(), "to")):
        try:
            instant = parse_instant(value)
        except ValueError:
            raise InvalidRequest(f"'{name}' must be a date such as {today.isoformat()} or a date-time such as "
                                 f"{today.isoformat()}T09:30", param=name) from None
        out.append(value if len(value) == 10 else instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return out[0], out[1]


async def costs_view(state: Any, principal: Principal, params: Any) -> dict[str, Any]:
    """Everything the Costs page shows, as plain data (the page, its CSV and its JSON are this)."""
    start, end = _period(params)
    tenant = params.get("tenant") or None
    stack = params.get("stack") if params.get("stack") in ("model", "tier") else "model"
    q = await build_query(state.pool, principal, start=start, end=end, group_by="day", tenant=tenant,
                          top_tier=top_tier(state.catalog))
    async with snapshot(state.pool) as conn:  # the tables add up to the total
        total = await totals(conn, q)
        sections: list[dict[str, Any]] = []
        for group, title in SECTIONS:
            rows = await grouped(conn, q, group)
            if group == "key":
                rows = await key_labels(conn, rows)
            sections.append({"group": group, "title": title, "rows": _top(rows)})
        days, series, values = await daily(conn, q, stack)
    by_model = next(sec["rows"] for sec in sections if sec["group"] == "model")
    # models without a price now that answered in the period (from the rollup's per-model rows: no ledger scan)
    free = set(state.catalog.unpriced())
    unpriced = [{"model": r["group"], "requests": r["requests"]} for r in by_model
                if r["group"] in free and r["requests"]]
    return {"unpriced": unpriced,
            "tenant": tenant if may(principal.role, Can.ADMINISTER) else principal.tenant, "from": start, "to": end,
            "period": {"from": q.start.isoformat(), "to": q.end.isoformat()},
            "stack": stack, "currency": "USD", "totals": total, "sections": sections,
            "daily": {"days": days, "series": series,
                      "spend_usd": {f"{d}|{s}": str(v) for (d, s), v in values.items()}}}


def _top(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The TOP biggest spenders, the rest summed in one row (so a table always adds up to the total)."""
    rows = sorted(rows, key=lambda r: (-Decimal(r["spend_usd"]), r["group"]))
    if len(rows) <= TOP + 1:
        return rows
    rest = rows[TOP:]
    other: dict[str, Any] = {"group": f"({len(rest)} others)"}
    for field in CSV_FIELDS:
        if field in MONEY:
            other[field] = str(sum((Decimal(r[field]) for r in rest), Decimal(0)).normalize())
        else:
            other[field] = sum(int(r[field]) for r in rest)
    return [*rows[:TOP], other]


def costs_csv(view: dict[str, Any]) -> str:
    """The page's tables in the cost report's one CSV shape (``reports.CSV_COLUMNS``): each table is what
    ``GET /v1/reports/costs?group_by=...&format=csv`` answers for the same period, one after the other;
    then the daily series (``group_by`` ``day_by_model`` or ``day_by_tier``: spend only)."""
    out = io.StringIO()
    writer = CSVWriter(out)
    writer.writerow(CSV_COLUMNS)
    start, end = view["period"]["from"], view["period"]["to"]
    for section in view["sections"]:
        writer.writerows(csv_rows(section["group"], section["rows"], view["totals"], start, end))
    daily = view["daily"]
    blank = [""] * (len(CSV_FIELDS) - 1)
    for day in daily["days"]:
        for name in daily["series"]:
            value = daily["spend_usd"].get(f"{day}|{name}")
            if value is not None:
                writer.writerow([f"day_by_{view['stack']}", f"{day} {name}", start, end, value, *blank])
    return out.getvalue()
