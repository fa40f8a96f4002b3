"""Carrying out a route decision: try the target, then the fallback chain, each step with its deadline.

Only failures that leave nothing at the client are retried: connection errors, 429 and 5xx answers,
a deadline passed before the answer (or, for streams, before the first token), a stream broken off
before its first token. A request the upstream calls invalid (400) is not retried; nor is a stream
once a token has reached the client (its error goes into the stream). Retries beyond the first
attempt draw on a retry budget (a share of recent requests, Finagle/Envoy style), so an outage
cannot multiply the load on what is left. Every call is counted in the replica's health.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tollway.errors import (
    ServiceUnavailable,
    TollwayError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from tollway.jsontypes import JSON
from tollway.routing.decision import RouteDecision, Step
from tollway.routing.health import Health, ReplicaHealth, Ticket
from tollway.routing.upstream import Upstream, UpstreamStream
from tollway.routing.wire import upstream_body


def retryable(exc: TollwayError) -> bool:
    return isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamRejected)


class RetryBudget:
    """Each request deposits ``ratio`` tokens; each retry takes one; ``min_per_s`` tokens trickle in
    so a quiet gateway can still retry. The balance is capped at ten seconds' worth."""

    def __init__(self, ratio: float, min_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.min_per_s, self.clock = ratio, min_per_s, clock
        self.cap = max(10.0, 10 * min_per_s)
        self.tokens = self.cap
        self.at = clock()
        self.refused = 0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.cap, self.tokens + (now - self.at) * self.min_per_s)
        self.at = now

    def deposit(self) -> None:
        self._refill()
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.refused += 1
        return False


@dataclass(slots=True)
class Attempt:
    """One failed attempt: what was tried, why it failed, and whether the upstream had started
    answering (then it may have cost money)."""

    step: Step
    replica: str
    error: TollwayError
    elapsed_ms: float
    started_answer: bool = False


@dataclass(slots=True)
class Served:
    step: Step
    replica: str
    attempts: list[Attempt]
    response: JSON | None = None  # a non-streamed answer
    stream: UpstreamStream | None = None
    chunks: AsyncIterator[JSON] | None = None
    head: list[JSON] = field(default_factory=list)  # chunks read before the first token
    ticket: Ticket | None = None  # the claim on the replica, until ``release``
    ttft_s: float | None = None

    def release(self, ok: bool, *, count: bool = True) -> None:
        """Hand the replica back once the answer is finished (a JSON answer when it arrived, a stream when
        it ended). ``count=False``: the end says nothing of the replica (the client went away)."""
        if self.ticket is not None:
            ticket, self.ticket = self.ticket, None
            ticket.replica.finish(ticket, ok, ttft_s=self.ttft_s, count=count)


class ChainFailed(Exception):
    """Every step failed, or none could be tried; ``error`` is what the client should see."""

    def __init__(self, error: TollwayError, attempts: list[Attempt]) -> None:
        super().__init__(error.message)
        self.error, self.attempts = error, attempts


def _substantive(chunk: JSON) -> bool:
    """A chunk that carries part of the answer (not only the assistant role)."""
    if chunk.get("usage"):
        return True
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "function_call",
                                                                   "refusal", "reasoning_content")):
            return True
    return False


