"""The chat path: one ordered list of named stages over one ``Exchange``. ``CHAT_STAGES`` at the end of
this module is the list; each stage is one call into its part. Stages in brackets belong to parts that
plug in through ``Parts`` (``tollway.gateway.chat.exchange``) and do nothing when their part is absent:

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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

import orjson

from tollway.errors import InvalidRequest, QuotaExceeded
from tollway.gateway.chat.answers import DEGRADED_MODEL, degraded_completion
from tollway.gateway.chat.calls import (
    CallContext,
    Calls,
    JSONResult,
    StreamResult,
    reserved_input,
    reserved_output,
    tags_of,
)
from tollway.gateway.chat.ends import relay
from tollway.gateway.chat.exchange import (
    TOLLWAY_FIELDS,
    Answered,
    Exchange,
    Parts,
    Retrieved,
    SideCall,
    int_param,
)
from tollway.gateway.chat.relay import transform_whole
from tollway.gateway.chat.wire import choice_text, produced_text, usage_json, usage_of
from tollway.gateway.http.protocol import ChatCompletionRequest, parse_json_object, validate
from tollway.gateway.http.streaming import BodyReader
from tollway.gateway.quality.sampling import LiveQuality
from tollway.gateway.quality.shadow import Shadows
from tollway.jsontypes import JSON
from tollway.routing import (
    Attempt,
    BudgetSignal,
    ChainFailed,
    Router,
    RouteRequest,
    Usage,
    count_prompt,
    count_text,
    media_parts,
    off_loop_if_long,
    prediction_chars,
    prediction_tokens,
    prompt_chars,
)

PROMPT_ALIAS = "prompt"  # the model name that means "the model the prompt names"


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: Callable[[Chat, Exchange], Awaitable[None]]
    answers: bool = False  # runs on an answer (guard output, settle, respond); the others stop once one exists


class Chat:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None, quality: LiveQuality | None = None) -> None:
        self.calls = calls
        self.router = router
        self.catalog = router.catalog
        self.parts = parts or Parts()
        self.shadows = shadows
        self.quality = quality

    async def __call__(self, ctx: CallContext, read_body: BodyReader, *, endpoint: str = "chat.completions"
                       ) -> JSONResult | StreamResult:
        """``endpoint``: what the ledger row names (``completions`` when the legacy endpoint translated it)."""
        ex = Exchange(tally=self.calls.open(ctx, endpoint), read_body=read_body, ctx=ctx)
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
                self.close(ex, 200, None, *ex.settled)
                if ex.served is not None and ex.answer is not None:
                    answer = ex.answer
                    await self.after_answer(ex, choice_text(answer, "message"), lambda: answer, cacheable=True)
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
        ex.end_user = ex.ctx.header_user or req.user
        ex.tally.request(end_user=ex.end_user, stream=req.stream, tags=tags_of(ex.ctx, data))
        self.calls.check_messages(len(req.messages))
        self.calls.check_parts(data["messages"])
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
        prompt = ex.prompt = await self.parts.prompts.render(ex.view(), ref)
        ex.messages = [*prompt.messages, *ex.messages]
        ex.params = {**prompt.params, **ex.params}
        if ex.model == PROMPT_ALIAS:
            if not prompt.model:
                raise InvalidRequest(f"Prompt '{prompt.name}' names no model; name one in the request.",
                                     param="model")
            ex.model = prompt.model
        ex.tally.prompt(prompt.name, prompt.version)

    async def authorize(self, ex: Exchange) -> None:
        """The key may call models, and this one (or a routing alias)."""
        self.calls.resolve(ex.ctx.principal, ex.model, "chat")

    async def guard_input(self, ex: Exchange) -> None:
        """[guardrails/] A block refuses the request here: nothing is reserved, sent or charged; a fallback
        answers it without calling a model."""
        for guard in self.parts.input_guards:
            verdict = await guard.check(ex.view())
            ex.guards = (*ex.guards, *verdict.outcomes)
            if verdict.messages is not None:
                ex.messages = list(verdict.messages)
            if verdict.blocked is not None:
                ex.tally.guards([g.as_json() for g in ex.guards])
                raise verdict.blocked
            if verdict.fallback is not None:
                fallback = verdict.fallback
                ex.tally.gateway_answer(fallback.model, fallback.reason)
                ex.answered_by, ex.route, ex.answer = fallback.model, fallback.reason, fallback.answer
                return

    async def plan_route(self, ex: Exchange) -> None:
        """The route before budgets are known, with the retrieval's context budget counted as if already
        in the prompt; and the cache key of a deterministic request."""
        rules, principal = ex.need_rules(), ex.ctx.principal
        spec = ex.data.get("retrieval")
        if spec is not None:
            if self.parts.retriever is None:
                raise InvalidRequest("This gateway has no retrieval.", param="retrieval",
                                     code="retrieval_unavailable")
            ex.context_budget = self.parts.retriever.context_budget(ex.view(), spec)
        ex.output_cap = int_param(ex.params, "max_completion_tokens") or int_param(ex.params, "max_tokens")
        counted = self.catalog.has_context_windows  # then the route needs the count: admission reuses it

        def plan() -> tuple[int | None, RouteRequest]:
            tokens = count_prompt(ex.messages, ex.params, principal.tenant_id) if counted else None
            return tokens, self.router.features(ex.model, ex.messages, ex.params, max_output=ex.output_cap or 0,
                                                n=ex.req.n, extra_input=ex.context_budget, prompt_tokens=tokens)

        # a long prompt is counted and assessed off the event loop
        ex.prompt_tokens, route = await off_loop_if_long(prompt_chars(ex.messages, ex.params), plan)
        ex.plan = self.router.plan(route, self.calls.tenant_routing(rules, principal), ex.subject)
        if rules.policy.response_cache:
            versions: tuple[str | None, ...] = ()
            if spec is not None:
                assert self.parts.retriever is not None
                ex.index_version = await self.parts.retriever.index_version(ex.view(), spec)
                # the retrieval object itself too: another budget, mode or reranker is another context
                versions = (None if ex.prompt is None else ex.prompt.version, ex.index_version,
                            self.parts.retriever.screening(ex.view()), self.parts.retriever.search_settings(),
                            orjson.dumps(spec, option=orjson.OPT_SORT_KEYS).decode())
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
        ex.tally.cache_hit(hit.cost_usd)
        ex.tally.first_token()
        ex.cached, ex.answer, ex.answered_by, ex.route = hit, dict(hit.payload), entry.name, "cache_hit"
        ex.price_source = entry.price.source
        spec = ex.data.get("retrieval")
        if ex.index_version is not None and isinstance(spec, dict):  # grounded in this very index version
            ex.tally.index(ex.index_version)
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
            prompt = ex.prompt_tokens
            if prompt is None:  # not counted for the route (no model has a context window): counted here, once
                prompt = await off_loop_if_long(prompt_chars(ex.messages, ex.params), count_prompt, ex.messages,
                                                ex.params, principal.tenant_id)
            media = media_parts(ex.messages) * self.calls.limits.media_part_tokens  # not in the count: its size unknown
            # a prediction the answer does not use is billed as output
            rejected = await off_loop_if_long(prediction_chars(ex.params), prediction_tokens, ex.params)
            worst = Usage(input_tokens=reserved_input(prompt + ex.context_budget + media),
                          output_tokens=reserved_output(ex.output_cap, ex.req.n)
                          + (reserved_input(rejected) if rejected else 0))
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
        calls: list[SideCall] = []
        try:
            found = ex.retrieved = await self.parts.retriever.retrieve(ex.view(), spec, calls)
        finally:
            for c in calls:  # its embedding: a ledger row of its own, settled with the request
                ex.tally.side_call(c.role, c.model, c.usage, c.latency_ms, replica=c.replica, status=c.status,
                                   error_code=c.error_code)
        if found is None:
            return
        if found.guards:
            ex.guards = (*ex.guards, *found.guards)
        lead = next((i for i, m in enumerate(ex.messages) if m.get("role") not in ("system", "developer")),
                    len(ex.messages))
        ex.messages = [*ex.messages[:lead], *found.messages, *ex.messages[lead:]]
        ex.tally.index(found.index_version)

    async def decide(self, ex: Exchange) -> None:
        """The final route: the plan, narrowed by the budget signals admission returned."""
        ex.decision = self.router.decide(ex.need_plan(), ex.budget)
        ex.route = ex.decision.reason
        ex.tally.route(ex.route)

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
            ex.route = f"{decision.reason};degraded:{failed.error.code}"
            ex.degraded, ex.answered_by = True, DEGRADED_MODEL
            ex.tally.gateway_answer(DEGRADED_MODEL, ex.route, degraded=True)
            ex.answer = degraded_completion(self.catalog.routing.degraded_message)
            return
        ex.served, ex.sent, ex.answered_by = served, body, served.step.model.name
        ex.price_source = served.step.model.price.source
        self._record_attempts(ex, served.attempts)
        ex.tally.bind(served.step.model, replica=served.replica, reason=decision.reason)
        if decision.rollout is not None and served.step.model is decision.target:
            ex.tally.rollout(decision.rollout)
        if served.response is not None:
            served.release(True)  # a JSON answer is whole: its replica is free again
            ex.answer = served.response
            ex.tally.first_token()

    def _record_attempts(self, ex: Exchange, attempts: list[Attempt]) -> None:
        """A ledger row per failed attempt; one that the upstream had started answering is charged
        the prompt (hosted APIs bill a prompt they read), the others cost nothing."""
        scope = ex.ctx.principal.tenant_id
        for attempt in attempts:
            usage = Usage(input_tokens=count_prompt(ex.messages, ex.params, scope)) if attempt.started_answer else Usage()
            ex.tally.failed_attempt(attempt.step.model, attempt.replica, attempt.error.status, attempt.error.code,
                                    usage, attempt.elapsed_ms)

    # -- answer stages ----------------------------------------------------------------------------
    async def guard_output(self, ex: Exchange) -> None:
        """[guardrails/] The output transformers for this request, between accounting and emitting."""
        if self.parts.output:
            view = ex.view()
            ex.filters = tuple(f for t in self.parts.output if (f := t.start(view)) is not None)

    async def settle(self, ex: Exchange) -> None:
        """A whole answer: through the output chain, then actual usage replaces the reservation (priced
        here, recorded when the run ends, so a failure up to the last moment is still one 500 row). A
        stream settles as it ends (``StreamRelay``): here it is set up."""
        if ex.stream:
            ex.frames = relay(self, ex)
            return
        assert ex.answer is not None
        payload = await transform_whole(ex.filters, ex.answer)
        if ex.served is not None:
            payload["model"] = ex.served.step.model.name
        ex.settled = self.usage(ex, payload)
        if ex.settled[1] == "estimated":  # the upstream sent none: the count it is charged, as a stream's last chunk
            payload["usage"] = dict(usage_json(ex.settled[0]))
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
    def usage(self, ex: Exchange, payload: JSON) -> tuple[Usage, str]:
        if ex.cached is not None:
            return usage_of(payload.get("usage")) or Usage(), "cache"
        if ex.served is None:  # the gateway's own answer: degraded, or an input guard's fallback
            return Usage(), "degraded" if ex.degraded else "gateway"
        usage = usage_of(payload.get("usage"))
        if usage is not None:
            return usage, "upstream"
        return self.estimate(ex, produced_text(payload, "message")), "estimated"

    def estimate(self, ex: Exchange, text: str, produced: int = 0) -> Usage:
        """Usage the upstream did not report: the prompt as the answering model counts it where the gateway
        can (``Catalog.prompt_counters``), else tiktoken; the output from what was produced."""
        counter = self.catalog.prompt_counters.get(ex.answered_by or "")
        prompt = (counter(ex.messages) if counter is not None
                  else count_prompt(ex.messages, ex.params, ex.ctx.principal.tenant_id))
        return Usage(input_tokens=prompt, output_tokens=max(produced, count_text(text)))

    def close(self, ex: Exchange, status: int, code: str | None, usage: Usage, source: str) -> Decimal:
        if guards := ex.all_guards():
            ex.tally.guards([g.as_json() for g in guards])
        return ex.tally.close(status, code, usage=usage, usage_source=source)

    async def after_answer(self, ex: Exchange, text: str, answer: Callable[[], JSON], cacheable: bool) -> None:
        """Work after an upstream answer, the same for a whole answer and a finished stream: cache it
        (deterministic requests; never what a guard changed, nor one whose retrieval failed or read another
        index version than its key names), sample it for shadows and for live scoring.
        ``answer`` builds the chat.completion, for a cached or sampled answer only."""
        served = ex.served
        if served is None:
            return
        if ex.cache_key is not None and cacheable and not ex.guards_changed() and ex.grounded_as_keyed():
            await self.router.store(ex.cache_key, answer(), served.step.model.name, ex.tally.row.cost_usd)
        if self.shadows is None and self.quality is None:
            return
        rules, decision, prompt = ex.rules, ex.decision, ex.prompt
        done = Answered(row=ex.tally.row, model=served.step.model, sent=ex.sent, messages=tuple(ex.messages),
                        output=text, payload=answer, response_format=ex.params.get("response_format"),
                        label=None if prompt is None else prompt.label,
                        rollout_of=None if decision is None else decision.rollout_of,
                        guard_actions=tuple(g.action for g in ex.all_guards()),
                        sources=() if ex.retrieved is None else ex.retrieved.sources,
                        store_content=bool(rules is not None and rules.policy.store_content))
        if self.shadows is not None:
            self.shadows.maybe(done)
        if self.quality is not None:
            self.quality.offer(done)


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
