"""The completion service: validate, resolve the model, admit against budgets, call the upstream,
account for the cost. Accounting lives in ``accounting``, stream relaying in ``relay``, budgets in
``quota``; this module wires them in the order the request path needs."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from opentelemetry.trace import SpanKind

from tollway.errors import InvalidRequest, NotFound, PermissionDenied, TollwayError, UpstreamBadResponse
from tollway.gateway.accounting import CLIENT_CLOSED, Tally, format_cost, usage_of
from tollway.gateway.keys import Principal
from tollway.gateway.ledger import Ledger, LedgerRow
from tollway.gateway.policy import PolicyStore, TenantRules
from tollway.gateway.protocol import ChatCompletionRequest, EmbeddingRequest, parse_json_object, validate
from tollway.gateway.quota import Admission, Demand, QuotaService, fingerprint, to_nano
from tollway.gateway.relay import StreamRelay, choice_text
from tollway.gateway.telemetry import Telemetry
from tollway.routing import Catalog, ModelEntry, Upstream, Usage
from tollway.routing.tokens import count_messages, count_text

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


class CompletionService:
    def __init__(self, catalog: Catalog, upstreams: dict[str, Upstream], ledger: Ledger,
                 telemetry: Telemetry, limits: Limits, policies: PolicyStore | None = None,
                 quota: QuotaService | None = None) -> None:
        self.catalog = catalog
        self.upstreams = upstreams
        self.ledger = ledger
        self.telemetry = telemetry
        self.limits = limits
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

    def resolve(self, principal: Principal, name: str, kind: str) -> tuple[ModelEntry, Upstream]:
        if principal.role not in INFERENCE_ROLES:
            raise PermissionDenied(f"A {principal.role} key may not call models.", code="role_not_allowed")
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
        return entry, self.upstreams[entry.upstream]

    def _check_limits(self, req: ChatCompletionRequest) -> None:
        if len(req.messages) > self.limits.max_messages:
            raise InvalidRequest(f"At most {self.limits.max_messages} messages are allowed.", param="messages")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name)
            if value is not None and value > self.limits.max_tokens:
                raise InvalidRequest(f"'{name}' may be at most {self.limits.max_tokens}.", param=name)

    async def _admit(self, ctx: CallContext, tally: Tally, entry: ModelEntry, body: bytes, wire: JSON,
                     worst_case: Callable[[TenantRules], tuple[Usage, int | None]]) -> Admission | None:
        """Reserve the worst case in every budget and limit that applies, or refuse (429/503)."""
        if self.quota is None or self.policies is None:
            return None
        rules = await self.policies.rules(ctx.principal.tenant_id)
        demand = Demand(0, 0)
        output_cap = None
        if _needs_bound(rules, ctx.principal):
            worst, output_cap = worst_case(rules)
            demand = Demand(to_nano(entry.price.cost(worst)), worst.input_tokens + worst.output_tokens)
        admission = await self.quota.admit(
            ctx.principal, rules, rid=ctx.request_id, end_user=tally.row.end_user, session=ctx.session,
            fingerprint=fingerprint(ctx.principal.tenant_id, body), demand=demand)
        tally.reservation = admission.reservation
        if output_cap is not None and "max_tokens" not in wire and "max_completion_tokens" not in wire:
            wire["max_tokens"] = output_cap  # the tenant's default cap bounds the worst case
        if admission.step_down:
            tally.row.route_reason = "requested;velocity_soft_step_down"
        return admission

    def _result_headers(self, entry: ModelEntry, cost: Decimal | None,
                        admission: Admission | None) -> dict[str, str]:
        headers = {"x-tollway-model": entry.name}
        if cost is not None:
            headers["x-tollway-cost-usd"] = format_cost(cost)
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
        try:
            body = await read_body()
            data = parse_json_object(body)
            req = validate(ChatCompletionRequest, data)
            tally.row.stream = req.stream
            tally.row.end_user = ctx.header_user or req.user
            tally.row.tags = _tags(ctx, data)
            entry, upstream = self.resolve(ctx.principal, req.model, "chat")
            tally.bind(entry)
            self._check_limits(req)
            wire = dict(data)
            wire["model"] = entry.upstream_model

            def worst_case(rules: TenantRules) -> tuple[Usage, int]:
                cap = req.max_completion_tokens or req.max_tokens or rules.policy.default_max_tokens
                prompt = math.ceil(count_messages(data["messages"]) * INPUT_MARGIN) + INPUT_SLACK
                return Usage(input_tokens=prompt, output_tokens=reserved_output(cap, req.n)), cap

            admission = await self._admit(ctx, tally, entry, body, wire, worst_case)
            if req.stream:
                return await self._start_stream(tally, entry, upstream, wire, data, admission)
            response = await upstream.complete(wire)
        except TollwayError as exc:
            tally.close(exc.status, exc.code)
            raise
        except BaseException:
            tally.close(CLIENT_CLOSED, "client_disconnected")
            raise
        tally.first_token()
        usage, source = usage_of(response.get("usage")), "upstream"
        if usage is None:
            usage, source = self._estimate(data, choice_text(response, "message")), "estimated"
        response["model"] = entry.name
        cost = tally.close(200, usage=usage, usage_source=source)
        return JSONResult(response, self._result_headers(entry, cost, admission))

    async def _start_stream(self, tally: Tally, entry: ModelEntry, upstream: Upstream, wire: JSON,
                            data: JSON, admission: Admission | None) -> StreamResult:
        options = data.get("stream_options") or {}
        wire["stream_options"] = {**options, "include_usage": True}  # usage is needed for the ledger
        stream = await upstream.open_stream(wire)
        chunks = stream.__aiter__()
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            await stream.aclose()
            raise UpstreamBadResponse(f"upstream {entry.upstream} sent an empty stream") from None
        except BaseException:
            await stream.aclose()
            raise
        cap = wire.get("max_completion_tokens") or wire.get("max_tokens")
        n = wire["n"] if isinstance(wire.get("n"), int) else 1
        relay = StreamRelay(tally, entry, stream, chunks, wants_usage=bool(options.get("include_usage")),
                            output_cap=reserved_output(cap, n) if admission is not None and isinstance(cap, int)
                            else None,
                            estimate=lambda text, produced: self._estimate(data, text, max(produced, count_text(text))))
        return StreamResult(relay.frames(first), self._result_headers(entry, None, admission))

    # -- embeddings and models --------------------------------------------------------------------
    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        tally = self._open(ctx, "embeddings")
        try:
            body = await read_body()
            data = parse_json_object(body)
            req = validate(EmbeddingRequest, data)
            tally.row.end_user = ctx.header_user or req.user
            entry, upstream = self.resolve(ctx.principal, req.model, "embedding")
            tally.bind(entry)
            texts = req.input if isinstance(req.input, list) else [req.input]
            tokens = sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                         for t in texts)

            def worst_case(rules: TenantRules) -> tuple[Usage, None]:
                return Usage(input_tokens=math.ceil(tokens * INPUT_MARGIN) + INPUT_SLACK), None

            wire = dict(data)
            wire["model"] = entry.upstream_model
            admission = await self._admit(ctx, tally, entry, body, wire, worst_case)
            response = await upstream.embed(wire)
        except TollwayError as exc:
            tally.close(exc.status, exc.code)
            raise
        except BaseException:
            tally.close(CLIENT_CLOSED, "client_disconnected")
            raise
        usage, source = usage_of(response.get("usage")), "upstream"
        if usage is None:
            usage, source = Usage(input_tokens=tokens), "estimated"
        response["model"] = entry.name
        cost = tally.close(200, usage=usage, usage_source=source)
        return JSONResult(response, self._result_headers(entry, cost, admission))

    def models(self, principal: Principal) -> JSON:
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                for m in self.catalog.models.values() if principal.may_use(m.name)]
        return {"object": "list", "data": data}
