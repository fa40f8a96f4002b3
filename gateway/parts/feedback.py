"""Feedback on answers: a score and/or a label for one request of the tenant, stored with the prompt version
and model the ledger says answered it, and the report per prompt version or model."""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tollway.errors import NotFound
from tollway.gateway.chat.wire import REQUEST_ID
from tollway.gateway.metering.ledger import Ledger
from tollway.gateway.metering.reports import ReportQuery
from tollway.gateway.tenancy.keys import Principal


async def answered_by(pool: AsyncConnectionPool, ledger: Ledger, tenant_id: int,
                      request_id: str) -> tuple[str | None, str | None, str | None]:
    """(prompt name, prompt version, model) of one of the tenant's answers; waits briefly for a row still on
    its way (the ledger writes in batches; another replica's may come a moment later). Another tenant's
    request is as unknown as one that never was."""
    attempts = 8 if REQUEST_ID.fullmatch(request_id) else 0  # (another shape: unknown, without a look)
    for attempt in range(attempts):
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT prompt_name, prompt_version, model FROM ledger WHERE request_id = %s AND tenant_id = %s"
                " AND role = 'answer' LIMIT 1", (request_id, tenant_id))
            row = await cur.fetchone()
        if row is not None:
            return row[0], row[1], row[2]
        if attempt == 0:
            await ledger.flush()
        else:
            await asyncio.sleep(0.25)
    raise NotFound(f"No request {request_id} of this tenant.", param="request_id", code="request_not_found")


async def record(pool: AsyncConnectionPool, principal: Principal, request_id: str, score: float | None,
                 label: str | None, comment: str | None,
                 answer: tuple[str | None, str | None, str | None]) -> tuple[int, Any]:
    """Store one feedback row; (its id, created at)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO feedback (tenant_id, key_id, request_id, score, label, comment, prompt_name, prompt_version,"
            " model) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id, created_at",
            (principal.tenant_id, principal.key_id, request_id, score, label, comment, *answer))
        created = await cur.fetchone()
    assert created is not None
    return int(created[0]), created[1]


async def report(pool: AsyncConnectionPool, query: ReportQuery, group_by: str) -> list[dict[str, Any]]:
    """Per prompt version (or model): feedback count, mean score over the scored ones, label counts."""
    expr = "coalesce(prompt_name || '@' || prompt_version, '(no prompt)')" if group_by == "prompt_version" \
        else "coalesce(model, '(none)')"
    tenants = query.tenant_ids
    async with pool.connection() as conn:
        cur = await conn.execute(
            # per group and label first, then per group: each label counted once, scores averaged over all
            f"SELECT grp, sum(n)::bigint, sum(total) / nullif(sum(scored), 0), sum(scored)::bigint,"
            f" coalesce(jsonb_object_agg(label, n) FILTER (WHERE label IS NOT NULL), '{{}}')"
            f" FROM (SELECT {expr} AS grp, label, count(*) AS n, sum(score) AS total, count(score) AS scored"
            f" FROM feedback WHERE created_at >= %s AND created_at < %s"
            f" AND (%s::bigint[] IS NULL OR tenant_id = ANY(%s)) GROUP BY 1, 2) f"
            f" GROUP BY grp ORDER BY grp", (query.start, query.end, tenants, tenants))
        rows = await cur.fetchall()
    return [{"group": g, "feedback": n, "mean_score": None if avg is None else round(avg, 4), "scored": scored,
             "labels": labels} for g, n, avg, scored, labels in rows]
