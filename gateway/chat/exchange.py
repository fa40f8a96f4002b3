"""One chat request on its way through the stages (``tollway.gateway.chat.stages``), and the seams where the
parts that join the path plug in: a prompt renderer, input guards, a retriever, output transformers.

Each seam is a small protocol with a no-op default, so a stage whose part has not landed costs one
attribute check. A part never sees the exchange: it gets a frozen ``ChatView`` (tenant, subject,
messages, parameters, prompt) and hands back what it found (a rendered prompt, a ``GuardVerdict``, a
``Retrieved``, an output filter); the stage applies it to the exchange and records it through the tally's
methods. Only the stages (``tollway.gateway.chat.stages``) assign the exchange's fields, and only the
tally writes the ledger row: ``tests/unit/house/test_owners.py`` holds both. What an answer says about
itself (the ``tollway`` object and the ``x-tollway-*`` headers) is built here once, from the exchange.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Protocol

from tollway.errors import TollwayError
from tollway.gateway.chat.calls import CallContext, JSONResult, StreamResult
from tollway.gateway.http.protocol import ChatCompletionRequest
from tollway.gateway.http.streaming import (
    BodyReader,  # read inside the tally: an oversized body is accounted too
)
from tollway.gateway.metering.accounting import Tally, format_cost
from tollway.gateway.metering.ledger import LedgerRow
from tollway.gateway.metering.quota import Admission
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import TenantRules
from tollway.guardrails import PromptGuards
from tollway.jsontypes import JSON
from tollway.routing import BudgetSignal, CachedAnswer, ModelEntry, Plan, RouteDecision, Served, Usage

# Fields of a chat request that are Tollway's to act on and never go upstream.
TOLLWAY_FIELDS = frozenset({"prompt", "retrieval"})


def int_param(params: Mapping[str, object], name: str) -> int | None:
    """An integer request field (a JSON bool is not one)."""
    value = params.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- what the parts hand back -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A versioned prompt rendered for one request (prompts/)."""

    name: str
    version: str
    messages: tuple[JSON, ...]  # go before the request's own messages
    model: str | None = None  # applies when the request's model is the 'prompt' alias
    params: JSON = field(default_factory=dict)  # apply unless the request sets them
    guards: PromptGuards | None = None  # the prompt's guard policy: overrides the tenant's per validator
    label: str | None = None  # the label the request named (None: it named a version)


@dataclass(frozen=True, slots=True)
class Retrieved:
    """Context found for one request (retrieval/), already packed to its budget."""

    collection: str
    index_version: str
    messages: tuple[JSON, ...]  # the packed context with citations, as system message(s)
    sources: tuple[JSON, ...] = ()
    context_tokens: int = 0
    error: str | None = None  # the retrieval failed and the request was answered without context
    cached: bool = False  # a cached answer grounded in this index version (its sources are not kept)
    guards: tuple[GuardOutcome, ...] = ()  # the passage screen's (passage_injection)
    rerank_error: str | None = None  # the reranker failed and the fused order was packed


@dataclass(frozen=True, slots=True)
class GuardOutcome:
    validator: str
    action: str  # 'pass', 'redact', 'block', 'fallback', 'log'
    spans: int = 0
    ms: float = 0.0
    detail: str | None = None  # what failed: span kinds, injection rules, the JSON problem

    def as_json(self) -> JSON:
        out: JSON = {"validator": self.validator, "action": self.action, "spans": self.spans, "ms": round(self.ms, 3)}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, slots=True)
class SideCall:
    """A call made for the request by one of its stages (the retrieval's embedding, a guard's model call):
    a ledger row of its own (``role``), settled with the request and counted in the tenant's spend."""

    role: str  # 'retrieval', 'guard'
    model: ModelEntry
    usage: Usage
    latency_ms: float
    replica: str | None = None
    status: int = 200
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class Fallback:
    """An answer the gateway gives instead of calling a model (an input guard's fallback message)."""

    model: str  # the name the answer and its ledger row carry
    reason: str  # the route reason recorded
    answer: JSON  # a chat.completion


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """What the input guards decided for one request: the outcomes to record, the conversation with their
    redactions (None: unchanged), and at most one of: refuse it, or answer it with a fallback."""

    outcomes: tuple[GuardOutcome, ...] = ()
    messages: tuple[JSON, ...] | None = None
    blocked: TollwayError | None = None  # refused: nothing reserved, sent or charged
    fallback: Fallback | None = None


@dataclass(frozen=True, slots=True)
class ChatView:
    """What a part may read of a request: a frozen snapshot taken by the stage that calls it."""

    principal: Principal
    subject: str  # the end user, or the key (``key:<id>``): whose budget and split bucket apply
    messages: tuple[JSON, ...]  # the conversation as it stands (the prompt's messages first)
    client_messages: tuple[JSON, ...]  # the messages as the client sent them
    params: Mapping[str, object]  # every other field that goes upstream
    prompt: RenderedPrompt | None
    rules: TenantRules | None
    n: int = 1  # choices asked for
    context_budget: int = 0  # tokens a retrieval may add

    @property
    def tenant_id(self) -> int:
        return self.principal.tenant_id


