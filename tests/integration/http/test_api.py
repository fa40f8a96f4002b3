"""The OpenAI-compatible API in process (httpx.ASGITransport) against real Postgres, Redis and the
scripted upstream process."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import sse_payloads
from support.config import PRICES

MSG = [{"role": "user", "content": "how much does this cost"}]  # 5 prompt tokens at the sim



def cost(model_prices: tuple[Any, Any], prompt: int, completion: int) -> Decimal:
    inp, out = (Decimal(str(p)) for p in model_prices)
    return (prompt * inp + completion * out) / Decimal(10**6)


async def test_chat_completion_costs_what_the_price_table_says(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": MSG, "max_tokens": 7, "user": "u-1"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == "sim-large"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        expected = cost(PRICES["sim-large"], 5, 7)
        assert resp.headers["x-tollway-model"] == "sim-large"
        assert Decimal(resp.headers["x-tollway-cost-usd"]) == expected
        request_id = resp.headers["x-request-id"]
        await gw.state.ledger.flush()
    rows = ledger("request_id = %s", request_id)
    assert len(rows) == 1
    row = rows[0]
    assert (row["tenant_id"], row["key_id"], row["end_user"]) == (tenant.id, tenant.key_id, "u-1")
    assert (row["model"], row["upstream"], row["upstream_model"]) == ("sim-large", "sim", "sim-large")
    assert (row["input_tokens"], row["output_tokens"], row["status"], row["error_code"]) == (5, 7, 200, None)
    assert row["cost_usd"] == expected
    assert row["usage_source"] == "upstream"
    assert row["price_source"] == "config"
    assert row["stream"] is False
    assert row["latency_ms"] > 0
    assert row["route_reason"] == "requested"


async def test_alias_resolves_and_unknown_fields_pass_through(app_factory, make_tenant, sim):
    tenant = make_tenant()
    extra = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
             "response_format": {"type": "json_object"}, "logprobs": True, "seed": 42}
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "big", "messages": MSG, **extra})
        assert resp.status_code == 200
        assert resp.json()["model"] == "sim-large"
    seen = orjson.loads(sim.get("/sim/last-request?model=sim-large"))
    for key, value in extra.items():
        assert seen[key] == value




async def test_stream_with_usage(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": MSG, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = sse_payloads(resp.text)
        await gw.state.ledger.flush()
    assert all(c["model"] == "sim-small" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "the gateway keeps spend"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["stream"] is True
    assert row["status"] == 200
    assert row["ttft_ms"] is not None
    assert row["cost_usd"] == cost(PRICES["sim-small"], 5, 4)


async def test_stream_without_usage_hides_it_but_still_charges(app_factory, make_tenant, ledger, sim):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": MSG, "max_tokens": 3, "stream": True})
        chunks = sse_payloads(resp.text)
        await gw.state.ledger.flush()
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The gateway asked the upstream for usage even though the client did not.
    assert orjson.loads(sim.get("/sim/last-request?model=sim-small"))["stream_options"] == {"include_usage": True}
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["input_tokens"], row["output_tokens"]) == (5, 3)
    assert row["cost_usd"] == cost(PRICES["sim-small"], 5, 3)


@pytest.mark.parametrize(("path", "body", "read"), [
    ("/v1/chat/completions", {"messages": MSG}, lambda a: (a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"])),
    ("/v1/completions", {"prompt": "hello there"},
     lambda a: (a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"])),
    ("/v1/messages", {"messages": MSG, "max_tokens": 30},
     lambda a: (a["usage"]["input_tokens"], a["usage"]["output_tokens"])),
    ("/v1/responses", {"input": "hello there"}, lambda a: (a["usage"]["input_tokens"], a["usage"]["output_tokens"])),
], ids=["chat", "completions", "messages", "responses"])
async def test_an_answer_without_usage_from_its_upstream_carries_what_it_is_charged(app_factory, make_tenant, ledger,
                                                                                    path, body, read):
    """An upstream that reports no usage (llama.cpp's server, some hosted APIs): a stream's last chunk carried
    the gateway's count, a whole answer carried none (chat, completions), null (responses) or zeros (messages)
    while the ledger charged the count."""
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post(path, headers=tenant.headers, json={"model": "sim-tools-nousage", **body})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["usage_source"] == "estimated"
    assert read(resp.json()) == (row["input_tokens"], row["output_tokens"])
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0


async def test_embeddings(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/embeddings", headers=tenant.headers,
                                    json={"model": "sim-embed", "input": ["one two", "three"]})
        assert resp.status_code == 200
        body = resp.json()
        assert [len(d["embedding"]) for d in body["data"]] == [16, 16]
        await gw.state.ledger.flush()
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["endpoint"], row["input_tokens"], row["cost_usd"]) == ("embeddings", 3, Decimal("0.00000006"))


BAD_EMBEDDINGS = [
    ("an empty list", {"input": []}, "input"),
    ("an empty string", {"input": ""}, "input"),
    ("an empty string among others", {"input": ["one", ""]}, "input[1]"),
    ("an empty token list", {"input": [[]]}, "input[0]"),
    ("more inputs than OpenAI takes", {"input": ["x"] * 2049}, "input"),
]


@pytest.mark.parametrize("model", ["sim-embed", "local"])
@pytest.mark.parametrize(("case", "body", "param"), BAD_EMBEDDINGS, ids=[c[0] for c in BAD_EMBEDDINGS])
async def test_embeddings_refuse_what_openai_refuses_for_every_model(app_factory, make_tenant, ledger, sim,
                                                                     model, case, body, param):
    """The same 400 from the packaged model and from an upstream one, before anything is spent (an upstream
    answered an empty list with no vectors: a 200 the SDK cannot read)."""
    from tollway.retrieval import LOCAL_NAME

    tenant = make_tenant()
    name = LOCAL_NAME if model == "local" else model
    before = sim.metric('tollway_sim_requests_total{model="sim-embed"}')
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/embeddings", headers=tenant.headers, json={"model": name, **body})
        await gw.state.ledger.flush()
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request", param)
    assert sim.metric('tollway_sim_requests_total{model="sim-embed"}') == before  # nothing sent upstream
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["cost_usd"]) == (400, 0)


async def test_the_packaged_embedder_refuses_dimensions_it_cannot_give(app_factory, make_tenant):
    """It answers 384 dimensions; asked for 64 it says so (a client would otherwise store vectors of another
    size than it asked for); asked for its own, it answers."""
    from tollway.retrieval import LOCAL_NAME

    tenant = make_tenant()
    async with app_factory() as gw:
        fewer = await gw.client.post("/v1/embeddings", headers=tenant.headers,
                                     json={"model": LOCAL_NAME, "input": ["one two"], "dimensions": 64})
        own = await gw.client.post("/v1/embeddings", headers=tenant.headers,
                                   json={"model": LOCAL_NAME, "input": ["one two"], "dimensions": 384})
    assert fewer.status_code == 400, fewer.text
    assert (fewer.json()["error"]["param"], fewer.json()["error"]["code"]) == ("dimensions", "unsupported_parameter")
    assert own.status_code == 200, own.text
    assert len(own.json()["data"][0]["embedding"]) == 384


async def test_the_root_says_where_things_are_and_sends_a_browser_to_the_console(app_factory):
    async with app_factory() as gw:
        index = await gw.client.get("/")
        browser = await gw.client.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert index.status_code == 200 and index.json()["api"] == "/v1" and index.json()["console"] == "/console"
    assert "version" not in index.json()  # nothing about the build to a caller without a key
    assert (browser.status_code, browser.headers["location"]) == (307, "/console")


async def test_models_lists_what_the_key_may_use(app_factory, make_tenant):
    everything, limited = make_tenant(), make_tenant(models=["sim-small"])
    async with app_factory() as gw:
        all_ids = {m["id"] for m in (await gw.client.get("/v1/models", headers=everything.headers)).json()["data"]}
        few = (await gw.client.get("/v1/models", headers=limited.headers)).json()
        one = await gw.client.get("/v1/models/sim-small", headers=limited.headers)
        barred = await gw.client.get("/v1/models/sim-large", headers=limited.headers)
        listed = await gw.client.get("/v1/chat/completions", headers=limited.headers)  # the SDK's stored list
        removed = await gw.client.delete("/v1/models", headers=limited.headers)  # a FastAPI route's 405, alike
    assert one.json() == few["data"][0]
    assert (barred.status_code, barred.json()["error"]["code"]) == (404, "model_not_found")
    assert (listed.status_code, listed.headers["allow"], listed.json()["error"]["code"]) == (
        405, "POST", "method_not_allowed")
    assert (removed.status_code, removed.headers["allow"], removed.json()["error"]) == (405, "GET", {
        "message": "DELETE is not served on /v1/models; GET is.", "type": "invalid_request_error", "param": None,
        "code": "method_not_allowed"})
    assert {"sim-large", "sim-small", "sim-embed", "auto"} <= all_ids
    # 'auto' routes among the models the key may use
    assert few == {"object": "list", "data": [{"id": "sim-small", "object": "model", "created": 0, "owned_by": "sim"},
                                              {"id": "auto", "object": "model", "created": 0, "owned_by": "tollway"}]}


BAD_INPUTS = [
    ("malformed json", b'{"model": "sim-large", "messages": [', 400, "invalid_json", None),
    ("not an object", b"[1]", 400, "invalid_request", None),
    ("wrong type", orjson.dumps({"model": "sim-large", "messages": MSG, "max_tokens": "9"}), 400,
     "invalid_request", "max_tokens"),
    ("bad role", orjson.dumps({"model": "sim-large", "messages": [{"role": "robot", "content": "x"}]}), 400,
     "invalid_request", "messages[0].role"),
    ("no messages", orjson.dumps({"model": "sim-large", "messages": []}), 400, "invalid_request", "messages"),
    ("unknown model", orjson.dumps({"model": "gpt-17", "messages": MSG}), 404, "model_not_found", "model"),
    ("embedding model for chat", orjson.dumps({"model": "sim-embed", "messages": MSG}), 400,
     "model_not_supported", "model"),
    ("max_tokens over the limit", orjson.dumps({"model": "sim-large", "messages": MSG, "max_tokens": 10**9}),
     400, "invalid_request", "max_tokens"),
    ("too many tags", orjson.dumps({"model": "sim-large", "messages": MSG, "metadata": {"tags": list("abcdefghijklmnopqrstuvwxyzABCDEFGH")}}),
     400, "invalid_request", "metadata.tags"),
    ("a tag too long", orjson.dumps({"model": "sim-large", "messages": MSG, "metadata": {"tags": ["x" * 65]}}),
     400, "invalid_request", "metadata.tags"),
    # what a budget counts of a conversation's tool calls must be what the upstream receives: text
    ("tool call arguments not a string", orjson.dumps({"model": "sim-large", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": {"q": "x" * 5000}}}]}, *MSG]}),
     400, "invalid_request", "messages[0].tool_calls[0].function.arguments"),
    ("tool calls not a list", orjson.dumps({"model": "sim-large", "messages": [
        {"role": "assistant", "tool_calls": "f"}, *MSG]}), 400, "invalid_request", "messages[0].tool_calls"),
    ("tools not a list", orjson.dumps({"model": "sim-large", "messages": MSG, "tools": {"type": "function"}}),
     400, "invalid_request", "tools"),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_is_a_4xx_and_costs_nothing(app_factory, make_tenant, ledger, sim,
                                                    case, body, status, code, param):
    tenant = make_tenant()
    before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, content=body)
        await gw.state.ledger.flush()
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before  # nothing sent upstream
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["cost_usd"]) == (status, code, 0)


@pytest.mark.parametrize(("header", "value"), [("x-tollway-user", "u" * 257), ("x-tollway-session", "s" * 257),
                                               ("x-tollway-tags", ",".join(f"t{i}" for i in range(33))),
                                               ("x-tollway-tags", "t" * 65)])
async def test_an_out_of_bounds_header_is_a_400_before_anything_runs(app_factory, make_tenant, ledger, sim,
                                                                      header, value):
    """End user and session ids go into Redis keys, ledger rows and reports, tags into every row: bounded like
    the ``user`` field (256 characters) and ``metadata.tags`` (32 of 64)."""
    tenant = make_tenant()
    before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers={**tenant.headers, header: value},
                                    json={"model": "sim-large", "messages": MSG})
        ok = await gw.client.post("/v1/chat/completions", headers={**tenant.headers, header: value[:20]},
                                  json={"model": "sim-large", "messages": MSG, "max_tokens": 3})
        await gw.state.ledger.flush()
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request", header)
    assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before + 1  # only the second was sent
    assert ledger("request_id = %s", resp.headers["x-request-id"]) == []  # refused before its row began
    assert ok.status_code == 200, ok.text


async def test_oversized_body_is_413(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    big = orjson.dumps({"model": "sim-large", "messages": [{"role": "user", "content": "x" * 5000}]})
    async with app_factory(max_body_bytes=4096) as gw:
        announced = await gw.client.post("/v1/chat/completions", headers=tenant.headers, content=big)

        async def chunked():
            yield big[:3000]
            yield big[3000:]

        streamed = await gw.client.post("/v1/chat/completions", headers=tenant.headers, content=chunked())
        await gw.state.ledger.flush()
    for resp in (announced, streamed):
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
    # The announced one is refused before auth sees it; the chunked one is refused while read.
    assert ledger("request_id = %s", announced.headers["x-request-id"]) == []
    [row] = ledger("request_id = %s", streamed.headers["x-request-id"])
    assert (row["status"], row["cost_usd"]) == (413, 0)


@pytest.mark.parametrize("header", [None, "Bearer tw-not-a-real-key", "Basic abc", "Bearer "])
async def test_missing_or_wrong_key_is_401(app_factory, header, pg):
    headers = {"authorization": header} if header else {}
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=headers,
                                    json={"model": "sim-large", "messages": MSG})
        models = await gw.client.get("/v1/models", headers=headers)
    for r in (resp, models):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_revoked_key_stops_working_within_the_ttl(app_factory, make_tenant, pg):
    import psycopg

    from tollway.gateway.tenancy.keys import revoke_key

    tenant = make_tenant()
    async with app_factory(auth_cache_ttl_s=0.3) as gw:
        ok = await gw.client.get("/v1/models", headers=tenant.headers)
        assert ok.status_code == 200
        async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
            assert await revoke_key(conn, tenant.key_id)
        await asyncio.sleep(0.35)
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": MSG})
    assert resp.status_code == 401


async def test_key_model_allow_list_and_roles(app_factory, make_tenant, ledger):
    limited, finance = make_tenant(models=["sim-small"]), make_tenant(role="finance")
    async with app_factory() as gw:
        denied = await gw.client.post("/v1/chat/completions", headers=limited.headers,
                                      json={"model": "sim-large", "messages": MSG})
        allowed = await gw.client.post("/v1/chat/completions", headers=limited.headers,
                                       json={"model": "sim-small", "messages": MSG})
        no_role = await gw.client.post("/v1/chat/completions", headers=finance.headers,
                                       json={"model": "sim-small", "messages": MSG})
        listing = [await gw.client.get(path, headers=finance.headers) for path in ("/v1/models", "/v1/models/sim-small")]
        await gw.state.ledger.flush()
    assert [(r.status_code, r.json()["error"]["code"]) for r in listing] == [(403, "role_not_allowed")] * 2
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "model_not_allowed"
    assert allowed.status_code == 200
    assert no_role.status_code == 403
    assert no_role.json()["error"]["code"] == "role_not_allowed"
    [row] = ledger("request_id = %s", denied.headers["x-request-id"])
    assert row["cost_usd"] == 0
    assert row["status"] == 403


@pytest.mark.parametrize(("model", "status", "code"), [
    ("sim-error", 502, "upstream_error"),
    ("sim-overloaded", 503, "upstream_unavailable"),
    ("sim-timeout", 504, "upstream_timeout"),
    ("sim-malformed", 502, "upstream_bad_response"),
])
async def test_upstream_failures_map_to_5xx(app_factory, make_tenant, ledger, model, status, code):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": model, "messages": MSG})
        await gw.state.ledger.flush()
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert "Traceback" not in resp.text
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["cost_usd"]) == (status, code, 0)


async def test_upstream_failure_before_the_stream_starts_is_an_http_error(app_factory, make_tenant):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-overloaded", "messages": MSG, "stream": True})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize(("model", "code"), [("sim-cut", "upstream_bad_response"),
                                             ("sim-malformed", "upstream_bad_response")])
async def test_stream_broken_midway_ends_with_an_error_frame(app_factory, make_tenant, ledger, model, code):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": model, "messages": MSG, "stream": True})
        await gw.state.ledger.flush()
    assert resp.status_code == 200
    frames = sse_payloads(resp.text)
    assert frames[-1]["error"]["code"] == code
    produced = [f for f in frames[:-1] if f["choices"] and f["choices"][0]["delta"].get("content")]
    assert len(produced) == 8  # half of the sim's 16 tokens arrived before the break
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["usage_source"]) == (502, code, "estimated")
    assert row["output_tokens"] == 8 and row["cost_usd"] > 0  # what was produced is charged


async def test_span_has_genai_attributes(app_factory, make_tenant):
    exporter = InMemorySpanExporter()
    tenant = make_tenant()
    async with app_factory(span_exporter=exporter) as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": MSG, "max_tokens": 2})
    [span] = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "sim-large"
    assert attrs["gen_ai.usage.input_tokens"] == 5
    assert attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["tollway.request_id"] == resp.headers["x-request-id"]
    assert attrs["tollway.tenant"] == tenant.name


async def test_health_ready_and_openapi(app_factory):
    async with app_factory() as gw:
        assert (await gw.client.get("/healthz")).json() == {"status": "ok"}
        ready = await gw.client.get("/readyz")
        spec = (await gw.client.get("/openapi.json")).json()
        missing = await gw.client.get("/v2/nothing")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": True, "redis": True, "upstream": True}
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/models"} <= set(spec["paths"])
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "messages" in body["schema"]["properties"]
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"


async def test_admins_list_tenants_and_keys_without_secrets(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        await gw.client.get("/v1/models", headers=tenant.headers)  # a use of the key
        keys = await gw.client.get("/v1/admin/keys", headers=admin.headers, params={"tenant": tenant.name})
        tenants = await gw.client.get("/v1/admin/tenants", headers=admin.headers)
        refused = await gw.client.get("/v1/admin/keys", headers=tenant.headers)
    [key] = keys.json()["data"]
    assert (key["id"], key["tenant"], key["role"]) == (tenant.key_id, tenant.name, "app")
    assert key["last_used_at"] is not None
    assert key["revoked_at"] is None
    assert tenant.key not in keys.text
    assert {"id": tenant.id, "name": tenant.name} in [{"id": t["id"], "name": t["name"]} for t in tenants.json()["data"]]
    assert refused.status_code == 403
