"""The completion service: validate, resolve the model, call the upstream, account for the cost.

Every authenticated call produces exactly one ledger row, whatever happens: a ``_Tally`` is opened
before the body is parsed and finished exactly once, by the success path, the error path, the end of
a stream, or a client disconnect.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from opentelemetry.trace import Span, SpanKind, StatusCode

from tollway.errors import InvalidRequest, NotFound, PermissionDenied, TollwayError, UpstreamBadResponse
from tollway.gateway.keys import Principal
from tollway.gateway.ledger import Ledger, LedgerRow
from tollway.gateway.protocol import ChatCompletionRequest, EmbeddingRequest, parse_json_object, validate
from tollway.gateway.telemetry import Telemetry
from tollway.routing import Catalog, ModelEntry, Upstream, UpstreamStream, Usage
from tollway.routing.tokens import count_messages, count_text

JSON = dict[str, Any]
BodyReader = Callable[[], Awaitable[bytes]]  # read inside the tally, so an oversized body is accounted too
_COST_QUANTUM = Decimal("1e-10")
INFERENCE_ROLES = frozenset({"app", "admin"})
CLIENT_CLOSED = 499  # nginx's convention; recorded in the ledger, never sent


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    principal: Principal
    header_user: str | None
    started: float  # time.perf_counter()
    created_at: datetime


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


def format_cost(cost: Decimal) -> str:
    return format(cost.quantize(_COST_QUANTUM), "f")


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    try:
        return Usage(input_tokens=int(raw.get("prompt_tokens") or 0),
                     output_tokens=int(raw.get("completion_tokens") or 0),
                     cached_tokens=int(cached or 0))
    except (TypeError, ValueError):
        return None


@dataclass(slots=True)
class _Tally:
    """One request's accounting: the ledger row it will write and the span it will end."""

    service: CompletionService
    row: LedgerRow
    span: Span
    started: float
    entry: ModelEntry | None = None
    usage: Usage = field(default_factory=Usage)
    finished: bool = False

    def bind(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.row.model = entry.name
        self.row.upstream = entry.upstream
        self.row.upstream_model = entry.upstream_model
        self.row.route_reason = "requested"
        self.row.price_source = entry.price.source
        self.span.set_attribute("gen_ai.request.model", entry.name)
        self.span.set_attribute("gen_ai.provider.name", entry.upstream)

    def first_token(self) -> None:
        if self.row.ttft_ms is None:
            self.row.ttft_ms = (time.perf_counter() - self.started) * 1000

    def finish(self, status: int, error_code: str | None = None, *, usage: Usage | None = None,
               usage_source: str | None = None) -> Decimal:
        if self.finished:
            return self.row.cost_usd
        self.finished = True
        row = self.row
        if usage is not None:
            self.usage = usage
            row.usage_source = usage_source
        row.status, row.error_code = status, error_code
        row.input_tokens = self.usage.input_tokens
        row.output_tokens = self.usage.output_tokens
        row.cached_tokens = self.usage.cached_tokens
        row.cost_usd = self.entry.price.cost(self.usage) if self.entry is not None else Decimal(0)
        row.latency_ms = (time.perf_counter() - self.started) * 1000
        self.service.ledger.record(row)
        self._report(row)
        return row.cost_usd

    def _report(self, row: LedgerRow) -> None:
        span, tel = self.span, self.service.telemetry
        span.set_attribute("gen_ai.usage.input_tokens", row.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", row.output_tokens)
        span.set_attribute("tollway.cost_usd", float(row.cost_usd))
        span.set_attribute("http.response.status_code", row.status)
        if row.model:
            span.set_attribute("gen_ai.response.model", row.model)
        if row.error_code:
            span.set_attribute("error.type", row.error_code)
            span.set_status(StatusCode.ERROR, row.error_code)
        span.end()
        attrs: dict[str, str | int] = {"gen_ai.request.model": row.model or "",
                                       "http.response.status_code": row.status}
        tel.requests.add(1, attrs)
        tel.duration.record(row.latency_ms / 1000, attrs)
        if row.cost_usd:
            tel.cost_usd.add(float(row.cost_usd), {"gen_ai.request.model": row.model or ""})
        if row.input_tokens:
            tel.tokens.add(row.input_tokens, {"gen_ai.token.type": "input"})
        if row.output_tokens:
            tel.tokens.add(row.output_tokens, {"gen_ai.token.type": "output"})


class CompletionService:
    def __init__(self, catalog: Catalog, upstreams: dict[str, Upstream], ledger: Ledger,
                 telemetry: Telemetry, limits: Limits) -> None:
        self.catalog = catalog
        self.upstreams = upstreams
        self.ledger = ledger
        self.telemetry = telemetry
        self.limits = limits

    # -- shared steps -----------------------------------------------------------------------------
    def _open(self, ctx: CallContext, endpoint: str) -> _Tally:
        p = ctx.principal
        span = self.telemetry.tracer.start_span(endpoint, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": "chat" if endpoint == "chat.completions" else "embeddings",
            "tollway.request_id": ctx.request_id, "tollway.tenant": p.tenant})
        row = LedgerRow(request_id=ctx.request_id, created_at=ctx.created_at, tenant_id=p.tenant_id,
                        key_id=p.key_id, endpoint=endpoint, end_user=ctx.header_user)
        return _Tally(service=self, row=row, span=span, started=ctx.started)

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

    def _result_headers(self, entry: ModelEntry, cost: Decimal | None) -> dict[str, str]:
        headers = {"x-tollway-model": entry.name}
        if cost is not None:
            headers["x-tollway-cost-usd"] = format_cost(cost)
        return headers

    # -- chat -------------------------------------------------------------------------------------
    async def chat(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        tally = self._open(ctx, "chat.completions")
        try:
            data = parse_json_object(await read_body())
            req = validate(ChatCompletionRequest, data)
            tally.row.stream = req.stream
            tally.row.end_user = ctx.header_user or req.user
            entry, upstream = self.resolve(ctx.principal, req.model, "chat")
            tally.bind(entry)
            self._check_limits(req)
            wire = dict(data)
            wire["model"] = entry.upstream_model
            if req.stream:
                return await self._start_stream(tally, entry, upstream, wire, data)
            response = await upstream.complete(wire)
        except TollwayError as exc:
            tally.finish(exc.status, exc.code)
            raise
        except BaseException:
            tally.finish(CLIENT_CLOSED, "client_disconnected")
            raise
        tally.first_token()
        usage, source = _usage(response.get("usage")), "upstream"
        if usage is None:
            usage, source = self._estimate(data, _completion_text(response)), "estimated"
        response["model"] = entry.name
        cost = tally.finish(200, usage=usage, usage_source=source)
        return JSONResult(response, self._result_headers(entry, cost))

    def _estimate(self, data: JSON, output: str, output_tokens: int | None = None) -> Usage:
        messages = data.get("messages")
        input_tokens = count_messages(messages) if isinstance(messages, list) else 0
        return Usage(input_tokens=input_tokens,
                     output_tokens=count_text(output) if output_tokens is None else output_tokens)

    async def _start_stream(self, tally: _Tally, entry: ModelEntry, upstream: Upstream, wire: JSON,
                            data: JSON) -> StreamResult:
        options = data.get("stream_options") or {}
        wants_usage = bool(options.get("include_usage"))
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
        relay = _StreamRelay(tally, entry, stream, chunks, data, wants_usage, self._estimate)
        return StreamResult(relay.frames(first), self._result_headers(entry, None))

    # -- embeddings and models --------------------------------------------------------------------
    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        tally = self._open(ctx, "embeddings")
        try:
            data = parse_json_object(await read_body())
            req = validate(EmbeddingRequest, data)
            tally.row.end_user = ctx.header_user or req.user
            entry, upstream = self.resolve(ctx.principal, req.model, "embedding")
            tally.bind(entry)
            wire = dict(data)
            wire["model"] = entry.upstream_model
            response = await upstream.embed(wire)
        except TollwayError as exc:
            tally.finish(exc.status, exc.code)
            raise
        except BaseException:
            tally.finish(CLIENT_CLOSED, "client_disconnected")
            raise
        usage, source = _usage(response.get("usage")), "upstream"
        if usage is None:
            texts = req.input if isinstance(req.input, list) else [req.input]
            tokens = sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                         for t in texts)
            usage, source = Usage(input_tokens=tokens), "estimated"
        response["model"] = entry.name
        cost = tally.finish(200, usage=usage, usage_source=source)
        return JSONResult(response, self._result_headers(entry, cost))

    def models(self, principal: Principal) -> JSON:
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                for m in self.catalog.models.values() if principal.may_use(m.name)]
        return {"object": "list", "data": data}


