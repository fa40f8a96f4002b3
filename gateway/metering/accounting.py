"""One request's accounting: the ledger row it writes, the span it ends, the reservation it settles.

Every authenticated call opens a ``Tally`` before its body is parsed and closes it exactly once, on
the success path, the error path, the end of a stream or a client disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from opentelemetry.trace import Span, StatusCode

from tollway.errors import TollwayError
from tollway.gateway.http.streaming import ClientDisconnected
from tollway.gateway.metering.ledger import Ledger, LedgerRow
from tollway.gateway.metering.quota import QuotaService, Reservation
from tollway.gateway.observability.telemetry import Telemetry
from tollway.routing import ModelEntry, Price, Usage

_COST_QUANTUM = Decimal("1e-10")
CLIENT_CLOSED = 499  # nginx's convention; recorded in the ledger, never sent
INTERNAL_ERROR = "internal_error"


def format_cost(cost: Decimal) -> str:
    return format(charged(cost), "f")


def charged(cost: Decimal) -> Decimal:
    """A cost as it is recorded and reported: to the tenth of a nano-dollar, so the ledger holds exactly
    what the answer's headers said."""
    return cost.quantize(_COST_QUANTUM)


def side_row(row: LedgerRow, *, suffix: str, role: str, attempt: int, entry: ModelEntry, replica: str, status: int,
             error_code: str | None, usage: Usage, usage_source: str | None, latency_ms: float,
             **extra: Any) -> LedgerRow:
    """A ledger row of its own for another upstream call made for the request ``row`` records (a failed
    fallback attempt, a retrieval's embedding, a guard's model call, a shadow call): the same request,
    tenant, key and user; its own role, model, tokens and cost."""
    return dataclasses.replace(
        row, request_id=f"{row.request_id}.{suffix}", role=role, attempt=attempt, model=entry.name,
        upstream=replica, upstream_model=entry.upstream_model, tier=entry.tier, price_source=entry.price.source,
        status=status, error_code=error_code, latency_ms=latency_ms, ttft_ms=None, input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, cached_tokens=usage.cached_tokens, cost_usd=charged(entry.price.cost(usage)),
        usage_source=usage_source, tags=None if row.tags is None else list(row.tags), **extra)


