"""What an admission tells the client and the router: rate-limit headers (OpenAI's names), the tightest
budget's remaining USD, and the smallest share left of any budget (the router's headroom signal)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from tollway.gateway.metering.quota.counters import REQ, TOK, USD, Counter, from_nano


def headroom(counters: list[Counter], used: list[int]) -> float | None:
    shares = [max(0, limit - used[3 * i + dim]) / limit
              for i, counter in enumerate(counters) if counter.budget is not None
              for dim, limit in ((USD, counter.limits[USD]), (TOK, counter.limits[TOK])) if limit > 0]
    return min(shares) if shares else None


def rate_headers(counters: list[Counter], used: list[int], now: datetime) -> dict[str, str]:
    headers: dict[str, str] = {}
    tightest: Decimal | None = None
    for i, counter in enumerate(counters):
        if counter.parallel:  # not a rate: OpenAI's names would read as one
            continue
        if counter.budget is not None:
            if counter.limits[USD] >= 0:
                left = from_nano(max(0, counter.limits[USD] - used[3 * i + USD]))
                tightest = left if tightest is None else min(tightest, left)
            continue
        reset = "0s" if counter.reset_at is None else f"{max(0, (counter.reset_at - now).total_seconds()):.0f}s"
        for dim, word in ((REQ, "requests"), (TOK, "tokens")):
            limit = counter.limits[dim]
            if limit < 0 or (f"x-ratelimit-limit-{word}" in headers and counter.rate_scope == "tenant"):
                continue
            headers[f"x-ratelimit-limit-{word}"] = str(limit)
            headers[f"x-ratelimit-remaining-{word}"] = str(max(0, limit - used[3 * i + dim]))
            headers[f"x-ratelimit-reset-{word}"] = reset
    if tightest is not None:
        headers["x-tollway-budget-remaining"] = f"{tightest:.6f}"
    return headers
