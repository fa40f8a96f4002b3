"""Budget alerts: each budget's use in its current window, from the ledger (what finance trusts), against
thresholds of its limit (default 80% and 100%) and a forecast (the window's rate so far carried to its
end exceeds the limit). Each fires at most once per budget, subject, threshold and window
(``tollway.alerts``: stored, counted, and sent to the webhook if one is set).

A periodic job (``TOLLWAY_BUDGET_ALERT_INTERVAL_S``) runs ``check_budgets``; the thresholds are the
gateway's (``TOLLWAY_BUDGET_ALERTS``), the same for every budget so far.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tollway.alerts import raise_alert
from tollway.gateway.quota import window
from tollway.gateway.reconcile import ledger_usage, subjects
from tollway.gateway.tenant_policy import Budget, load_rules

FORECAST_AFTER = 0.1  # share of the window that must have passed before a forecast is trusted


def _use(budget: Budget, usd: Decimal, tokens: int) -> tuple[float, str, str]:
    """The larger of the USD and token shares of the limit, and both sides as text."""
    shares = []
    if budget.limit_usd:
        shares.append((float(usd / budget.limit_usd), f"${usd:.4f}", f"${budget.limit_usd}"))
    if budget.limit_tokens:
        shares.append((tokens / budget.limit_tokens, f"{tokens} tokens", f"{budget.limit_tokens} tokens"))
    return max(shares) if shares else (0.0, "", "")


async def check_budgets(pool: AsyncConnectionPool, thresholds: tuple[float, ...] = (0.8, 1.0), *,
                        forecast: bool = True, now: datetime | None = None,
                        on_alert: Callable[[str], None] | None = None) -> int:
    """One pass over every budget; the number of alerts raised."""
    now = now or datetime.now(UTC)
    raised = 0
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT tenant_id FROM budgets")
        for (tid,) in await cur.fetchall():
            rules = await load_rules(conn, int(tid))
            cur2 = await conn.execute("SELECT name FROM tenants WHERE id = %s", (tid,))
            name_row = await cur2.fetchone()
            tenant = str(name_row[0]) if name_row else str(tid)
            for budget in rules.budgets:
                win = window(budget.period, now)
                start, end = win.bounds()
                if budget.reset_at is not None and budget.reset_at > start:
                    start = budget.reset_at
                for subject in await subjects(conn, budget, start, end):
                    usd, tokens, _ = await ledger_usage(conn, budget, subject, start, end)
                    share, used, limit = _use(budget, usd, tokens)
                    who = budget.describe(tenant) if not subject or budget.subject != "*" else \
                        f"{budget.describe(tenant)} ({budget.scope} {subject})"
                    evidence: dict[str, Any] = {"budget_id": budget.id, "subject": subject, "window": win.label,
                                                "used": used, "limit": limit, "share": round(share, 4)}
                    for t in thresholds:
                        if share >= t and await raise_alert(
                                conn, tenant_id=budget.tenant_id, kind="budget", subject=str(budget.id),
                                dedupe_key=f"budget:{budget.id}:{subject}:{t:g}:{win.label}",
                                message=f"{who} is at {share:.0%} of its limit ({used} of {limit})",
                                evidence={**evidence, "threshold": t}) is not None:
                            raised += 1
                            if on_alert is not None:
                                on_alert("budget")
                    if not forecast or win.start is None or share >= 1:  # a lifetime budget has no end to forecast
                        continue
                    elapsed, length = (now - start).total_seconds(), (end - start).total_seconds()
                    if elapsed <= 0 or elapsed / length < FORECAST_AFTER:
                        continue
                    projected = share * length / elapsed
                    if projected > 1 and await raise_alert(
                            conn, tenant_id=budget.tenant_id, kind="budget", subject=str(budget.id),
                            dedupe_key=f"budget:{budget.id}:{subject}:forecast:{win.label}",
                            message=f"{who} is on course for {projected:.0%} of its limit by the end of the window",
                            evidence={**evidence, "forecast_share": round(projected, 4),
                                      "window_elapsed": round(elapsed / length, 4)}) is not None:
                        raised += 1
                        if on_alert is not None:
                            on_alert("budget_forecast")
    return raised
