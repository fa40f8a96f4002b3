"""The completion service: validate, plan the route, admit against budgets, decide the route, call the
upstream (through the fallback chain), account for the cost. Accounting lives in ``accounting``, stream relaying in ``relay``, budgets in
``quota``; this module wires them in the order the request path needs."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from opentelemetry.trace import SpanKind

from tollway.errors import InvalidRequest, NotFound, PermissionDenied, QuotaExceeded, TollwayError
from tollway.gateway.accounting import CLIENT_CLOSED, Tally, format_cost, usage_of
from tollway.gateway.answers import DEGRADED_MODEL, degraded_completion, replay
from tollway.gateway.background import Background
from tollway.gateway.keys import Principal
from tollway.gateway.ledger import Ledger, LedgerRow
from tollway.gateway.policy import PolicyStore, TenantPolicy, TenantRules
from tollway.gateway.protocol import ChatCompletionRequest, EmbeddingRequest, parse_json_object, validate
from tollway.gateway.quota import Admission, Demand, QuotaService, fingerprint, to_nano
from tollway.gateway.relay import StreamRelay, choice_text
from tollway.gateway.shadow import ShadowJob, Shadows
from tollway.gateway.telemetry import Telemetry
from tollway.routing import (
    Attempt,
    BudgetSignal,
    Caller,
    Catalog,
    ChainFailed,
    Health,
    ModelEntry,
    ResponseCache,
    RouteDecision,
    RouteRequest,
    Served,
    Step,
    TenantRouting,
    Usage,
    assess,
    cache_key,
    canary_bucket,
    candidates,
    count_messages,
    count_text,
    decide,
    deterministic,
    no_model_fits,
)

JSON = dict[str, Any]
BodyReader = Callable[[], Awaitable[bytes]]  # read inside the tally, so an oversized body is accounted too
INFERENCE_ROLES = frozenset({"app", "admin"})
# Worst-case input: tiktoken's count, plus a margin for upstreams whose tokenizers count more.
INPUT_MARGIN = 1.10
INPUT_SLACK = 16
# Worst-case output: max_tokens in the upstream's tokens, which tiktoken may count a little higher.
# Streams are counted with tiktoken and cut at this figure, so a compliant upstream is never cut and
# one that ignores max_tokens never outgrows its reservation.
OUTPUT_MARGIN = 1.25
OUTPUT_SLACK = 8


def reserved_output(max_tokens: int, n: int = 1) -> int:
    return (math.ceil(max_tokens * OUTPUT_MARGIN) + OUTPUT_SLACK) * n


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    principal: Principal
    header_user: str | None
    started: float  # time.perf_counter()
    created_at: datetime
    session: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    max_messages: int
    max_tokens: int


@dataclass(slots=True)
class JSONResult:
    payload: JSON
    headers: dict[str, str]


@dataclass(slots=True)
class StreamResult:
    frames: AsyncIterator[bytes]
    headers: dict[str, str]


def _tags(ctx: CallContext, data: JSON) -> list[str] | None:
    tags = list(ctx.tags)
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        raw = metadata.get("tags")
        if isinstance(raw, str):
            tags += [t.strip() for t in raw.split(",") if t.strip()]
        elif isinstance(raw, list):
            tags += [str(t) for t in raw if str(t).strip()]
    return sorted(set(tags)) or None


def _needs_bound(rules: TenantRules, principal: Principal) -> bool:
    policy = rules.policy
    return bool(rules.budgets or policy.tpm or policy.rpm or principal.tpm or principal.rpm
                or policy.velocity_hard_usd_per_min or policy.velocity_soft_usd_per_min)


@dataclass(slots=True)
class Routing:
    """The routing parts the service calls; built in the app's lifespan."""

    caller: Caller
    health: Health
    cache: ResponseCache | None = None
    shadows: Shadows | None = None
    rng: random.Random = field(default_factory=random.Random)
    background: Background = field(default_factory=lambda: Background("response cache write", drain_s=10))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Work after the answer (caching a finished stream): tracked, awaited at shutdown."""
        self.background.spawn(work)

    async def drain(self) -> None:
        await self.background.drain()


def _needs(data: JSON) -> frozenset[str]:
    needs = set()
    if data.get("tools") or data.get("functions"):
        needs.add("tools")
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json_mode")
    for message in data.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            needs.add("vision")
    return frozenset(needs)


def _finished(payload: JSON, headers: dict[str, str], stream: bool, data: JSON) -> JSONResult | StreamResult:
    """An answer that exists whole (cached, degraded): as JSON, or replayed as a stream if one was asked for."""
    if stream:
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return StreamResult(replay(payload, include_usage=include_usage), headers)
    return JSONResult(payload, headers)


def _affinity(data: JSON) -> str | None:
    messages = data.get("messages") or []
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    content = first.get("content") if first.get("role") in ("system", "developer") else None
    return content if isinstance(content, str) and content else None


class CompletionService:
    def __init__(self, catalog: Catalog, ledger: Ledger, telemetry: Telemetry, limits: Limits, routing: Routing,
                 policies: PolicyStore | None = None, quota: QuotaService | None = None) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.telemetry = telemetry
        self.limits = limits
        self.routing = routing  # upstream calls go through its fallback chain
        self.policies = policies
        self.quota = quota

    # -- shared steps -----------------------------------------------------------------------------
    def _open(self, ctx: CallContext, endpoint: str) -> Tally:
        p = ctx.principal
        span = self.telemetry.tracer.start_span(endpoint, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": "chat" if endpoint == "chat.completions" else "embeddings",
            "tollway.request_id": ctx.request_id, "tollway.tenant": p.tenant})
        row = LedgerRow(request_id=ctx.request_id, created_at=ctx.created_at, tenant_id=p.tenant_id,
                        key_id=p.key_id, endpoint=endpoint, end_user=ctx.header_user, session_id=ctx.session,
                        tags=list(ctx.tags) or None)
        return Tally(ledger=self.ledger, telemetry=self.telemetry, quota=self.quota, row=row, span=span,
                     started=ctx.started)

    def resolve(self, principal: Principal, name: str, kind: str) -> ModelEntry | None:
        """The model a request names (None for a routing alias such as 'auto'), or the 4xx why not."""
        if principal.role not in INFERENCE_ROLES:
            raise PermissionDenied(f"A {principal.role} key may not call models.", code="role_not_allowed")
        if kind == "chat" and name in self.catalog.auto_aliases:
            return None
        entry = self.catalog.get(name)
        if entry is None:
            raise NotFound(f"The model '{name}' does not exist or you do not have access to it.",
                           param="model")
        if not principal.may_use(entry.name):
            raise PermissionDenied(f"This key may not use model '{name}'.", param="model",
                                   code="model_not_allowed")
        if entry.kind != kind:
            raise InvalidRequest(f"The model '{name}' is an {entry.kind} model; it cannot serve {kind}.",
                                 param="model", code="model_not_supported")
        return entry

    def _check_limits(self, req: ChatCompletionRequest) -> None:
        if len(req.messages) > self.limits.max_messages:
            raise InvalidRequest(f"At most {self.limits.max_messages} messages are allowed.", param="messages")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name)
            if value is not None and value > self.limits.max_tokens:
                raise InvalidRequest(f"'{name}' may be at most {self.limits.max_tokens}.", param=name)

    async def _rules(self, tenant_id: int) -> TenantRules:
        if self.policies is None:
            return TenantRules(TenantPolicy(tenant_id), ())
        return await self.policies.rules(tenant_id)

    def _tenant_routing(self, rules: TenantRules, principal: Principal) -> TenantRouting:
        policy = rules.policy
        allowed = None if policy.allowed_models is None else frozenset(policy.allowed_models)
        if principal.allowed_models is not None:
            keyed = frozenset(principal.allowed_models)
            allowed = keyed if allowed is None else allowed & keyed
        return TenantRouting(threshold=policy.route_threshold, allowed_models=allowed,
                             quality_floor=policy.quality_floor, degraded_answers=policy.degraded_answers)

    async def _admit(self, ctx: CallContext, tally: Tally, rules: TenantRules, models: list[ModelEntry], body: bytes,
                     wire: JSON, worst_case: Callable[[TenantRules], tuple[Usage, int | None]], *,
                     stream: bool = False, count_storm: bool = True) -> Admission | None:
        """Reserve the worst case in every budget and limit that applies, or refuse (429/503). The worst
        case is the dearest model the route may end on; for streams, plus the prompt of each failed
        attempt before it (a stream that broke before its first token may have been billed its prompt)."""
        if self.quota is None:
            return None
        demand = Demand(0, 0)
        output_cap = None
        if _needs_bound(rules, ctx.principal):
            worst, output_cap = worst_case(rules)
            prompt_only = Usage(input_tokens=worst.input_tokens)
            retries = self.catalog.routing.max_attempts - 1 if stream else 0
            usd = max(m.price.cost(worst) for m in models) + retries * max(m.price.cost(prompt_only) for m in models)
            demand = Demand(to_nano(usd), worst.input_tokens * (1 + retries) + worst.output_tokens)
        admission = await self.quota.admit(
            ctx.principal, rules, rid=ctx.request_id, end_user=tally.row.end_user, session=ctx.session,
            fingerprint=fingerprint(ctx.principal.tenant_id, body), demand=demand, count_storm=count_storm)
        tally.reservation = admission.reservation
        if output_cap is not None and "max_tokens" not in wire and "max_completion_tokens" not in wire:
            wire["max_tokens"] = output_cap  # the tenant's default cap bounds the worst case
        return admission

    def _result_headers(self, entry: ModelEntry | None, cost: Decimal | None, admission: Admission | None,
                        decision: RouteDecision | None = None) -> dict[str, str]:
        headers = {"x-tollway-model": entry.name if entry is not None else DEGRADED_MODEL}
        if cost is not None:
            headers["x-tollway-cost-usd"] = format_cost(cost)
        if decision is not None:
            headers["x-tollway-route"] = decision.reason
        if admission is not None:
            headers.update(admission.headers)
        return headers

    def _estimate(self, data: JSON, output: str, output_tokens: int | None = None) -> Usage:
        messages = data.get("messages")
        input_tokens = count_messages(messages) if isinstance(messages, list) else 0
        return Usage(input_tokens=input_tokens,
                     output_tokens=count_text(output) if output_tokens is None else output_tokens)

    # -- chat -------------------------------------------------------------------------------------
    async def chat(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        tally = self._open(ctx, "chat.completions")
        with tally.closed_on_error():
            body = await read_body()
            data = parse_json_object(body)
            req = validate(ChatCompletionRequest, data)
            tally.row.stream = req.stream
            tally.row.end_user = ctx.header_user or req.user
            tally.row.tags = _tags(ctx, data)
            self.resolve(ctx.principal, req.model, "chat")
            self._check_limits(req)
            rules = await self._rules(ctx.principal.tenant_id)
            tenant = self._tenant_routing(rules, ctx.principal)
            route = self._route_request(req, data)
            models = candidates(self.catalog, route, tenant)
            cache_key = self._cache_key(rules, ctx.principal.tenant_id, data)
            if cache_key is not None and (
                    hit := await self._cached(tally, cache_key, req.stream, data, models)) is not None:
                return hit
            wire = dict(data)

            def worst_case(rules: TenantRules) -> tuple[Usage, int]:
                cap = req.max_completion_tokens or req.max_tokens or rules.policy.default_max_tokens
                prompt = math.ceil(count_messages(data["messages"]) * INPUT_MARGIN) + INPUT_SLACK
                return Usage(input_tokens=prompt, output_tokens=reserved_output(cap, req.n)), cap

            if not models:
                raise no_model_fits(route)
            health = {m.name: self.routing.health.state_of(m.replicas) for m in models}
            bucket = canary_bucket(tally.row.end_user or f"key:{ctx.principal.key_id}") \
                if self.catalog.has_canaries else None
            # The route before budgets are known bounds the reservation (an easy 'auto' request reserves
            # at the small tier's price); budget signals can only move it down that chain.
            planned = decide(self.catalog, route, tenant, BudgetSignal(), health, bucket)
            chain = [s.model for s in planned.steps] or models
            try:
                admission = await self._admit(ctx, tally, rules, chain, body, wire, worst_case, stream=req.stream)
                budget = BudgetSignal(headroom=admission.headroom if admission else None,
                                      velocity_soft=bool(admission and admission.step_down))
            except QuotaExceeded:
                cheaper = self._step_down(route, chain)
                if not cheaper:
                    raise
                # 'auto' near exhaustion: the budget may still hold the next tier down
                admission = await self._admit(ctx, tally, rules, cheaper, body, wire, worst_case, stream=req.stream,
                                              count_storm=False)
                budget = BudgetSignal(headroom=0.0, velocity_soft=bool(admission and admission.step_down))
            decision = decide(self.catalog, route, tenant, budget, health, bucket)
            tally.row.route_reason = decision.reason
            affinity = _affinity(data) if self.catalog.routing.prefix_affinity else None
            if req.stream:
                wire["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
            try:
                served = await self.routing.caller.call(decision, wire, stream=req.stream, affinity=affinity)
            except ChainFailed as failed:
                self._record_attempts(tally, data, failed.attempts)
                if not decision.degraded_allowed:
                    raise failed.error from None
                return self._degraded(tally, req.stream, data, admission, decision, failed.error)
            self._record_attempts(tally, data, served.attempts)
            tally.bind(served.step.model, replica=served.replica, reason=decision.reason)
            if decision.rollout is not None and served.step.model is decision.target:
                tally.row.rollout = decision.rollout
            if req.stream:
                return self._relay(tally, served, wire, data, admission, decision, cache_key)
        assert served.response is not None
        response = served.response
        tally.first_token()
        entry = served.step.model
        usage, source = usage_of(response.get("usage")), "upstream"
        if usage is None:
            usage, source = self._estimate(data, choice_text(response, "message")), "estimated"
        response["model"] = entry.name
        cost = tally.close(200, usage=usage, usage_source=source)
        if cache_key is not None and self.routing.cache is not None:
            await self.routing.cache.put(cache_key, response, entry.name, cost)
        self._maybe_shadow(tally, served.step.model, wire, choice_text(response, "message"))
        return JSONResult(response, self._result_headers(entry, cost, admission, decision))

    def _route_request(self, req: ChatCompletionRequest, data: JSON) -> RouteRequest:
        needs = _needs(data)
        difficulty = assess(data["messages"], tools="tools" in needs, structured="json_mode" in needs) \
            if req.model in self.catalog.auto_aliases else None
        tokens = None
        if self.catalog.has_context_windows:  # only then is the prompt counted here
            tokens = count_messages(data["messages"]) + (req.max_completion_tokens or req.max_tokens or 0) * req.n
        return RouteRequest(model=req.model, needs=needs, difficulty=difficulty, tokens=tokens)

    def _step_down(self, route: RouteRequest, chain: list[ModelEntry]) -> list[ModelEntry]:
        """For 'auto': the chain without its top tier, when there is a lower one."""
        if route.model not in self.catalog.auto_aliases or not chain:
            return []
        top = min(self.catalog.rank(m.tier) for m in chain)
        return [m for m in chain if self.catalog.rank(m.tier) > top]

    def _record_attempts(self, tally: Tally, data: JSON, attempts: list[Attempt]) -> None:
        """A ledger row per failed attempt; one that the upstream had started answering is charged
        the prompt (hosted APIs bill a prompt they read), the others cost nothing."""
        for attempt in attempts:
            usage = self._estimate(data, "", 0) if attempt.started_answer else Usage()
            tally.failed_attempt(attempt.step.model, attempt.replica, attempt.error.status, attempt.error.code,
                                 usage, attempt.elapsed_ms)

    def _relay(self, tally: Tally, served: Served, wire: JSON, data: JSON, admission: Admission | None,
               decision: RouteDecision, cache_key: str | None) -> StreamResult:
        assert served.stream is not None and served.chunks is not None and served.ticket is not None
        entry, ticket = served.step.model, served.ticket
        options = data.get("stream_options") or {}
        cap = wire.get("max_completion_tokens") or wire.get("max_tokens")
        n = wire["n"] if isinstance(wire.get("n"), int) else 1

        def on_close(relay: StreamRelay, status: int) -> None:
            ticket.replica.finish(ticket, status == 200, ttft_s=served.ttft_s, count=status != CLIENT_CLOSED)
            if status != 200:
                return
            self._maybe_shadow(tally, entry, wire, "".join(relay.text))
            answer = relay.answer() if cache_key is not None and n == 1 else None
            if answer is not None and self.routing.cache is not None:
                assert cache_key is not None
                self.routing.spawn(self.routing.cache.put(cache_key, answer, entry.name, tally.row.cost_usd))

        relay = StreamRelay(tally, entry, served.stream, served.chunks, wants_usage=bool(options.get("include_usage")),
                            output_cap=reserved_output(cap, n) if admission is not None and isinstance(cap, int)
                            else None,
                            estimate=lambda text, produced: self._estimate(data, text, max(produced, count_text(text))),
                            on_close=on_close)
        return StreamResult(relay.frames(served.head), self._result_headers(entry, None, admission, decision))

    # -- cache, degraded answers, shadows ---------------------------------------------------------
    def _cache_key(self, rules: TenantRules, tenant_id: int, data: JSON) -> str | None:
        if self.routing.cache is None or not rules.policy.response_cache or not deterministic(data):
            return None
        return cache_key(tenant_id, data)

    async def _cached(self, tally: Tally, key: str, stream: bool, data: JSON,
                      models: list[ModelEntry]) -> JSONResult | StreamResult | None:
        """A cached answer, if its model is one this request may still be routed to now (an allow-list or
        quality floor changed since it was cached: a miss, and the new answer replaces it)."""
        assert self.routing.cache is not None
        hit = await self.routing.cache.get(key)
        if hit is None or (entry := next((m for m in models if m.name == hit.model), None)) is None:
            return None
        tally.bind(entry, reason="cache_hit")
        tally.row.cache_hit, tally.row.saved_usd = True, hit.cost_usd
        tally.first_token()
        usage = usage_of(hit.payload.get("usage")) or Usage()
        tally.close(200, usage=usage, usage_source="cache")
        headers = {"x-tollway-model": entry.name, "x-tollway-cost-usd": format_cost(Decimal(0)),
                   "x-tollway-cache": "hit", "x-tollway-route": "cache_hit"}
        return _finished(dict(hit.payload), headers, stream, data)

    def _degraded(self, tally: Tally, stream: bool, data: JSON, admission: Admission | None, decision: RouteDecision,
                  error: TollwayError) -> JSONResult | StreamResult:
        tally.row.degraded = True
        tally.row.model = DEGRADED_MODEL
        tally.row.route_reason = f"{decision.reason};degraded:{error.code}"
        tally.close(200, usage=Usage(), usage_source="degraded")
        headers = self._result_headers(None, Decimal(0), admission, decision)
        headers.update({"x-tollway-degraded": "true", "x-tollway-route": tally.row.route_reason})
        return _finished(degraded_completion(self.catalog.routing.degraded_message), headers, stream, data)

    def _maybe_shadow(self, tally: Tally, served: ModelEntry, wire: JSON, output: str) -> None:
        shadows = self.routing.shadows
        if shadows is None:
            return
        for rollout in self.catalog.routing.rollouts:
            if rollout.model != served.name or rollout.shadow_percent <= 0:
                continue
            if self.routing.rng.random() * 100 >= rollout.shadow_percent:
                continue
            candidate = Step.of(self.catalog, self.catalog.models[rollout.candidate])
            shadows.submit(ShadowJob(row=dataclasses.replace(tally.row), step=candidate, wire=wire,
                                     primary_output=output, primary_latency_ms=tally.row.latency_ms))

    # -- embeddings and models --------------------------------------------------------------------
    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        tally = self._open(ctx, "embeddings")
        with tally.closed_on_error():
            body = await read_body()
            data = parse_json_object(body)
            req = validate(EmbeddingRequest, data)
            tally.row.end_user = ctx.header_user or req.user
            entry = self.resolve(ctx.principal, req.model, "embedding")
            assert entry is not None
            tally.bind(entry)
            texts = req.input if isinstance(req.input, list) else [req.input]
            tokens = sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                         for t in texts)

            def worst_case(rules: TenantRules) -> tuple[Usage, None]:
                return Usage(input_tokens=math.ceil(tokens * INPUT_MARGIN) + INPUT_SLACK), None

            wire = dict(data)
            rules = await self._rules(ctx.principal.tenant_id)
            admission = await self._admit(ctx, tally, rules, [entry], body, wire, worst_case)
            # Embedding models are never swapped for one another (their vectors are not comparable):
            # only the replicas of this model are balanced and retried.
            try:
                served = await self.routing.caller.call(
                    RouteDecision((Step.of(self.catalog, entry),), "requested"), wire, stream=False,
                    endpoint="embeddings")
            except ChainFailed as failed:
                raise failed.error from None
            tally.bind(entry, replica=served.replica)
            assert served.response is not None
            response = served.response
        usage, source = usage_of(response.get("usage")), "upstream"
        if usage is None:
            usage, source = Usage(input_tokens=tokens), "estimated"
        response["model"] = entry.name
        cost = tally.close(200, usage=usage, usage_source=source)
        return JSONResult(response, self._result_headers(entry, cost, admission))

    def models(self, principal: Principal) -> JSON:
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                for m in self.catalog.models.values() if principal.may_use(m.name)]
        data += [{"id": alias, "object": "model", "created": 0, "owned_by": "tollway"}
                 for alias in sorted(self.catalog.auto_aliases)]
        return {"object": "list", "data": data}