@dataclass(frozen=True, slots=True)
class Answered:
    """An upstream answer after it went out, for the work that follows it (shadows, live scoring). ``row``
    is the request's closed ledger row: read, never changed (a consumer that keeps it copies it)."""

    row: LedgerRow
    model: ModelEntry  # the model that answered
    sent: JSON | None  # the body it was sent
    messages: tuple[JSON, ...]
    output: str  # the answer's text as the client got it
    payload: Callable[[], JSON | None]  # the chat.completion, built on demand
    response_format: object
    label: str | None  # the prompt label the request named
    rollout_of: str | None  # the model a canary stands in for, when the route was a rollout
    guard_actions: tuple[str, ...]
    sources: tuple[JSON, ...]  # the retrieval's
    store_content: bool


# -- the seams ----------------------------------------------------------------------------------
class PromptRenderer(Protocol):
    def offers(self, tenant_id: int) -> bool:
        """Whether this tenant has prompts (then ``/v1/models`` lists the 'prompt' alias)."""
        ...

    async def render(self, view: ChatView, ref: JSON) -> RenderedPrompt:
        """``ref``: the request's ``prompt`` object. Raises a 4xx TollwayError for a bad reference."""
        ...


class InputGuard(Protocol):
    async def check(self, view: ChatView) -> GuardVerdict:
        """A verdict on the request before anything is spent (``blocked``: refuse it with that error)."""
        ...


class Retriever(Protocol):
    def context_budget(self, view: ChatView, spec: JSON) -> int:
        """The most tokens the retrieval may add (planned and reserved as if already there). Raises a 4xx
        TollwayError for a bad ``retrieval`` object."""
        ...

    async def index_version(self, view: ChatView, spec: JSON) -> str:
        """The collection's current index version (part of the response cache key), before retrieving."""
        ...

    def screening(self, view: ChatView) -> str | None:
        """How the passages are screened for injections (part of the response cache key), or None."""
        ...

    def search_settings(self) -> str:
        """How contexts are ranked and packed, in a few characters (part of the response cache key)."""
        ...

    async def retrieve(self, view: ChatView, spec: JSON, calls: list[SideCall]) -> Retrieved | None:
        """Runs after admission; appends each model call it makes (its embedding) to ``calls``, which the
        stage records whether it returns or raises."""
        ...


class OutputFilter(Protocol):
    """One request's instance of an output transformer: chunks in, chunks out (it may hold some back). A
    filter with a true ``done`` attribute has ended the answer: the relay stops reading the upstream."""

    async def chunk(self, chunk: JSON) -> list[JSON]: ...

    async def end(self) -> list[JSON]:
        """The upstream has finished: release what is held back."""
        ...

    def outcomes(self) -> list[GuardOutcome]:
        """What it did so far (recorded in the ledger row and the ``tollway`` object)."""
        ...


class OutputTransformer(Protocol):
    def start(self, view: ChatView) -> OutputFilter | None:
        """A filter for this request, or None when it has nothing to do (then it costs nothing)."""
        ...


@dataclass(slots=True)
class Parts:
    """The parts that join the chat path; empty until they land (and in tests, doubles)."""

    prompts: PromptRenderer | None = None
    input_guards: tuple[InputGuard, ...] = ()
    retriever: Retriever | None = None
    output: tuple[OutputTransformer, ...] = ()


