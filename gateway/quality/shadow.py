"""Shadow rollouts: a sample of answered requests is sent again to a candidate model, off the request
path. The candidate's answer is recorded for evaluation (``shadow_samples``, beside the answer the
user got) and never returned. Its cost is a ledger row with ``role = 'shadow'``: the operator's
evaluation spend, reported apart and not charged to the tenant's budgets.

Work is bounded: at most ``max_in_flight`` shadow calls at once; beyond that samples are skipped and
counted (a shadow must never queue behind, or slow down, real traffic). Shutdown waits for those in
flight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool

from tollway.errors import TollwayError
from tollway.gateway.chat.exchange import Answered
from tollway.gateway.chat.wire import choice_text, usage_of
from tollway.gateway.metering.accounting import side_row
from tollway.gateway.metering.ledger import Ledger, LedgerRow
from tollway.infra.background import Background
from tollway.infra.db import storable
from tollway.jsontypes import JSON
from tollway.routing import ChainFailed, ModelEntry, Router, Usage, count_prompt, count_text

log = logging.getLogger("tollway.shadow")


@dataclass(frozen=True, slots=True)
class ShadowJob:
    row: LedgerRow  # the answered request's ledger row (copied, not shared)
    candidate: ModelEntry
    wire: JSON  # the request as sent upstream, non-streamed
    primary_output: str
    primary_latency_ms: float
    store_content: bool = False  # the tenant's content policy: keep both answers, or scores and metadata only


class Shadows:
    def __init__(self, router: Router, ledger: Ledger, pool: AsyncConnectionPool, *, max_in_flight: int = 16) -> None:
        self.router = router
        self.ledger = ledger
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.skipped = 0
        self.background = Background("shadow call", drain_s=30)

    def maybe(self, done: Answered) -> None:
        """Sample an answered request for each shadow rollout of the model that answered it."""
        row, served, wire, output, store_content = done.row, done.model, done.sent, done.output, done.store_content
        if wire is None:
            return
        catalog = self.router.catalog
        for rollout in catalog.rollouts:
            if rollout.model != served.name or rollout.shadow_percent <= 0:
                continue
            if self.router.rng.random() * 100 >= rollout.shadow_percent:
                continue
            self.submit(ShadowJob(row=dataclasses.replace(row), candidate=catalog.models[rollout.candidate],
                                  wire=wire, primary_output=output, primary_latency_ms=row.latency_ms,
                                  store_content=store_content))

    def submit(self, job: ShadowJob) -> bool:
        if len(self.background) >= self.max_in_flight:
            self.skipped += 1
            return False
        self.background.spawn(self._run(job), name=f"shadow-{job.row.request_id}")
        return True

    async def drain(self) -> None:
        await self.background.drain()

    async def _run(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        wire = dict(job.wire)
        wire.pop("stream", None)
        wire.pop("stream_options", None)
        entry = job.candidate
        decision = self.router.direct(entry, reason=f"shadow:{entry.name}")
        status, code, output, usage = 200, None, None, Usage()
        replica = entry.upstream
        try:
            served = await self.router.call(decision, wire, stream=False)
            served.release(True)
            replica = served.replica
            response = served.response or {}
            output = choice_text(response, "message")
            usage = usage_of(response.get("usage")) or Usage(
                input_tokens=count_prompt(wire.get("messages") or [], wire), output_tokens=count_text(output))
        except ChainFailed as failed:
            status, code = failed.error.status, failed.error.code
        except TollwayError as exc:
            status, code = exc.status, exc.code
        latency_ms = (time.perf_counter() - started) * 1000
        row = side_row(job.row, suffix="shadow", role="shadow", attempt=1, entry=entry, replica=replica,
                       status=status, error_code=code, usage=usage, latency_ms=latency_ms,
                       usage_source="upstream" if status == 200 else None, stream=False, cache_hit=False,
                       saved_usd=Decimal(0), degraded=False, rollout="shadow", route_reason=decision.reason)
        self.ledger.record(row)
        cost = row.cost_usd
        try:
            async with self.pool.connection(timeout=5) as conn:
                await conn.execute(
                    "INSERT INTO shadow_samples (request_id, tenant_id, end_user, model, candidate, status, error_code,"
                    " primary_output, candidate_output, primary_latency_ms, candidate_latency_ms, candidate_cost_usd)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (job.row.request_id, job.row.tenant_id, storable(job.row.end_user), job.row.model, entry.name,
                     status, code, storable(job.primary_output) if job.store_content else None,
                     storable(output) if job.store_content else None,
                     job.primary_latency_ms, latency_ms, cost))
        except Exception:  # evaluation data: its loss is logged; the money is in the ledger row above
            log.exception("could not record the shadow sample of %s", job.row.request_id)
