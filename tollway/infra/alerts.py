"""Alerts: raised once per dedupe key (a threshold and its window), stored with their evidence, and
delivered to an optional webhook.

Delivery is a sweep over the undelivered rows (``FOR UPDATE SKIP LOCKED``, so replicas never send one
twice), retried with exponential backoff (1 s, 2 s, 4 s ... at most an hour apart) up to a number of
attempts; an alert that was never delivered stays visible with its last error. Each POST is signed:
``x-tollway-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the shared secret>``,
so a receiver can check both who sent it and that it is fresh.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tollway.jsontypes import JSON

log = logging.getLogger("tollway.infra.alerts")
_COLUMNS = "id, tenant_id, kind, subject, message, evidence, created_at, delivered_at, attempts, last_error"
_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))


def _alert(row: tuple[Any, ...]) -> JSON:
    return dict(zip(_NAMES, row, strict=True))


async def raise_alert(conn: psycopg.AsyncConnection[Any], *, tenant_id: int | None, kind: str, subject: str,
                      dedupe_key: str, message: str, evidence: JSON | None = None) -> int | None:
    """Store an alert unless one with this key exists; its id, or None when it was already raised."""
    cur = await conn.execute(
        "INSERT INTO alerts (tenant_id, kind, subject, dedupe_key, message, evidence)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        (tenant_id, kind, subject, dedupe_key, message, Jsonb(evidence or {})))
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def list_alerts(conn: psycopg.AsyncConnection[Any], tenant_id: int | None = None,
                      limit: int = 100, *, kind: str | None = None) -> list[JSON]:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE (%s::bigint IS NULL OR tenant_id = %s)"
                             " AND (%s::text IS NULL OR kind = %s) ORDER BY id DESC LIMIT %s",
                             (tenant_id, tenant_id, kind, kind, max(1, min(limit, 1000))))
    out = []
    for row in await cur.fetchall():
        item = _alert(row)
        for key in ("created_at", "delivered_at"):
            item[key] = None if item[key] is None else item[key].isoformat()
        out.append(item)
    return out


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300) -> bool:
    """What a receiver does: the signature matches and is no older than ``tolerance_s``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        at = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, body, at).split("v1=", 1)[1]
    return abs(time.time() - at) <= tolerance_s and hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: str
    max_attempts: int = 8
    timeout_s: float = 5.0


class Delivery:
    """Sends undelivered alerts to the webhook; ``sweep`` is one pass (a periodic job calls it)."""

    def __init__(self, pool: AsyncConnectionPool, session: aiohttp.ClientSession, webhook: Webhook) -> None:
        self.pool, self.session, self.webhook = pool, session, webhook

    async def sweep(self, batch: int = 20) -> int:
        """Deliver what is due; the number delivered.

        The due rows are claimed in a short transaction (their next attempt moved past the time the POSTs can
        take, so another replica's sweep skips them) and posted with no connection held: a slow receiver costs
        this sweep its time, never a pooled connection the requests need. A gateway that dies mid-sweep leaves
        its claimed alerts to be sent again once the claim runs out (delivery is at least once, as before)."""
        claim_s = self.webhook.timeout_s * batch + 60
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"UPDATE alerts SET next_attempt_at = now() + %s * interval '1 second' WHERE id IN ("
                " SELECT id FROM alerts WHERE delivered_at IS NULL AND attempts < %s AND next_attempt_at <= now()"
                f" ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
                (claim_s, self.webhook.max_attempts, batch))
            rows = sorted(await cur.fetchall())
        delivered = 0
        for row in rows:
            alert = _alert(row)
            error = await self._post(alert)
            async with self.pool.connection() as conn, conn.transaction():
                if error is None:
                    delivered += 1
                    await conn.execute("UPDATE alerts SET delivered_at = now(), attempts = attempts + 1,"
                                       " last_error = NULL WHERE id = %s", (alert["id"],))
                else:
                    await conn.execute(
                        "UPDATE alerts SET attempts = attempts + 1, last_error = %s, next_attempt_at = now()"
                        " + least(interval '1 hour', interval '1 second' * power(2, attempts)) WHERE id = %s",
                        (error, alert["id"]))
        return delivered

    async def _post(self, alert: JSON) -> str | None:
        body = orjson.dumps({"object": "alert", "id": alert["id"], "tenant_id": alert["tenant_id"],
                             "kind": alert["kind"], "subject": alert["subject"], "message": alert["message"],
                             "evidence": alert["evidence"], "created_at": alert["created_at"].isoformat()})
        headers = {"content-type": "application/json", "x-tollway-signature": sign(self.webhook.secret, body)}
        try:
            async with self.session.post(self.webhook.url, data=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.webhook.timeout_s)) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
