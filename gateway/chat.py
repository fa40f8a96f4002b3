"""The chat path: one ordered list of named stages over one ``Exchange``. ``CHAT_STAGES`` at the end of
this module is the list; each stage is one call into its part. Stages in brackets belong to parts that
plug in through ``Parts`` (``tollway.gateway.exchange``) and do nothing when their part is absent:

    parse -> rules -> [render_prompt] -> authorize -> [guard_input] -> plan_route -> cached_answer
      -> admit -> [retrieve] -> decide -> call -> [guard_output] -> settle -> respond

Why this order: the prompt may name the model, so authorization follows rendering; the route is planned
with the prompt's tokens plus the retrieval's context budget as an upper bound, so retrieval never
needs a re-plan that grows the request (decide may only narrow it); the cached answer is looked up
before admission (a hit is free) with a key over the request, the prompt version and the collection's
index version; retrieval runs after admission, so its embedding call is admitted like any spend and a
refused request sends nothing anywhere. Once an answer exists (a cache hit, a degraded answer) the
request stages are skipped and the answer stages run: every answer leaves through the same output chain.
The whole run, the JSON tail included, is inside the tally's error handling: one ledger row per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

from tollway.errors import InvalidRequest, QuotaExceeded
from tollway.gateway.accounting import CLIENT_CLOSED, usage_of
from tollway.gateway.answers import DEGRADED_MODEL, degraded_completion
from tollway.gateway.calls import (
    CallContext,
    Calls,
    JSONResult,
    StreamResult,
    reserved_input,
    reserved_output,
    tags_of,
)
from tollway.gateway.exchange import TOLLWAY_FIELDS, Exchange, Parts, Retrieved
from tollway.gateway.protocol import ChatCompletionRequest, parse_json_object, validate
from tollway.gateway.quality import LiveQuality
from tollway.gateway.relay import Accountant, Emitter, StreamRelay, as_chunks, choice_text, transform_whole
from tollway.gateway.shadow import Shadows
from tollway.gateway.streaming import BodyReader
from tollway.jsontypes import JSON
from tollway.routing import Attempt, BudgetSignal, ChainFailed, Router, Usage, count_messages, count_text

PROMPT_ALIAS = "prompt"  # the model name that means "the model the prompt names"


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: Callable[[Chat, Exchange], Awaitable[None]]
    answers: bool = False  # runs on an answer (guard output, settle, respond); the others stop once one exists


def _int(params: JSON, name: str) -> int | None:
    value = params.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Chat:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None, quality: LiveQuality | None = None) -> None:
        self.calls = calls
        self.router = router
        self.catalog = router.catalog
        self.parts = parts or Parts()
        self.shadows = shadows
        self.quality = quality

    async def __call__(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        ex = Exchange(tally=self.calls.open(ctx, "chat.completions"), read_body=read_body, ctx=ctx)
        with ex.tally.closed_on_error():
            try:
                for stage in CHAT_STAGES:
                    if stage.answers or not ex.answered:
                        await stage.run(self, ex)
            except BaseException:
                await ex.abandon()  # a stream opened upstream that will never be relayed
                raise
            assert ex.result is not None
            if ex.settled is not None:  # a whole answer: recorded only once nothing can fail any more
                self._close(ex, 200, None, *ex.settled)
                await self._after(ex)
            return ex.result

    # -- request stages ---------------------------------------------------------------------------
    async def parse(self, ex: Exchange) -> None:
        """The OpenAI request (pydantic), with the gateway's limits; ``messages`` and ``params`` start as
        the client's."""
        ex.body = await ex.read_body()
        data = ex.data = parse_json_object(ex.body)
        req = ex.request = validate(ChatCompletionRequest, data)
        if not req.messages and data.get("prompt") is None:
            raise InvalidRequest("'messages' must hold at least one message (it may be empty only when the "
                                 "request names a prompt).", param="messages")
        row = ex.tally.row
        row.stream = req.stream
        row.end_user = ex.ctx.header_user or req.user
        row.tags = tags_of(ex.ctx, data)
        self.calls.check_messages(len(req.messages))
        self.calls.check_max_tokens("max_tokens", req.max_tokens)
        self.calls.check_max_tokens("max_completion_tokens", req.max_completion_tokens)
        for name in TOLLWAY_FIELDS:
            if name in data and not isinstance(data[name], dict):
                raise InvalidRequest(f"'{name}' must be an object.", param=name)
        ex.model = req.model
        ex.messages = list(data["messages"])
        ex.params = {k: v for k, v in data.items() if k != "messages" and k not in TOLLWAY_FIELDS}
        self.router.check_fields("chat", ex.params)

    async def rules(self, ex: Exchange) -> None:
        ex.rules = await self.calls.rules(ex.ctx.principal.tenant_id)

    async def render_prompt(self, ex: Exchange) -> None:
        """[prompts/] A named prompt version, rendered from memory: its messages go first, its parameters
        apply unless the request sets them, its model applies for the 'prompt' alias."""
        ref = ex.data.get("prompt")
        if ref is None:
            if ex.model == PROMPT_ALIAS:
                raise InvalidRequest("Model 'prompt' means the model of the prompt the request names; this "
                                     "request names none.", param="prompt")
            return
        if self.parts.prompts is None:
            raise InvalidRequest("This gateway has no prompt registry.", param="prompt", code="prompts_unavailable")
        prompt = ex.prompt = await self.parts.prompts.render(ex, ref)
        ex.messages = [*prompt.messages, *ex.messages]
        ex.params = {**prompt.params, **ex.params}
        if ex.model == PROMPT_ALIAS:
            if not prompt.model:
                raise InvalidRequest(f"Prompt '{prompt.name}' names no model; name one in the request.",
                                     param="model")
            ex.model = prompt.model
        ex.tally.row.prompt_name, ex.tally.row.prompt_version = prompt.name, prompt.version

    async def authorize(self, ex: Exchange) -> None:
        """The key may call models, and this one (or a routing alias)."""
        self.calls.resolve(ex.ctx.principal, ex.model, "chat")

    async def guard_input(self, ex: Exchange) -> None:
        """[guardrails/] A block refuses the request here: nothing is reserved, sent or charged."""
        for guard in self.parts.input_guards:
            ex.guards += await guard.check(ex)

    async def plan_route(self, ex: Exchange) -> None:
        """The route before budgets are known, with the retrieval's context budget counted as if already
        in the prompt; and the cache key of a deterministic request."""
        rules, principal = ex.need_rules(), ex.ctx.principal
        spec = ex.data.get("retrieval")
        if spec is not None:
            if self.parts.retriever is None:
                raise InvalidRequest("This gateway has no retrieval.", param="retrieval",
                                     code="retrieval_unavailable")
            ex.context_budget = self.parts.retriever.context_budget(ex, spec)
        ex.output_cap = _int(ex.params, "max_completion_tokens") or _int(ex.params, "max_tokens")
        route = self.router.features(ex.model, ex.messages, ex.params, max_output=ex.output_cap or 0,
                                     n=ex.req.n, extra_input=ex.context_budget)
        subject = ex.tally.row.end_user or f"key:{principal.key_id}"
        ex.plan = self.router.plan(route, self.calls.tenant_routing(rules, principal), subject)
        if rules.policy.response_cache:
            versions: tuple[str | None, ...] = ()
            if spec is not None:
                assert self.parts.retriever is not None
                ex.index_version = await self.parts.retriever.index_version(ex, spec)
                versions = (None if ex.prompt is None else ex.prompt.version, ex.index_version)
            elif ex.prompt is not None:
                versions = (ex.prompt.version,)
            ex.cache_key = self.router.cache_key(principal.tenant_id, {**ex.params, "messages": ex.messages},
                                                 versions)

    async def cached_answer(self, ex: Exchange) -> None:
        """A cached answer is free, if its model is one this request may still be routed to now (an
        allow-list or quality floor changed since it was cached: a miss, and the new answer replaces it)."""
        if ex.cache_key is None:
            return
        hit = await self.router.cached(ex.cache_key)
        plan = ex.need_plan()
        if hit is None or (entry := next((m for m in plan.models if m.name == hit.model), None)) is None:
            return
        ex.tally.bind(entry, reason="cache_hit")
        ex.tally.row.cache_hit, ex.tally.row.saved_usd = True, hit.cost_usd
        ex.tally.first_token()
        ex.cached, ex.answer = hit, dict(hit.payload)
        spec = ex.data.get("retrieval")
        if ex.index_version is not None and isinstance(spec, dict):  # grounded in this very index version
            ex.tally.row.index_version = ex.index_version
            ex.retrieved = Retrieved(collection=str(spec.get("collection")), index_version=ex.index_version,
                                     messages=(), cached=True)

    async def admit(self, ex: Exchange) -> None:
        """Reserve the worst case of the planned chain, or refuse; for a routing alias whose top tier no
        longer fits the budget, try once more a tier down (not counted as a retry storm)."""
        rules, plan, principal = ex.need_rules(), ex.need_plan(), ex.ctx.principal
        worst = None
        if self.calls.bounded(rules, principal):
            if ex.output_cap is None:
                ex.output_cap = rules.policy.default_max_tokens  # injected upstream: it bounds the worst case
            worst = Usage(input_tokens=reserved_input(count_messages(ex.messages) + ex.context_budget),
                          output_tokens=reserved_output(ex.output_cap, ex.req.n))
        else:
            ex.output_cap = None
        retries = self.catalog.routing.max_attempts - 1 if ex.stream else 0
        try:
            ex.admission = await self.calls.admit(ex.ctx, ex.tally, rules, ex.body, plan.chain, worst,
                                                  retries=retries)
            headroom = ex.admission.headroom if ex.admission else None
        except QuotaExceeded:
            cheaper = self.router.step_down(plan)
            if not cheaper:
                raise
            ex.admission = await self.calls.admit(ex.ctx, ex.tally, rules, ex.body, cheaper, worst,
                                                  retries=retries, count_storm=False)
            headroom = 0.0
        ex.budget = BudgetSignal(headroom=headroom, velocity_soft=bool(ex.admission and ex.admission.step_down))

    async def retrieve(self, ex: Exchange) -> None:
        """[retrieval/] Context packed into the planned budget, placed after the leading system messages."""
        spec = ex.data.get("retrieval")
        if spec is None or self.parts.retriever is None:
            return
        found = ex.retrieved = await self.parts.retriever.retrieve(ex, spec)
        if found is None:
            return
        lead = next((i for i, m in enumerate(ex.messages) if m.get("role") not in ("system", "developer")),
                    len(ex.messages))
        ex.messages = [*ex.messages[:lead], *found.messages, *ex.messages[lead:]]
        ex.tally.row.index_version = found.index_version

    async def decide(self, ex: Exchange) -> None:
        """The final route: the plan, narrowed by the budget signals admission returned."""
        ex.decision = self.router.decide(ex.need_plan(), ex.budget)
        ex.tally.row.route_reason = ex.decision.reason

    async def call(self, ex: Exchange) -> None:
        """Through the fallback chain with deadlines; the last resort, where the tenant allows it, is a
        templated degraded answer that says what it is."""
        decision = ex.decision
        assert decision is not None
        body = ex.upstream_body()
        try:
            served = await self.router.call(decision, body, stream=ex.stream, affinity=self.router.affinity(ex.messages))
        except ChainFailed as failed:
            self._record_attempts(ex, failed.attempts)
            if not decision.degraded_allowed:
                raise failed.error from None
            row = ex.tally.row
            row.degraded, row.model = True, DEGRADED_MODEL
            row.route_reason = f"{decision.reason};degraded:{failed.error.code}"
            ex.answer = degraded_completion(self.catalog.routing.degraded_message)
            return
        ex.served, ex.sent = served, body
        self._record_attempts(ex, served.attempts)
        ex.tally.bind(served.step.model, replica=served.replica, reason=decision.reason)
        if decision.rollout is not None and served.step.model is decision.target:
            ex.tally.row.rollout = decision.rollout
        if served.response is not None:
            served.release(True)  # a JSON answer is whole: its replica is free again
            ex.answer = served.response
            ex.tally.first_token()

    def _record_attempts(self, ex: Exchange, attempts: list[Attempt]) -> None:
        """A ledger row per failed attempt; one that the upstream had started answering is charged
        the prompt (hosted APIs bill a prompt they read), the others cost nothing."""
        for attempt in attempts:
            usage = Usage(input_tokens=count_messages(ex.messages)) if attempt.started_answer else Usage()
            ex.tally.failed_attempt(attempt.step.model, attempt.replica, attempt.error.status, attempt.error.code,
                                    usage, attempt.elapsed_ms)

    # -- answer stages ----------------------------------------------------------------------------
    async def guard_output(self, ex: Exchange) -> None:
        """[guardrails/] The output transformers for this request, between accounting and emitting."""
        ex.filters = [f for t in self.parts.output if (f := t.start(ex)) is not None]

    async def settle(self, ex: Exchange) -> None:
        """A whole answer: through the output chain, then actual usage replaces the reservation (priced
        here, recorded when the run ends, so a failure up to the last moment is still one 500 row). A
        stream settles as it ends (``StreamRelay``): here it is set up."""
        if ex.stream:
            ex.frames = self._relay(ex)
            return
        assert ex.answer is not None
        payload = await transform_whole(ex.filters, ex.answer)
        if ex.served is not None:
            payload["model"] = ex.served.step.model.name
        ex.settled = self._usage(ex, payload)
        ex.cost = ex.tally.price(ex.settled[0])
        ex.answer = payload

    async def respond(self, ex: Exchange) -> None:
        """The answer with what it says about itself: headers, and the ``tollway`` object (on the final
        chunk of a stream)."""
        if ex.frames is not None:
            ex.result = StreamResult(ex.frames, ex.headers(None))
            return
        assert ex.answer is not None
        ex.result = JSONResult({**ex.answer, "tollway": ex.info(ex.cost)}, ex.headers(ex.cost))

    # -- helpers of the answer stages -----------------------------------------------------------
    def _usage(self, ex: Exchange, payload: JSON) -> tuple[Usage, str]:
        if ex.cached is not None:
            return usage_of(payload.get("usage")) or Usage(), "cache"
        if ex.served is None:  # the gateway's own answer: degraded, or an input guard's fallback
            return Usage(), "degraded" if ex.tally.row.degraded else "gateway"
        usage = usage_of(payload.get("usage"))
        if usage is not None:
            return usage, "upstream"
        return self._estimate(ex, choice_text(payload, "message")), "estimated"

    def _estimate(self, ex: Exchange, text: str, produced: int = 0) -> Usage:
        return Usage(input_tokens=count_messages(ex.messages), output_tokens=max(produced, count_text(text)))

    def _close(self, ex: Exchange, status: int, code: str | None, usage: Usage, source: str) -> Decimal:
        if guards := ex.all_guards():
            ex.tally.row.guard_outcome = [g.as_json() for g in guards]
        return ex.tally.close(status, code, usage=usage, usage_source=source)

    def _relay(self, ex: Exchange) -> AsyncIterator[bytes]:
        served = ex.served
        wants_usage = bool((ex.data.get("stream_options") or {}).get("include_usage"))

        def settle(status: int, code: str | None, usage: Usage, source: str) -> Decimal:
            return self._close(ex, status, code, usage, source)

        emitter = Emitter(ex.tally.row.model or "", wants_usage=wants_usage)
        if served is None or served.stream is None:  # a cached or degraded answer, replayed
            assert ex.answer is not None
            chunks = as_chunks(ex.answer, include_usage=True)
            accountant = Accountant(ex.tally, fixed=self._usage(ex, ex.answer))
            return StreamRelay(None, chunks, accountant=accountant, filters=ex.filters, emitter=emitter,
                               settle=settle,
                               info=ex.info).frames()
        n = _int(ex.params, "n") or 1
        cap = ex.output_cap
        accountant = Accountant(ex.tally, output_cap=reserved_output(cap, n) if ex.admission and cap else None,
                                estimate=lambda text, produced: self._estimate(ex, text, produced))
        stream = served.stream
        entry = served.step.model

        def on_close(relay: StreamRelay, status: int) -> None:
            served.release(status == 200, count=status != CLIENT_CLOSED)
            if status != 200:
                return
            text = "".join(emitter.text)
            self._shadow(ex, text)
            finish = accountant.finish_reason
            if not finish:
                return
            usage, _ = accountant.settled()

            def answer() -> JSON:
                return emitter.answer(finish, usage)

            if self.quality is not None:
                self.quality.offer(ex, text, answer)  # built only for a sampled answer
            if ex.cache_key is not None and n == 1 and accountant.plain_text and not ex.guards_changed():
                self.router.remember(ex.cache_key, answer(), entry.name, ex.tally.row.cost_usd)

        assert served.chunks is not None
        return StreamRelay(served.chunks, served.head, accountant=accountant, filters=ex.filters, emitter=emitter,
                           settle=settle,
                           info=ex.info, close_upstream=stream.aclose, on_close=on_close).frames()

    async def _after(self, ex: Exchange) -> None:
        """Work after a whole upstream answer: cache it (deterministic requests), sample it for shadows and
        for live scoring."""
        if ex.served is None or ex.answer is None:
            return
        if ex.cache_key is not None and not ex.guards_changed():  # what guards changed is not kept
            await self.router.store(ex.cache_key, ex.answer, ex.served.step.model.name, ex.tally.row.cost_usd)
        text = choice_text(ex.answer, "message")
        self._shadow(ex, text)
        if self.quality is not None:
            answer = ex.answer
            self.quality.offer(ex, text, lambda: answer)

    def _shadow(self, ex: Exchange, output: str) -> None:
        if self.shadows is not None and ex.served is not None and ex.sent is not None:
            rules = ex.rules
            self.shadows.maybe(ex.tally.row, ex.served.step.model, ex.sent, output,
                               store_content=bool(rules is not None and rules.policy.store_content))


CHAT_STAGES: tuple[Stage, ...] = (
    Stage("parse", Chat.parse),
    Stage("rules", Chat.rules),
    Stage("render_prompt", Chat.render_prompt),  # prompts/
    Stage("authorize", Chat.authorize),
    Stage("guard_input", Chat.guard_input),  # guardrails/ (input guards)
    Stage("plan_route", Chat.plan_route),
    Stage("cached_answer", Chat.cached_answer),
    Stage("admit", Chat.admit),
    Stage("retrieve", Chat.retrieve),  # retrieval/
    Stage("decide", Chat.decide),
    Stage("call", Chat.call),
    Stage("guard_output", Chat.guard_output, answers=True),  # guardrails/ (output transformers)
    Stage("settle", Chat.settle, answers=True),
    Stage("respond", Chat.respond, answers=True),
)
