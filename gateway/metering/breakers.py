"""Economic circuit breaker trips: each one becomes an event row and a metric.

The checks themselves run inside the quota script (``tollway.gateway.metering.quota``), atomically with
admission; this module records what they decided: which tenant, which breaker, when the first
offending request came and when the gateway contained it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.gateway.observability.telemetry import Telemetry
from tollway.infra.background import Background

log = logging.getLogger("tollway.breakers")


class BreakerEvents:
    def __init__(self, pool: AsyncConnectionPool, telemetry: Telemetry) -> None:
        self._pool = pool
        self._trips = telemetry.meter.create_counter("tollway.breaker.trips", description="Breaker trips")
        self._containment = telemetry.meter.create_histogram(
            "tollway.breaker.containment", unit="s", description="First offending request to containment")
        self.background = Background("breaker event")

    def trip(self, *, kind: str, tenant_id: int | None, first_offense_ms: int, contained_ms: int,
             detail: dict[str, Any]) -> None:
        seconds = max(0, contained_ms - first_offense_ms) / 1000
        self._trips.add(1, {"kind": kind})
        self._containment.record(seconds, {"kind": kind})
        log.warning("breaker %s tripped for tenant %s; contained %.3fs after the first offense", kind,
                    tenant_id, seconds)
        self.background.spawn(self._write(kind, tenant_id, first_offense_ms, contained_ms, detail))

    async def _write(self, kind: str, tenant_id: int | None, first_ms: int, contained_ms: int,
                     detail: dict[str, Any]) -> None:
        try:
            async with self._pool.connection(timeout=5) as conn:
                await conn.execute(
                    "INSERT INTO breaker_events (tenant_id, kind, first_offense_at, contained_at, detail)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (tenant_id, kind, datetime.fromtimestamp(first_ms / 1000, UTC),
                     datetime.fromtimestamp(contained_ms / 1000, UTC), json.dumps(detail)))
        except (psycopg.Error, TimeoutError) as exc:
            log.error("could not record breaker event %s for tenant %s: %s", kind, tenant_id, exc)

    async def drain(self) -> None:
        await self.background.drain()