def _completion_text(response: JSON) -> str:
    parts = []
    for choice in response.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


def _delta_text(chunk: JSON) -> str:
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            parts.append(delta["content"])
    return "".join(parts)


def sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class _StreamRelay:
    """Relays an opened upstream stream to the client: renames the model, keeps or strips the usage
    chunk as the client asked, counts what was produced, and settles the tally exactly once."""

    def __init__(self, tally: _Tally, entry: ModelEntry, stream: UpstreamStream,
                 chunks: AsyncIterator[JSON], data: JSON, wants_usage: bool, estimate: Any) -> None:
        self.tally, self.entry, self.stream, self.chunks = tally, entry, stream, chunks
        self.data, self.wants_usage, self.estimate = data, wants_usage, estimate
        self.usage: Usage | None = None
        self.last: JSON = {}
        self.text: list[str] = []
        self.content_chunks = 0

    def _relay(self, chunk: JSON) -> bytes | None:
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        text = _delta_text(chunk)
        if text:
            self.tally.first_token()
            self.text.append(text)
            self.content_chunks += 1
        chunk["model"] = self.entry.name
        self.last = chunk
        if not self.wants_usage:
            chunk.pop("usage", None)
            if usage is not None and not chunk.get("choices"):
                return None
        return sse(chunk)

    def _usage_frame(self) -> bytes:
        usage, _ = self._settled_usage()
        return sse({"id": self.last.get("id"), "object": "chat.completion.chunk",
                    "created": self.last.get("created"), "model": self.entry.name, "choices": [],
                    "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                              "total_tokens": usage.input_tokens + usage.output_tokens}})

    def _settled_usage(self) -> tuple[Usage, str]:
        if self.usage is not None:
            return self.usage, "upstream"
        produced = "".join(self.text)
        estimated = self.estimate(self.data, produced, max(count_text(produced), self.content_chunks))
        return estimated, "estimated"

    async def frames(self, first: JSON) -> AsyncIterator[bytes]:
        status: int = CLIENT_CLOSED
        code: str | None = "client_disconnected"
        try:
            frame = self._relay(first)
            if frame is not None:
                yield frame
            try:
                async for chunk in self.chunks:
                    frame = self._relay(chunk)
                    if frame is not None:
                        yield frame
                status, code = 200, None
                if self.wants_usage and self.usage is None:
                    yield self._usage_frame()  # the client was promised a usage chunk
            except TollwayError as exc:
                status, code = exc.status, exc.code
                yield sse(exc.body())
            yield DONE
        finally:
            await self.stream.aclose()
            usage, source = self._settled_usage()
            self.tally.finish(status, code, usage=usage, usage_source=source)
