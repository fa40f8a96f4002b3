"""The lease sweeper: ledger rows for requests whose gateway died holding them.

A gateway keeps each leased request in Redis (``tollway.gateway.metering.quota.scripts``) until its ledger row
is on disk. When a gateway process dies (SIGKILL, OOM, a node lost), two kinds are left behind:

- a reservation never settled: its lease runs out, its reservation is counted as spent in every counter, and
  the sweeper writes a ledger row at that amount, marked ``error_code='unsettled'``, ``usage_source=
  'reserved'`` (the answer may have been paid for upstream; what it cost is unknown, its worst case is not);
- a request settled whose ledger row was still in the dead process's queue: the sweeper writes a row at the
  settled amount, ``usage_source='recovered'`` (status and tokens as settled; the model and route as admitted).

Either row carries the request's own id and creation time, so it can never stand beside the row its gateway
wrote (the ledger keeps one row per id and time), and its cost is what the counters were charged, less the
request's side rows (failed attempts, retrieval, guards) already in the ledger: Redis and the ledger agree.
One gateway process sweeps per interval (a Redis lock); each sweep is idempotent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from tollway.gateway.metering.ledger import Ledger, LedgerRow
from tollway.gateway.metering.quota import SWEEP, SWEPT, from_nano
from tollway.infra.redisclient import REDIS_FAULTS
from tollway.keyspace import SWEEPER_LOCK, lease_keys

log = logging.getLogger("tollway.sweeper")

UNSETTLED = "unsettled"
LOST_STATUS = 502  # what the balancer answered the client of a gateway that died mid-request


@dataclass(slots=True)
class SweepReport:
    tenants: int = 0
    unsettled: int = 0  # rows written for reservations that expired unsettled
    recovered: int = 0  # rows written for settled requests whose own row was lost


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True, frozen=True)
class Orphan:
    """One request a dead gateway left in Redis: 'r|expired_ms|meta' (an expired reservation) or
    's|settled_ms|usd_nano|tokens|meta' (settled, its ledger row lost)."""

    request_id: str
    unsettled: bool
    created_at: datetime
    usd_nano: int
    tokens: int
    meta: dict[str, Any]

    @classmethod
    def parse(cls, rid: str, value: str) -> Orphan:
        kind, rest = value.split("|", 1)
        if kind == "r":
            at, meta_raw = rest.split("|", 1)
            usd, tokens = None, None
        else:
            at, usd, tokens, meta_raw = rest.split("|", 3)
        try:
            meta: dict[str, Any] = orjson.loads(meta_raw) if meta_raw else {}
        except orjson.JSONDecodeError:
            meta = {}
        created = datetime.fromisoformat(meta["c"]) if isinstance(meta.get("c"), str) \
            else datetime.fromtimestamp(int(at) / 1000, UTC)
        return cls(rid, kind == "r", created, int(usd) if usd is not None else int(meta.get("usd") or 0),
                   int(tokens) if tokens is not None else int(meta.get("tok") or 0), meta)

    def row(self, tenant_id: int, side_usd: Decimal, side_tokens: int) -> LedgerRow:
        """Its ledger row: what the counters were charged, less what its side rows already say."""
        meta = self.meta
        return LedgerRow(
            request_id=self.request_id, created_at=self.created_at, tenant_id=tenant_id,
            key_id=int(meta.get("k") or 0), endpoint=str(meta.get("e") or "unknown"), model=meta.get("m"),
            end_user=meta.get("u"), session_id=meta.get("s"), status=LOST_STATUS if self.unsettled else 200,
            error_code=UNSETTLED if self.unsettled else None,
            usage_source="reserved" if self.unsettled else "recovered",
            output_tokens=max(0, self.tokens - side_tokens),
            cost_usd=max(Decimal(0), from_nano(self.usd_nano) - side_usd))


class Sweeper:
    def __init__(self, pool: AsyncConnectionPool, redis_client: aioredis.Redis, ledger: Ledger, *,
                 interval_s: float, grace_s: float) -> None:
        self.pool, self.redis, self.ledger = pool, redis_client, ledger
        self.interval_s = interval_s
        self.grace_s = grace_s  # a settled request's row may take this long to reach disk in a live gateway
        self.sweep_script = redis_client.register_script(SWEEP)
        self.swept_script = redis_client.register_script(SWEPT)

    async def run(self, *, force: bool = False) -> SweepReport:
        """One pass over every tenant, unless another gateway process holds this interval's lock."""
        report = SweepReport()
        lock_ms = max(1, int(self.interval_s * 900))
        if not force and not await self.redis.set(SWEEPER_LOCK, b"1", nx=True, px=lock_ms):
            return report
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM tenants ORDER BY id")
            tenant_ids = [int(r[0]) for r in await cur.fetchall()]
        for tenant_id in tenant_ids:
            report.tenants += 1
            await self._tenant(tenant_id, report)
        if report.unsettled or report.recovered:
            log.warning("lease sweep: %d unsettled reservations and %d lost ledger rows written from Redis",
                        report.unsettled, report.recovered)
        return report

    async def _tenant(self, tenant_id: int, report: SweepReport) -> None:
        keys = lease_keys(tenant_id)
        now_ms = int(time.time() * 1000)
        try:
            reply = await self.sweep_script(keys=keys, args=[now_ms, int(self.grace_s * 1000)])
        except REDIS_FAULTS as exc:
            log.info("lease sweep of tenant %s deferred (Redis: %s)", tenant_id, exc)
            return
        if not reply:
            return
        orphans = [Orphan.parse(_text(reply[i]), _text(reply[i + 1])) for i in range(0, len(reply), 2)]
        rows = []
        async with self.pool.connection() as conn:
            for orphan in orphans:  # what the request's side rows already say it cost is not counted twice
                cur = await conn.execute(
                    "SELECT coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens + output_tokens), 0)"
                    " FROM ledger WHERE tenant_id = %s AND created_at = %s AND request_id LIKE %s",
                    (tenant_id, orphan.created_at, orphan.request_id + ".%"))
                side = await cur.fetchone()
                assert side is not None
                rows.append(orphan.row(tenant_id, Decimal(side[0]), int(side[1])))
        await self.ledger.insert_now(rows)
        await self.swept_script(keys=keys[3:5], args=[now_ms, *(r.request_id for r in rows)])
        report.unsettled += sum(r.error_code == UNSETTLED for r in rows)
        report.recovered += sum(r.error_code != UNSETTLED for r in rows)