class Caller:
    def __init__(self, upstreams: dict[str, Upstream], health: Health, retry_budget: RetryBudget, *,
                 max_attempts: int, balance: str) -> None:
        self.upstreams = upstreams
        self.health = health
        self.retry_budget = retry_budget
        self.max_attempts = max_attempts
        self.balance = balance

    async def _plan(self, decision: RouteDecision, affinity: str | None) -> AsyncIterator[tuple[Step, ReplicaHealth]]:
        """Each step's usable replicas in the order the balancer picks them, read as they are tried."""
        for step in decision.steps:
            tried: set[str] = set()
            while (replica := self.health.pick(step.model.replicas, balance=self.balance, affinity=affinity,
                                               exclude=frozenset(tried))) is not None:
                tried.add(replica.name)
                yield step, replica

    async def call(self, decision: RouteDecision, wire: JSON, *, stream: bool, affinity: str | None = None,
                   endpoint: str = "chat", clock: Callable[[], float] = time.perf_counter) -> Served:
        attempts: list[Attempt] = []
        last: TollwayError | None = None
        self.retry_budget.deposit()
        async for step, replica in self._plan(decision, affinity):
            if len(attempts) >= self.max_attempts or (attempts and not self.retry_budget.withdraw()):
                break
            ticket = replica.start()
            if ticket is None:
                continue  # its breaker closed the door since it was picked
            body = upstream_body(endpoint, wire, step.model.upstream_model, step.model.forward_fields)
            started = clock()
            try:
                if stream:
                    return await self._open(step, replica, ticket, body, attempts, started, clock)
                upstream = self.upstreams[replica.name]
                async with asyncio.timeout(step.deadline_s):
                    response = await (upstream.embed(body) if endpoint == "embeddings" else
                                      upstream.rerank(body) if endpoint == "rerank" else upstream.complete(body))
            except TimeoutError:  # a non-streamed call past its deadline (a stream's is a _Failed)
                last = UpstreamTimeout(f"upstream {replica.name} missed its {step.deadline_s:g}s deadline")
                replica.finish(ticket, False)
                attempts.append(Attempt(step, replica.name, last, (clock() - started) * 1000))
                continue
            except _Failed as failed:
                last = failed.error
                replica.finish(ticket, False)
                attempts.append(Attempt(step, replica.name, last, (clock() - started) * 1000, failed.opened))
                continue
            except TollwayError as exc:
                replica.finish(ticket, not retryable(exc), count=retryable(exc))
                if not retryable(exc):
                    raise
                last = exc
                attempts.append(Attempt(step, replica.name, exc, (clock() - started) * 1000))
                continue
            except BaseException:
                replica.finish(ticket, False, count=False)  # the client went away: says nothing of the replica
                raise
            return Served(step, replica.name, attempts, response=response, ticket=ticket, ttft_s=clock() - started)
        if last is None:
            last = ServiceUnavailable("No upstream can take this request now (circuit breakers open or queues "
                                      "full); try again shortly.", code="no_upstream_available", retry_after=1)
        raise ChainFailed(last, attempts)

    async def _open(self, step: Step, replica: ReplicaHealth, ticket: Ticket, body: JSON, attempts: list[Attempt],
                    started: float, clock: Callable[[], float]) -> Served:
        """Open a stream and read up to its first token within the TTFT deadline. The ticket stays
        claimed by the returned stream; failures raise ``_Failed`` (retryable) or a domain error."""
        opened = False
        stream: UpstreamStream | None = None
        try:
            async with asyncio.timeout(step.ttft_deadline_s):
                stream = await self.upstreams[replica.name].open_stream(body)
                opened = True
                chunks = stream.__aiter__()
                head: list[JSON] = []
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        raise UpstreamBadResponse(f"upstream {replica.name} ended its stream before the first "
                                                  "token", code="upstream_stream_cut") from None
                    head.append(chunk)
                    if _substantive(chunk):
                        break
        except BaseException as exc:
            if stream is not None:
                await stream.aclose()
            if isinstance(exc, TollwayError) and retryable(exc):
                raise _Failed(exc, opened) from exc
            if isinstance(exc, TimeoutError):
                raise _Failed(UpstreamTimeout(f"upstream {replica.name} sent no token within "
                                              f"{step.ttft_deadline_s:g}s"), opened) from exc
            raise
        assert stream is not None
        return Served(step, replica.name, attempts, stream=stream, chunks=chunks, head=head, ticket=ticket,
                      ttft_s=clock() - started)


class _Failed(Exception):
    def __init__(self, error: TollwayError, opened: bool) -> None:
        super().__init__(error.message)
        self.error, self.opened = error, opened