@dataclass(slots=True)
class Tally:
    ledger: Ledger
    telemetry: Telemetry
    quota: QuotaService | None
    row: LedgerRow
    span: Span
    started: float
    tenant: str = ""
    baseline: Price | None = None  # the top tier's price, for what routing saved (chat answers only)
    entry: ModelEntry | None = None
    usage: Usage = field(default_factory=Usage)
    reservation: Reservation | None = None
    finished: bool = False
    # side calls of this request (failed fallback attempts, retrieval, guards): what they cost, settled
    # with the answer and counted in the tenant's spend
    side_cost: Decimal = Decimal(0)
    side_tokens: int = 0
    attempts: int = 0
    sides: dict[str, int] = field(default_factory=dict)  # side rows so far per role (their ids)

    def bind(self, entry: ModelEntry, *, replica: str | None = None, reason: str = "requested") -> None:
        self.entry = entry
        self.row.model = entry.name
        self.row.upstream = replica or entry.upstream
        self.row.upstream_model = entry.upstream_model
        self.row.route_reason = reason
        self.row.tier = entry.tier
        self.row.price_source = entry.price.source
        self.span.set_attribute("gen_ai.request.model", entry.name)
        self.span.set_attribute("gen_ai.provider.name", self.row.upstream)

    # -- what a request's stages record: the only writers of the row besides the tally itself --------
    def request(self, *, end_user: str | None, stream: bool = False, tags: list[str] | None = None) -> None:
        """What the parsed request says about itself."""
        self.row.end_user, self.row.stream, self.row.tags = end_user, stream, tags

    def prompt(self, name: str, version: str) -> None:
        self.row.prompt_name, self.row.prompt_version = name, version

    def index(self, version: str) -> None:
        """The retrieval index version the answer is grounded in."""
        self.row.index_version = version

    def route(self, reason: str) -> None:
        self.row.route_reason = reason

    def rollout(self, kind: str) -> None:
        """The answer came from a rollout's candidate ('canary')."""
        self.row.rollout = kind

    def cache_hit(self, saved_usd: Decimal) -> None:
        """Answered from the response cache: free, and what it would have cost is saved."""
        self.row.cache_hit, self.row.saved_usd = True, saved_usd

    def gateway_answer(self, model: str, reason: str, *, degraded: bool = False) -> None:
        """The gateway answers itself (a degraded answer, an input guard's fallback) as ``model``."""
        self.row.model, self.row.route_reason, self.row.degraded = model, reason, degraded

    def replica(self, replica: str) -> None:
        self.row.upstream = replica

    def guards(self, outcomes: list[dict[str, Any]]) -> None:
        self.row.guard_outcome = outcomes or None

    def failed_attempt(self, entry: ModelEntry, replica: str, status: int, error_code: str, usage: Usage,
                       latency_ms: float) -> None:
        """A ledger row of its own for an attempt that failed before anything reached the client."""
        self.attempts += 1
        row = side_row(self.row, suffix=f"a{self.attempts}", role="attempt", attempt=self.attempts, entry=entry,
                       replica=replica, status=status, error_code=error_code, usage=usage, latency_ms=latency_ms,
                       usage_source="estimated" if usage.input_tokens or usage.output_tokens else None)
        self._charge(row)
        self.telemetry.failed_attempts.add(1, {"gen_ai.request.model": entry.name, "tollway.upstream": replica,
                                                "error.type": error_code})
        self.telemetry.prometheus.failed_attempts.labels(entry.name, replica, error_code).inc()
        self.row.attempt = self.attempts + 1

    def side_call(self, role: str, entry: ModelEntry, usage: Usage, latency_ms: float, *, replica: str | None = None,
                  status: int = 200, error_code: str | None = None) -> Decimal:
        """A ledger row (``role``: 'retrieval', 'guard') for a call a stage made for this request; its cost
        settles with the request's reservation. Returns that cost."""
        n = self.sides[role] = self.sides.get(role, 0) + 1
        row = side_row(self.row, suffix=f"{role[0]}{n}", role=role, attempt=1, entry=entry,
                       replica=replica or entry.upstream, status=status, error_code=error_code, usage=usage,
                       latency_ms=latency_ms, usage_source="upstream" if status == 200 else None)
        self._charge(row)
        return row.cost_usd

    def _charge(self, row: LedgerRow) -> None:
        self.ledger.record(row)
        if row.cost_usd:
            self.telemetry.prometheus.cost.labels(self.tenant, row.model or "").inc(float(row.cost_usd))
        self.side_cost += row.cost_usd
        self.side_tokens += row.input_tokens + row.output_tokens

    @contextlib.contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Around a request's work: a Tollway error closes the row with its status and code; the client
        leaving (the task cancelled) as 499; anything else as the 500 the client is sent. The success
        path closes it itself."""
        try:
            yield
        except TollwayError as exc:
            self.close(exc.status, exc.code)
            raise
        except (asyncio.CancelledError, ClientDisconnected, GeneratorExit):
            self.close(CLIENT_CLOSED, "client_disconnected")
            raise
        except BaseException:
            self.close(500, INTERNAL_ERROR)
            raise

    def first_token(self) -> None:
        if self.row.ttft_ms is None:
            self.row.ttft_ms = (time.perf_counter() - self.started) * 1000

    def _record(self, status: int, error_code: str | None, usage: Usage | None, usage_source: str | None) -> Decimal:
        self.finished = True
        row = self.row
        if usage is not None:
            self.usage = usage
            row.usage_source = usage_source
        row.status, row.error_code = status, error_code
        row.input_tokens = self.usage.input_tokens
        row.output_tokens = self.usage.output_tokens
        row.cached_tokens = self.usage.cached_tokens
        row.cost_usd = self.price(self.usage)
        if self.baseline is not None and self.entry is not None and row.role == "answer" and not row.cache_hit \
                and status < 400:
            row.baseline_usd = self.baseline.cost(self.usage)
        row.latency_ms = (time.perf_counter() - self.started) * 1000
        self.ledger.record(row)
        self._report(row)
        return row.cost_usd

    def price(self, usage: Usage) -> Decimal:
        """What this request costs for ``usage`` (a cache hit keeps its model and tokens, costs nothing)."""
        priced = None if self.row.cache_hit else self.entry
        return charged(priced.price.cost(usage)) if priced is not None else Decimal(0)

    def close(self, status: int, error_code: str | None = None, *, usage: Usage | None = None,
              usage_source: str | None = None) -> Decimal:
        """Write the ledger row; settle the reservation to what was actually used.

        Settlement runs as a tracked task after the answer has gone: until it lands, the reservation
        still holds the worst case, which only makes the next admission stricter, never looser."""
        if self.finished:
            return self.row.cost_usd
        cost = self._record(status, error_code, usage, usage_source)
        if self.reservation is not None and self.quota is not None:
            self.quota.track(self.reservation.settle(cost + self.side_cost, self.usage.input_tokens
                                                     + self.usage.output_tokens + self.side_tokens))
        return cost

    def _report(self, row: LedgerRow) -> None:
        span, tel = self.span, self.telemetry
        span.set_attribute("gen_ai.usage.input_tokens", row.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", row.output_tokens)
        span.set_attribute("tollway.cost_usd", float(row.cost_usd))
        span.set_attribute("http.response.status_code", row.status)
        if row.model:
            span.set_attribute("gen_ai.response.model", row.model)
        if row.route_reason:
            span.set_attribute("tollway.route", row.route_reason)
        if row.error_code:
            span.set_attribute("error.type", row.error_code)
            span.set_status(StatusCode.ERROR, row.error_code)
        span.end()
        attrs: dict[str, Any] = {"gen_ai.request.model": row.model or "", "http.response.status_code": row.status}
        tel.requests.add(1, attrs)
        tel.duration.record(row.latency_ms / 1000, attrs)
        if row.cost_usd:
            tel.cost_usd.add(float(row.cost_usd), {"gen_ai.request.model": row.model or ""})
        if row.cache_hit:
            tel.cache_hits.add(1, {"gen_ai.request.model": row.model or ""})
        for outcome in row.guard_outcome or ():
            tel.guards.add(1, {"tollway.tenant_id": row.tenant_id, "tollway.guard.validator": outcome["validator"],
                               "tollway.guard.action": outcome["action"]})
            tel.prometheus.guards.labels(self.tenant, outcome["validator"], outcome["action"]).inc()
        tel.prometheus.request(self.tenant, row.model or "", row.status, row.latency_ms / 1000,
                               None if row.ttft_ms is None else row.ttft_ms / 1000, float(row.cost_usd),
                               row.input_tokens, row.output_tokens, row.cache_hit)
        if row.input_tokens:
            tel.tokens.add(row.input_tokens, {"gen_ai.token.type": "input"})
        if row.output_tokens:
            tel.tokens.add(row.output_tokens, {"gen_ai.token.type": "output"})