# -- the exchange --------------------------------------------------------------------------------
@dataclass(slots=True)
class Exchange:
    """Everything one chat request gathers on its way: each stage reads what the ones before it set.

    ``data`` is the request as the client sent it and is never edited; what goes upstream is built once
    from ``messages`` and ``params`` by ``upstream_body`` just before the call."""

    tally: Tally
    read_body: BodyReader
    ctx: CallContext
    body: bytes = b""
    data: JSON = field(default_factory=dict)
    request: ChatCompletionRequest | None = None
    rules: TenantRules | None = None
    prompt: RenderedPrompt | None = None
    end_user: str | None = None
    model: str = ""  # the model asked for (after the prompt's, for the 'prompt' alias)
    messages: list[JSON] = field(default_factory=list)  # the conversation as it will be sent
    params: JSON = field(default_factory=dict)  # every other field sent upstream
    output_cap: int | None = None  # max tokens per choice, the tenant's default injected when unset
    context_budget: int = 0  # tokens a retrieval may add, planned and reserved before it runs
    prompt_tokens: int | None = None  # the prompt's tokens (``count_prompt``), where the route's planning counted them
    index_version: str | None = None  # the collection's, when the cache key needed it
    plan: Plan | None = None
    cache_key: str | None = None
    admission: Admission | None = None
    budget: BudgetSignal = field(default_factory=BudgetSignal)
    retrieved: Retrieved | None = None
    decision: RouteDecision | None = None
    sent: JSON | None = None  # the body the upstream got
    served: Served | None = None
    answer: JSON | None = None  # a whole answer (upstream JSON, cached, degraded)
    answered_by: str | None = None  # the model name the answer carries (a served, cached or gateway answer)
    price_source: str | None = None  # where that model's price comes from ('unpriced': it costs $0 here)
    route: str | None = None  # why it was routed there
    degraded: bool = False
    cached: CachedAnswer | None = None
    guards: tuple[GuardOutcome, ...] = ()  # the input guards'
    filters: tuple[OutputFilter, ...] = ()  # the output transformers' (their outcomes asked for at the end)
    frames: AsyncIterator[bytes] | None = None  # a stream's answer, relayed and settled as it goes
    settled: tuple[Usage, str] | None = None  # a whole answer's usage and its source, recorded last
    cost: Decimal | None = None
    result: JSONResult | StreamResult | None = None

    @property
    def req(self) -> ChatCompletionRequest:
        assert self.request is not None, "the parse stage runs first"
        return self.request

    def need_rules(self) -> TenantRules:
        assert self.rules is not None, "the rules stage runs first"
        return self.rules

    def need_plan(self) -> Plan:
        assert self.plan is not None, "the plan_route stage runs first"
        return self.plan

    @property
    def subject(self) -> str:
        return self.end_user or f"key:{self.ctx.principal.key_id}"

    def view(self) -> ChatView:
        """A frozen snapshot for a part."""
        return ChatView(principal=self.ctx.principal, subject=self.subject, messages=tuple(self.messages),
                        client_messages=tuple(self.data.get("messages") or ()), params=MappingProxyType(self.params),
                        prompt=self.prompt, rules=self.rules,
                        n=self.request.n or 1 if self.request is not None else 1, context_budget=self.context_budget)

    async def abandon(self) -> None:
        """The request failed before its answer was handed on (a relay never started): give back an upstream
        stream that was opened, and its replica."""
        served = self.served
        if served is not None and served.stream is not None:
            await served.stream.aclose()
            served.release(False, count=False)

    def all_guards(self) -> list[GuardOutcome]:
        """Every guard outcome so far: the input guards', then the output guards' (as far as they got)."""
        return [*self.guards, *(o for f in self.filters for o in f.outcomes())]

    def grounded_as_keyed(self) -> bool:
        """Its context is the one its cache key names: no retrieval, or one that read the collection at the
        index version the key holds, with neither the search nor its reranker failing (an answer made without
        them is not this request's answer once they work again)."""
        r = self.retrieved
        return r is None or (r.error is None and r.rerank_error is None and r.index_version == self.index_version)

    def guards_changed(self) -> bool:
        """A guard rewrote, withheld or replaced something of this answer (it is not cached)."""
        return any(g.action in ("redact", "block", "fallback") for g in self.all_guards())

    @property
    def stream(self) -> bool:
        return self.request is not None and self.request.stream

    @property
    def answered(self) -> bool:
        """An answer exists (a cache hit, a degraded answer, or the upstream's): the request stages are done."""
        return self.answer is not None or self.served is not None

    def upstream_body(self) -> JSON:
        """The body sent upstream, built once, just before the call: nothing else edits it."""
        body = {**self.params, "messages": self.messages}
        if self.output_cap is not None and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = self.output_cap  # the tenant's default cap bounds the worst case
        if self.stream:
            body["stream_options"] = {**(self.params.get("stream_options") or {}), "include_usage": True}
        return body

    # -- what the answer says about itself ------------------------------------------------------
    def info(self, cost: Decimal | None) -> JSON:
        """The ``tollway`` object of the answer."""
        retrieved = self.retrieved
        return {
            "request_id": self.ctx.request_id,
            "model": self.answered_by,
            "route": self.route,
            "cost_usd": None if cost is None else format_cost(cost),
            "price_source": self.price_source,
            "prompt": None if self.prompt is None else {"name": self.prompt.name, "version": self.prompt.version},
            "retrieval": None if retrieved is None else {
                "collection": retrieved.collection, "index_version": retrieved.index_version,
                "context_tokens": retrieved.context_tokens, "sources": list(retrieved.sources),
                **({"error": retrieved.error} if retrieved.error else {}),
                **({"rerank_error": retrieved.rerank_error} if retrieved.rerank_error else {}),
                **({"cached": True} if retrieved.cached else {})},
            "guards": [g.as_json() for g in self.all_guards()],
        }

    def headers(self, cost: Decimal | None) -> dict[str, str]:
        headers = {"x-tollway-model": self.answered_by or ""}
        if self.route:
            headers["x-tollway-route"] = self.route
        if cost is not None:
            headers["x-tollway-cost-usd"] = format_cost(cost)
        if self.price_source is not None:
            headers["x-tollway-price-source"] = self.price_source
        if self.prompt is not None:
            headers["x-tollway-prompt-version"] = f"{self.prompt.name}@{self.prompt.version}"
        if self.retrieved is not None:
            headers["x-tollway-index-version"] = self.retrieved.index_version
        if self.cached is not None:
            headers["x-tollway-cache"] = "hit"
        if self.degraded:
            headers["x-tollway-degraded"] = "true"
        if self.admission is not None:
            headers.update(self.admission.headers)
        return headers
