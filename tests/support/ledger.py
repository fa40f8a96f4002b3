"""Seeded ledger rows, as the ledger writer inserts them (models, users, tags, prompts, route kinds, failed
attempts, cache hits, shadow samples over the last days), and the spend the ledger holds."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg

ROUTES = ["requested", "auto:difficulty=0.9;target=sim-large", "auto:difficulty=0.1;target=sim-small"]


def seed(pg_url: str, tenant: Any, days: int = 3, rows: int = 240, seed_: int = 7) -> None:
    """Ledger rows over the last ``days`` days: models, users, tags, prompts, route kinds, failed attempts,
    cache hits, shadow samples; inserted in several batches like the ledger writer does."""
    rnd = random.Random(seed_)
    now = datetime.now(UTC)
    batch = []
    for i in range(rows):
        day = now.date() - timedelta(days=i % days)
        at = datetime.combine(day, time(hour=rnd.randrange(0, max(now.hour, 1)), minute=rnd.randrange(60)), UTC)
        model = rnd.choice(["sim-large", "sim-small"])
        tier = "large" if model == "sim-large" else "small"
        role = rnd.choices(["answer", "attempt", "shadow"], [8, 1, 1])[0]
        cost = Decimal(rnd.randrange(1, 10_000)) / Decimal(1_000_000)
        cache = role == "answer" and rnd.random() < 0.1
        batch.append((f"seed-{tenant.name}-{i}", at, tenant.id, tenant.key_id, rnd.choice(["u1", "u2", None]),
                      "chat.completions", model, tier, rnd.choice(ROUTES), role, 2 if role == "attempt" else 1,
                      Decimal(0) if cache else cost, Decimal("0.001") if cache else Decimal(0), cache,
                      rnd.randrange(10, 500), rnd.randrange(1, 200), 200 if rnd.random() < 0.95 else 502,
                      rnd.choice([["search"], ["search", "beta"], None]), rnd.choice(["faq", None]), "3",
                      cost * 3 if role == "answer" and not cache else Decimal(0)))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for k in range(0, len(batch), 50):
            conn.cursor().executemany(
                "INSERT INTO ledger (request_id, created_at, tenant_id, key_id, end_user, endpoint, model, tier,"
                " route_reason, role, attempt, cost_usd, saved_usd, cache_hit, input_tokens, output_tokens, status,"
                " tags, prompt_name, prompt_version, latency_ms, baseline_usd)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 12, %s)",
                batch[k:k + 50])


def ledger_spend(pg_url: str, tenant_id: int, start: date, end: date) -> Decimal:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT coalesce(sum(cost_usd), 0) FROM ledger WHERE tenant_id = %s AND role <> 'shadow'"
                           " AND created_at >= %s AND created_at < %s",
                           (tenant_id, start, end + timedelta(days=1))).fetchone()
    assert row is not None
    return Decimal(row[0])
