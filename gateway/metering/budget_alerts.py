"""Budget use and budget alerts: each budget's use in its current window, from the ledger (what finance
trusts; whole-day windows from its daily rollup), against thresholds of its limit (by default 80% and 100%,
per budget if it says so) and a forecast (the window's rate so far carried to its end exceeds the limit).
Each alert fires at most once per budget, subject, threshold and window (``tollway.infra.alerts``: stored,
counted, and sent to the webhook if one is set).

A periodic job (``TOLLWAY_BUDGET_ALERT_INTERVAL_S``) runs ``check_budgets``; the console's Budgets page and
the ``tollway_budget_use_ratio`` metric read the same ``budget_uses``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tollway.gateway.metering.quota import Window, window
from tollway.gateway.metering.reconcile import ledger_usage, subjects
from tollway.gateway.tenancy.policy import EACH, Budget, load_rules
from tollway.infra.alerts import raise_alert

FORECAST_AFTER = 0.1  # share of the window that must have passed before a forecast is trusted


@dataclass(frozen=True)
class BudgetUse:
    tenant: str
    budget: Budget
    subject: str
    window: Window
    start: datetime  # the window's start, or the budget's reset within it
    end: datetime
    usd: Decimal
    tokens: int
    share: float  # the larger of the USD and token shares of the limit
    used: str
    limit: str

    @property
    def window_text(self) -> str:
        return self.window.describe(self.budget.period)

    @property
    def who(self) -> str:
        base = self.budget.describe(self.tenant)
        return base if not self.subject or self.budget.subject != EACH else f"{base} ({self.budget.scope} {self.subject})"

    def forecast(self, now: datetime) -> float | None:
        """The share of the limit at the window's end if the rate so far goes on; None when the window has
        no end (lifetime) or too little of it has passed to tell."""
        if self.window.start is None:
            return None
        elapsed, length = (now - self.start).total_seconds(), (self.end - self.start).total_seconds()
        if elapsed <= 0 or length <= 0 or elapsed / length < FORECAST_AFTER:
            return None
        return self.share * length / elapsed

    def evidence(self) -> dict[str, Any]:
        return {"budget_id": self.budget.id, "subject": self.subject, "window": self.window.label,
                "used": self.used, "limit": self.limit, "share": round(self.share, 4)}


def _use(budget: Budget, usd: Decimal, tokens: int) -> tuple[float, str, str]:
    """The larger of the USD and token shares of the limit, and both sides as text: every limit the budget
    has, dollars to the micro-dollar and tokens, grouped by thousands."""
    shares, used, limits = [], [], []
    if budget.limit_usd is not None:
        shares.append(float(usd / budget.limit_usd) if budget.limit_usd else float(usd > 0))
        used.append(f"${usd:,.6f}")
        limits.append(f"${budget.limit_usd:,.6f}")
    if budget.limit_tokens is not None:
        shares.append(tokens / budget.limit_tokens if budget.limit_tokens else float(tokens > 0))
        used.append(f"{tokens:,} tokens")
        limits.append(f"{budget.limit_tokens:,} tokens")
    return (max(shares) if shares else 0.0), " · ".join(used), " · ".join(limits)


async def budget_uses(conn: Any, now: datetime, tenant_ids: list[int] | None = None) -> AsyncIterator[BudgetUse]:
    """Every budget (of these tenants) and subject in its current window, with what it used."""
    if tenant_ids is None:
        cur = await conn.execute("SELECT DISTINCT tenant_id FROM budgets ORDER BY tenant_id")
        tenant_ids = [int(r[0]) for r in await cur.fetchall()]
    for tid in tenant_ids:
        rules = await load_rules(conn, tid)
        if not rules.budgets:
            continue
        cur = await conn.execute("SELECT name FROM tenants WHERE id = %s", (tid,))
        name_row = await cur.fetchone()
        tenant = str(name_row[0]) if name_row else str(tid)
        for budget in rules.budgets:
            win = window(budget.period, now)
            start, end = win.bounds()
            if budget.reset_at is not None and budget.reset_at > start:
                start = budget.reset_at
            for subject in await subjects(conn, budget, start, end):
                usd, tokens, _ = await ledger_usage(conn, budget, subject, start, end)
                share, used, limit = _use(budget, usd, tokens)
                yield BudgetUse(tenant, budget, subject, win, start, end, usd, tokens, share, used, limit)


async def check_budgets(pool: AsyncConnectionPool, defaults: tuple[tuple[float, ...], bool] = ((0.8, 1.0), True), *,
                        now: datetime | None = None, on_alert: Callable[[str], None] | None = None) -> int:
    """One pass over every budget; the number of alerts raised. ``defaults``: thresholds and forecast for
    budgets that set none."""
    now = now or datetime.now(UTC)
    raised = 0
    async with pool.connection() as conn:
        async for use in budget_uses(conn, now):
            budget, subject, label = use.budget, use.subject, use.window.label
            thresholds, forecast = budget.alerts(defaults)
            for t in thresholds:
                if use.share >= t and await raise_alert(
                        conn, tenant_id=budget.tenant_id, kind="budget", subject=str(budget.id),
                        dedupe_key=f"budget:{budget.id}:{subject}:{t:g}:{label}",
                        message=f"{use.who} is at {use.share:.0%} of its limit ({use.used} of {use.limit})",
                        evidence={**use.evidence(), "threshold": t}) is not None:
                    raised += 1
                    if on_alert is not None:
                        on_alert("budget")
            projected = use.forecast(now) if forecast and use.share < 1 else None
            if projected is not None and projected > 1 and await raise_alert(
                    conn, tenant_id=budget.tenant_id, kind="budget", subject=str(budget.id),
                    dedupe_key=f"budget:{budget.id}:{subject}:forecast:{label}",
                    message=f"{use.who} is on course for {projected:.0%} of its limit by the end of the window",
                    evidence={**use.evidence(), "forecast_share": round(projected, 4),
                              "window_elapsed": round((now - use.start) / (use.end - use.start), 4)}) is not None:
                raised += 1
                if on_alert is not None:
                    on_alert("budget_forecast")
    return raised
