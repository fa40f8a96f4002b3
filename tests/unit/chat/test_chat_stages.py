"""Each chat stage with a fake caller and fake stores: no Redis, no PostgreSQL, no HTTP. Milliseconds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from support import sse_payloads

from tollway.errors import InvalidRequest, PermissionDenied, QuotaExceeded, UpstreamUnavailable
from tollway.gateway.chat.calls import CallContext, Calls, JSONResult, Limits, StreamResult
from tollway.gateway.chat.exchange import GuardOutcome, GuardVerdict, Parts, RenderedPrompt, Retrieved
from tollway.gateway.chat.stages import CHAT_STAGES, Chat
from tollway.gateway.metering.ledger import LedgerRow, utcnow
from tollway.gateway.metering.quota import Admission
from tollway.gateway.observability.telemetry import build_telemetry
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import Budget, TenantPolicy, TenantRules
from tollway.routing import CachedAnswer, ChainFailed, Router, build_catalog, parse_config
from tollway.routing.fallback import Attempt, Served
from tollway.routing.health import Health

JSON = dict[str, Any]
CATALOG = build_catalog(parse_config({
    "upstreams": [{"name": "g", "base_url": "http://g"}, {"name": "s", "base_url": "http://s"}],
    "models": [
        {"name": "large", "upstream": "g", "tier": "large", "context_window": 4000,
         "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
        {"name": "small", "upstream": "s", "tier": "small", "context_window": 100_000,
         "price": {"input_per_mtok": "0.1", "output_per_mtok": "0.2"}},
    ],
    "routing": {"tiers": [{"name": "large"}, {"name": "small"}]},
}), {}, [])
APP = Principal(key_id=1, tenant_id=7, tenant="acme", role="app", allowed_models=None)


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[LedgerRow] = []

    def record(self, row: LedgerRow) -> None:
        self.rows.append(row)


class FakeStream:
    def __init__(self, chunks: list[JSON]) -> None:
        self.chunks, self.closed = chunks, False

    def __aiter__(self) -> AsyncIterator[JSON]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[JSON]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeCaller:
    """Answers every call from a script; records what it was sent."""

    text: str = "spend stays bounded"
    fail: bool = False
    sent: list[JSON] = field(default_factory=list)
    routes: list[list[str]] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)

    async def call(self, decision: Any, body: JSON, *, stream: bool, affinity: str | None = None,
                   endpoint: str = "chat") -> Served:
        self.sent.append(body)
        self.routes.append([s.model.name for s in decision.steps])
        step = decision.steps[0]
        if self.fail:
            error = UpstreamUnavailable("down")
            raise ChainFailed(error, [Attempt(step, step.model.upstream, error, 1.0)])
        if stream:
            words = self.text.split(" ")
            chunks = [{"id": "c1", "created": 1, "choices": [{"index": 0, "delta": {"content": w + " "},
                                                              "finish_reason": None}]} for w in words]
            chunks.append({"id": "c1", "created": 1, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            chunks.append({"id": "c1", "created": 1, "choices": [],
                           "usage": {"prompt_tokens": 5, "completion_tokens": len(words)}})
            fake = FakeStream(chunks)
            self.streams.append(fake)
            it = fake.__aiter__()
            return Served(step, step.model.upstream, [], stream=fake, chunks=it, head=[await anext(it)])
        return Served(step, step.model.upstream, [], response={
            "id": "c1", "object": "chat.completion", "created": 1, "model": step.model.upstream_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})


class FakePolicies:
    def __init__(self, rules: TenantRules) -> None:
        self._rules = rules

    async def rules(self, tenant_id: int) -> TenantRules:
        return self._rules


class FakeQuota:
    """Admits everything, or refuses the first try (a budget that no longer holds the top tier); records demands."""

    def __init__(self, refuse_large: bool = False) -> None:
        self.refuse_large = refuse_large
        self.demands: list[Any] = []

    async def admit(self, principal: Any, rules: Any, **kw: Any) -> Admission:
        self.demands.append(kw["demand"])
        if self.refuse_large and len(self.demands) == 1:
            raise QuotaExceeded("no room for the large tier")
        return Admission(reservation=None, headers={"x-tollway-budget-remaining": "1.0"},  # type: ignore[arg-type]
                         step_down=False, headroom=0.5)


class FakeCache:
    def __init__(self, hit: CachedAnswer | None = None) -> None:
        self.hit = hit
        self.stored: list[tuple[str, JSON]] = []
        self.asked: list[str] = []

    async def get(self, key: str) -> CachedAnswer | None:
        self.asked.append(key)
        return self.hit

    async def put(self, key: str, payload: JSON, model: str, cost: Decimal) -> None:
        self.stored.append((key, payload))


@dataclass
class Rig:
    chat: Chat
    caller: FakeCaller
    ledger: FakeLedger
    quota: FakeQuota | None

    async def run(self, body: JSON, principal: Principal = APP) -> JSONResult | StreamResult:
        async def read() -> bytes:
            return orjson.dumps(body)

        ctx = CallContext(request_id="r1", principal=principal, header_user=None, started=time.perf_counter(),
                          created_at=utcnow())
        return await self.chat(ctx, read)


def rig(*, parts: Parts | None = None, caller: FakeCaller | None = None, quota: FakeQuota | None = None,
        rules: TenantRules | None = None, cache: FakeCache | None = None) -> Rig:
    caller = caller or FakeCaller()
    ledger = FakeLedger()
    calls = Calls(CATALOG, ledger, build_telemetry(otlp_endpoint=None), Limits(max_messages=8, max_tokens=1000),  # type: ignore[arg-type]
                  policies=FakePolicies(rules) if rules else None, quota=quota)  # type: ignore[arg-type]
    router = Router(CATALOG, caller, Health(["g", "s"], CATALOG.routing.breaker, CATALOG.routing.saturation),  # type: ignore[arg-type]
                    cache=cache)  # type: ignore[arg-type]
    return Rig(Chat(calls, router, parts=parts), caller, ledger, quota)


MSG = [{"role": "user", "content": "how much does this cost"}]


def test_the_stages_are_listed_once_in_the_documented_order() -> None:
    assert [s.name for s in CHAT_STAGES] == [
        "parse", "rules", "render_prompt", "authorize", "guard_input", "plan_route", "cached_answer", "admit",
        "retrieve", "decide", "call", "guard_output", "settle", "respond"]
    assert [s.name for s in CHAT_STAGES if s.answers] == ["guard_output", "settle", "respond"]


async def test_parse_keeps_tollway_fields_out_of_the_upstream_body() -> None:
    class Library:
        def context_budget(self, view: Any, spec: JSON) -> int:
            return 10

        def screening(self, view: Any) -> None:
            return None

        def search_settings(self) -> str:
            return "search:test"


        async def index_version(self, view: Any, spec: JSON) -> str:
            return "v1"

        async def retrieve(self, view: Any, spec: JSON, calls: list[Any]) -> None:
            return None

    r = rig(parts=Parts(retriever=Library()))
    await r.run({"model": "small", "messages": MSG, "retrieval": {"collection": "c"}, "seed": 3})
    assert "retrieval" not in r.caller.sent[0]
    assert r.caller.sent[0]["seed"] == 3
    with pytest.raises(InvalidRequest) as bad:
        await r.run({"model": "small", "messages": MSG, "retrieval": "c"})
    assert bad.value.param == "retrieval"
    with pytest.raises(InvalidRequest):
        await r.run({"model": "small", "messages": MSG * 9})  # over the message limit
    assert [row.status for row in r.ledger.rows] == [200, 400, 400]


async def test_render_prompt_prepends_messages_and_lets_the_request_win() -> None:
    class Registry:
        def offers(self, tenant_id: int) -> bool:
            return True

        async def render(self, view: Any, ref: JSON) -> RenderedPrompt:
            return RenderedPrompt("greet", "abc123", ({"role": "system", "content": f"Greet {ref['variables']['who']}"},),
                                  model="large", params={"temperature": 0.2, "max_tokens": 64})

    r = rig(parts=Parts(prompts=Registry()))
    result = await r.run({"model": "prompt", "messages": MSG, "max_tokens": 9,
                          "prompt": {"name": "greet", "variables": {"who": "Ada"}}})
    sent = r.caller.sent[0]
    assert [m["content"] for m in sent["messages"]] == ["Greet Ada", MSG[0]["content"]]
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 9)  # the prompt's params, the request's wins
    assert r.caller.routes[0][0] == "large"  # the prompt's model, for the 'prompt' alias
    assert isinstance(result, JSONResult)
    assert result.headers["x-tollway-prompt-version"] == "greet@abc123"
    assert result.payload["tollway"]["prompt"] == {"name": "greet", "version": "abc123"}
    assert (r.ledger.rows[0].prompt_name, r.ledger.rows[0].prompt_version) == ("greet", "abc123")
    with pytest.raises(InvalidRequest):
        await r.run({"model": "prompt", "messages": MSG})  # the alias without a prompt


async def test_authorize_follows_rendering_and_refuses_finance_keys() -> None:
    r = rig()
    with pytest.raises(PermissionDenied):
        await r.run({"model": "small", "messages": MSG}, principal=Principal(2, 7, "acme", "finance", None))
    assert r.caller.sent == []
    assert r.ledger.rows[0].status == 403


async def test_an_input_guard_block_spends_nothing() -> None:
    class Block:
        async def check(self, view: Any) -> GuardVerdict:
            return GuardVerdict(blocked=InvalidRequest("blocked by guard 'injection'",
                                                       code="content_policy_violation"))

    quota = FakeQuota()
    r = rig(parts=Parts(input_guards=(Block(),)), quota=quota)
    with pytest.raises(InvalidRequest):
        await r.run({"model": "small", "messages": MSG})
    assert r.caller.sent == []
    assert quota.demands == []
    assert [(row.status, row.error_code, row.cost_usd) for row in r.ledger.rows] == [
        (400, "content_policy_violation", Decimal(0))]


async def test_plan_counts_the_retrieval_budget_before_it_runs() -> None:
    class Big:
        def context_budget(self, view: Any, spec: JSON) -> int:
            return 5000  # more than the large model's 4,000-token window

        def screening(self, view: Any) -> None:
            return None

        def search_settings(self) -> str:
            return "search:test"


        async def index_version(self, view: Any, spec: JSON) -> str:
            return "v1"

        async def retrieve(self, view: Any, spec: JSON, calls: list[Any]) -> None:
            return None

    r = rig(parts=Parts(retriever=Big()))
    await r.run({"model": "auto", "messages": [{"role": "user", "content": "Prove the theorem step by step " * 20}],
                 "retrieval": {"collection": "c"}})
    assert r.caller.routes[0] == ["small"]  # the large model cannot hold prompt plus context: never planned


async def test_a_cached_answer_skips_every_request_stage_after_the_lookup() -> None:
    hit = CachedAnswer({"id": "c0", "object": "chat.completion", "created": 1, "model": "small",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "cached"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 1}}, "small", Decimal("0.001"))
    quota = FakeQuota()
    r = rig(cache=FakeCache(hit), quota=quota, rules=TenantRules(TenantPolicy(7), (
        Budget(1, 7, "tenant", "", "day", Decimal(1), None),)))
    result = await r.run({"model": "small", "messages": MSG, "temperature": 0})
    assert isinstance(result, JSONResult)
    assert result.payload["choices"][0]["message"]["content"] == "cached"
    assert r.caller.sent == [] and quota.demands == []  # free: not even admitted
    row = r.ledger.rows[0]
    assert (row.cache_hit, row.saved_usd, row.cost_usd, row.route_reason) == (True, Decimal("0.001"), 0, "cache_hit")


async def test_a_rag_answers_cache_key_names_the_index_version_and_the_search_settings() -> None:
    """A re-ingest (another index version) or an upgrade that ranks or packs contexts another way (another
    ``Tuning.tag``) is a miss: the answer was grounded in another context."""
    class Library:
        def __init__(self, version: str, settings: str) -> None:
            self.version, self.settings = version, settings

        def context_budget(self, view: Any, spec: JSON) -> int:
            return 50

        def screening(self, view: Any) -> None:
            return None

        def search_settings(self) -> str:
            return self.settings

        async def index_version(self, view: Any, spec: JSON) -> str:
            return self.version

        async def retrieve(self, view: Any, spec: JSON, calls: list[Any]) -> None:
            return None

    keys = []
    for version, settings in [("v1", "search:a"), ("v1", "search:a"), ("v2", "search:a"), ("v1", "search:b")]:
        cache = FakeCache()
        r = rig(cache=cache, parts=Parts(retriever=Library(version, settings)))
        await r.run({"model": "small", "messages": MSG, "temperature": 0, "retrieval": {"collection": "c"}})
        keys += cache.asked
    assert len(keys) == 4
    assert keys[0] == keys[1] and len(set(keys)) == 3


async def test_admit_reserves_the_planned_chain_and_steps_auto_down_once() -> None:
    quota = FakeQuota(refuse_large=True)
    rules = TenantRules(TenantPolicy(7, default_max_tokens=100, route_threshold=0.0),  # auto: the top tier
                        (Budget(1, 7, "tenant", "", "day", Decimal(1), None),))
    r = rig(quota=quota, rules=rules)
    hard = [{"role": "user", "content": "Write a Python function that proves the Riemann hypothesis step by step."}]
    result = await r.run({"model": "auto", "messages": hard})
    assert len(quota.demands) == 2
    assert quota.demands[1].usd_nano < quota.demands[0].usd_nano
    assert r.caller.routes[0] == ["small"]
    assert r.caller.sent[0]["max_tokens"] == 100  # the tenant's default cap is injected: it bounds the worst case
    assert isinstance(result, JSONResult)
    assert result.headers["x-tollway-budget-remaining"] == "1.0"


async def test_retrieve_places_context_after_the_system_messages_and_records_the_version() -> None:
    class Library:
        def context_budget(self, view: Any, spec: JSON) -> int:
            return 50

        def screening(self, view: Any) -> None:
            return None

        def search_settings(self) -> str:
            return "search:test"


        async def index_version(self, view: Any, spec: JSON) -> str:
            return "v9"

        async def retrieve(self, view: Any, spec: JSON, calls: list[Any]) -> Retrieved:
            return Retrieved("docs", "v9", ({"role": "system", "content": "CONTEXT"},), ({"document_id": 1},))

    r = rig(parts=Parts(retriever=Library()))
    result = await r.run({"model": "small", "messages": [{"role": "system", "content": "S"}, *MSG],
                          "retrieval": {"collection": "docs"}})
    assert [m["content"] for m in r.caller.sent[0]["messages"]] == ["S", "CONTEXT", MSG[0]["content"]]
    assert isinstance(result, JSONResult)
    assert result.headers["x-tollway-index-version"] == "v9"
    assert r.ledger.rows[0].index_version == "v9"


async def test_call_failure_is_degraded_where_the_tenant_allows() -> None:
    r = rig(caller=FakeCaller(fail=True), rules=TenantRules(TenantPolicy(7, degraded_answers=True), ()))
    result = await r.run({"model": "small", "messages": MSG})
    assert isinstance(result, JSONResult)
    assert result.headers["x-tollway-degraded"] == "true"
    assert result.payload["tollway"]["route"] == "requested;degraded:upstream_unavailable"
    assert [(row.role, row.status) for row in r.ledger.rows] == [("attempt", 503), ("answer", 200)]


async def test_output_transformers_see_json_answers_and_streams_alike() -> None:
    class Redact:
        def start(self, view: Any) -> Any:
            return self

        def outcomes(self) -> list[GuardOutcome]:
            return []

        async def chunk(self, chunk: JSON) -> list[JSON]:
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    delta["content"] = delta["content"].replace("bounded", "[REDACTED]")
            return [chunk]

        async def end(self) -> list[JSON]:
            return []

    r = rig(parts=Parts(output=(Redact(),)))
    whole = await r.run({"model": "small", "messages": MSG})
    assert isinstance(whole, JSONResult)
    assert whole.payload["choices"][0]["message"]["content"] == "spend stays [REDACTED]"
    streamed = await r.run({"model": "small", "messages": MSG, "stream": True})
    assert isinstance(streamed, StreamResult)
    payloads = sse_payloads(b"".join([f async for f in streamed.frames]).decode())
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"]) == \
        "spend stays [REDACTED] "
    assert [i for i, p in enumerate(payloads) if "tollway" in p] == [len(payloads) - 1]
    assert r.caller.streams[0].closed
    assert [row.status for row in r.ledger.rows] == [200, 200]
    assert r.ledger.rows[1].output_tokens == 3  # charged what the upstream produced


async def test_the_stream_body_asks_for_usage_and_is_built_once() -> None:
    r = rig()
    result = await r.run({"model": "small", "messages": MSG, "stream": True})
    assert isinstance(result, StreamResult)
    [f async for f in result.frames]
    assert r.caller.sent[0]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in r.caller.sent[0]["messages"][0]
    assert r.ledger.rows[0].usage_source == "upstream"
