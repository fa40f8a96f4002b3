"""Hard budgets under concurrency and streaming, refusals that name the budget, and atomicity across
windows, against the real Redis and Postgres."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from decimal import Decimal
from typing import Any

import pytest
from support import event_payloads, sse_frames
from support.config import write_config

from tollway.gateway.chat.service import INPUT_MARGIN, INPUT_SLACK, reserved_output
from tollway.routing.tokens import count_messages

PRICE = (Decimal(3), Decimal(15))  # sim-large, USD per million tokens (conftest PRICES)


def msg(i: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"how much does request {i} cost"}]


def worst_case_usd(messages: list[dict[str, str]], max_tokens: int) -> Decimal:
    prompt = math.ceil(count_messages(messages) * INPUT_MARGIN) + INPUT_SLACK
    return (prompt * PRICE[0] + reserved_output(max_tokens) * PRICE[1]) / 10**6



async def set_budget(gw: Any, admin: Any, tenant: Any, **body: Any) -> dict[str, Any]:
    resp = await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={"tenant": tenant.name, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def chat(gw: Any, tenant: Any, i: Any, *, stream: bool = False, max_tokens: int = 16,
               model: str = "sim-large", headers: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None) -> Any:
    body: dict[str, Any] = {"model": model, "messages": msg(i), "max_tokens": max_tokens, "stream": stream,
                            **(extra or {})}
    return await gw.client.post("/v1/chat/completions", headers={**tenant.headers, **(headers or {})}, json=body)


async def test_refusal_names_the_budget_and_sends_nothing(app_factory, make_tenant, admin, ledger, sim):
    tenant = make_tenant()
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="day", limit_usd="0.0001")
        before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
        resp = await chat(gw, tenant, 1)
        await gw.state.ledger.flush()
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert f"the day budget of tenant '{tenant.name}'" in error["message"]
    assert "limit $0.0001" in error["message"]
    assert int(resp.headers["retry-after"]) > 0
    assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["cost_usd"]) == (429, "insufficient_quota", 0)


async def test_a_reset_clears_the_budgets_counters_and_admits_again(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        budget = await set_budget(gw, admin, tenant, window="day", limit_usd=str(worst_case_usd(msg(1), 16) * 2))
        spent = []
        for i in range(5):
            spent.append(await chat(gw, tenant, i))
            await gw.state.quota.drain()
        reset = await gw.client.post("/v1/admin/budgets/reset", headers=admin.headers,
                                     json={"tenant": tenant.name, "budget_id": budget["id"]})
        after = await chat(gw, tenant, 1)
    assert [r.status_code for r in spent][-1] == 429
    assert reset.status_code == 200, reset.text
    assert reset.json() == {"reset": [budget["id"]], "counters_cleared": 1}
    assert after.status_code == 200


@pytest.mark.parametrize("ample", [False, True], ids=["tight budget", "ample budget"])
async def test_200_concurrent_requests_never_overspend(app_factory, make_tenant, admin, ledger, ample):
    tenant = make_tenant()
    per_request = worst_case_usd(msg(100), 16)
    limit = per_request * (10_000 if ample else 10)
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="month", limit_usd=str(limit))
        results = await asyncio.gather(*(chat(gw, tenant, i, stream=i % 2 == 0) for i in range(100, 300)))
        # once the burst has settled, what it did not spend is there to spend (one at a time, until refused)
        later = [await chat(gw, tenant, i) for i in range(300, 330)] if not ample else []
        await gw.state.ledger.flush()
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == 200
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert all(r.text.rstrip().endswith("data: [DONE]") for r in ok if r.headers["content-type"].startswith("text"))
    rows = ledger("tenant_id = %s", tenant.id)
    assert len(rows) == 200 + len(later)  # a row for every request, refusals included
    spent = sum(r["cost_usd"] for r in rows)
    assert spent <= limit
    if ample:
        assert not refused
    else:
        # what fits at once: the worst cases of streams (their fallback prompts too) and of plain requests
        prompt = math.ceil(count_messages(msg(100)) * INPUT_MARGIN) + INPUT_SLACK
        stream_worst = worst_case_usd(msg(100), 16) + 2 * prompt * PRICE[0] / 10**6
        assert len(ok) >= int(limit / stream_worst)
        assert len(ok) < 200
        assert any(r.status_code == 200 for r in later)  # the burst's unspent reservations came back
        assert later[-1].status_code == 429
        assert spent > limit * Decimal("0.7")  # and the budget is used, not left idle


def agent_turns(i: Any) -> list[dict[str, Any]]:
    """An agent's conversation: a short question, a tool call whose arguments are long, and its short result."""
    arguments = json.dumps({"query": " ".join(f"term{k}" for k in range(300)), "request": i})
    return [*msg(i), {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": "search", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "no results"}]


# A tool definition as agents send them: a long description and a schema (about 1,000 tokens).
TOOLS = [{"type": "function", "function": {
    "name": "search", "description": " ".join(f"how to use the search tool, note {k}." for k in range(120)),
    "parameters": {"type": "object", "properties": {f"field_{k}": {"type": "string", "description": f"filter {k}"}
                                                    for k in range(30)}}}}]


@pytest.mark.parametrize("shape", ["tool definitions", "tool calls in the conversation"])
async def test_what_a_template_renders_besides_the_messages_is_reserved_too(app_factory, make_tenant, admin, ledger,
                                                                            sim, shape):
    """A request's tool definitions and the arguments of the tool calls in its history are prompt tokens the
    upstream charges (it renders them into the prompt); a reservation of the message texts alone let 40
    concurrent agent requests through a budget that holds fewer than half of them."""
    tenant = make_tenant()
    bodies = [{"model": "sim-large", "max_tokens": 16, "stream": i % 2 == 0,
               **({"messages": msg(i), "tools": TOOLS} if shape == "tool definitions" else {"messages": agent_turns(i)})}
              for i in range(40)]
    limit = worst_case_usd(msg(0), 16) * 100  # a hundred requests, were their message texts all they sent
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="month", limit_usd=str(limit))
        results = await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers, json=b)
                                         for b in bodies))
        await gw.state.ledger.flush()
    ok = [r for r in results if r.status_code == 200]
    assert 0 < len(ok) < 20 and all(r.status_code == 429 for r in results if r not in ok)
    rows = ledger("tenant_id = %s AND status = 200", tenant.id)
    assert len(rows) == len(ok)
    assert min(r["input_tokens"] for r in rows) > 300  # the upstream charged what it rendered
    assert sum(r["cost_usd"] for r in ledger("tenant_id = %s", tenant.id)) <= limit


async def test_each_media_part_reserves_the_set_figure(app_factory, make_tenant, admin, ledger, sim):
    """An image's tokens depend on the model and the picture, and nothing in the request says how many: each
    media part reserves TOLLWAY_MEDIA_PART_TOKENS (the scripted upstream charges 1,024 a part, as a vision
    model charges a picture's patches); reserved as text alone, all 40 requests of three images each were
    admitted through a budget that holds a dozen of them."""
    from tollway.local.sim import MEDIA_TOKENS

    tenant = make_tenant()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {"model": "sim-large", "max_tokens": 16, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what do these show"}, image, image, image]}]}
    # a dozen requests, each at what the upstream charges for it (its three images and its output)
    limit = 12 * (3 * MEDIA_TOKENS * PRICE[0] + reserved_output(16) * PRICE[1]) / 10**6
    async with app_factory() as gw:  # the default: 4,096 tokens a part
        await set_budget(gw, admin, tenant, window="month", limit_usd=str(limit))
        results = await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
                                         for _ in range(40)))
        await gw.state.ledger.flush()
    ok = [r for r in results if r.status_code == 200]
    assert 0 < len(ok) <= 12 and all(r.status_code == 429 for r in results if r not in ok)
    assert all(r["input_tokens"] >= 3 * MEDIA_TOKENS for r in ledger("tenant_id = %s AND status = 200", tenant.id))
    assert sum(r["cost_usd"] for r in ledger("tenant_id = %s", tenant.id)) <= limit


async def test_a_predicted_output_is_reserved_as_output(app_factory, make_tenant, admin, ledger):
    """OpenAI bills the tokens of a prediction (``prediction``) the answer does not use as completion tokens,
    beyond max_tokens (the scripted upstream rejects every word): reserved at max_tokens alone, 40 concurrent
    requests with a 400-word prediction went through a budget that holds fewer than ten."""
    tenant = make_tenant()
    prediction = {"type": "content", "content": " ".join(f"line{k} = value{k}" for k in range(134))}
    limit = 10 * (400 * PRICE[1]) / 10**6  # ten requests' rejected predictions, output alone
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="month", limit_usd=str(limit))
        results = await asyncio.gather(*(chat(gw, tenant, i, stream=i % 2 == 0, extra={"prediction": prediction})
                                         for i in range(40)))
        await gw.state.ledger.flush()
    ok = [r for r in results if r.status_code == 200]
    assert 0 < len(ok) < 10 and all(r.status_code == 429 for r in results if r not in ok)
    assert all(r["output_tokens"] > 400 for r in ledger("tenant_id = %s AND status = 200", tenant.id))
    assert sum(r["cost_usd"] for r in ledger("tenant_id = %s", tenant.id)) <= limit


async def test_stream_that_ignores_max_tokens_is_cut_at_the_reservation(app_factory, make_tenant, admin, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        resp = await chat(gw, tenant, 1, stream=True, max_tokens=5, model="sim-ignoremax")
        await gw.state.ledger.flush()
    assert resp.status_code == 200
    frames = sse_frames(resp.text)
    assert '"code":"reservation_exceeded"' in frames[-2]
    text = "".join(__import__("json").loads(f)["choices"][0]["delta"].get("content", "")
                   for f in frames[:-2] if '"choices":[{' in f)
    reserved = reserved_output(5)  # 15: max_tokens plus the tokenizer margin
    assert len(text.split()) == reserved  # exactly the reserved tokens reached the client, no more
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["output_tokens"]) == (502, "reservation_exceeded", reserved)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_tool_call_from_an_upstream_that_reports_no_usage_is_charged_its_tokens(app_factory, make_tenant,
                                                                                        ledger, stream):
    """A tool call's name and arguments are output tokens: where the upstream reports no usage they are counted
    (they were not: an agent's answers cost $0 on such upstreams)."""
    from tollway.tokens import count_text

    tenant = make_tenant()
    question = "which fees apply to an international wire sent from a business account on a weekend"
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-tools-nousage", "messages": msg(question), "stream": stream,
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    if stream:
        calls = [d["choices"][0]["delta"]["tool_calls"][0] for d in event_payloads(resp.text)
                 if d.get("choices") and d["choices"][0]["delta"].get("tool_calls")]
        name, arguments = calls[0]["function"]["name"], "".join(c["function"]["arguments"] for c in calls)
    else:
        [call] = resp.json()["choices"][0]["message"]["tool_calls"]
        name, arguments = call["function"]["name"], call["function"]["arguments"]
    assert json.loads(arguments) == {"query": f"how much does request {question} cost"}
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["usage_source"] == "estimated"
    assert row["output_tokens"] >= count_text(name + arguments) > 20
    assert row["cost_usd"] > 0


async def test_a_streamed_tool_call_is_cut_at_the_reservation(app_factory, make_tenant, admin, ledger):
    """The scripted upstream streams a tool call's arguments whatever max_tokens says: the stream is cut where
    the reservation ends, as a text answer is, and charged what was relayed."""
    tenant = make_tenant()
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-tools", "messages": msg(" ".join(f"word{k}" for k in range(60))), "stream": True,
            "max_tokens": 5, "tools": [{"type": "function", "function": {"name": "lookup"}}]})
        await gw.state.ledger.flush()
    assert resp.status_code == 200
    frames = sse_frames(resp.text)
    assert '"code":"reservation_exceeded"' in frames[-2]
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == (502, "reservation_exceeded")
    assert row["output_tokens"] <= reserved_output(5)


async def test_a_request_without_max_tokens_gets_the_tenant_cap(app_factory, make_tenant, admin, sim):
    tenant = make_tenant()
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        resp = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                   json={"tenant": tenant.name, "default_max_tokens": 7})
        assert resp.status_code == 200
        assert resp.json()["default_max_tokens"] == 7
        typo = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                   json={"tenant": tenant.name, "quality_floor": "lagre"})
        assert typo.status_code == 400
        assert typo.json()["error"]["param"] == "quality_floor"
        ok = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                  json={"model": "sim-small", "messages": msg("cap")})
    assert ok.status_code == 200
    import orjson

    assert orjson.loads(sim.get("/sim/last-request?model=sim-small"))["max_tokens"] == 7


async def test_mixed_windows_are_all_or_nothing(app_factory, make_tenant, admin, pg, redis_url):
    import redis

    tenant = make_tenant()
    per_request = worst_case_usd(msg(1), 16)
    async with app_factory() as gw:
        day = await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        key = await set_budget(gw, admin, tenant, scope="key", subject=str(tenant.key_id), window="month",
                               limit_usd="1")
        minute = await set_budget(gw, admin, tenant, scope="user", subject="*", window="minute",
                                  limit_usd=str(per_request * Decimal("1.2")))
        first = await chat(gw, tenant, 1, headers={"x-tollway-user": "alice"})
        second = await chat(gw, tenant, 2, headers={"x-tollway-user": "alice"})
        other_user = await chat(gw, tenant, 3, headers={"x-tollway-user": "bob"})
    assert first.status_code == 200
    assert other_user.status_code == 200
    assert second.status_code == 429
    assert "the minute budget of each user" in second.json()["error"]["message"]
    client = redis.Redis.from_url(redis_url)
    [day_key] = list(client.scan_iter(f"tw:{{t:{tenant.id}}}:b:{day['id']}:*"))
    # The refused request reserved nothing anywhere: the day budget saw two requests, settled.
    assert client.hget(day_key, "r") == b"0:0:0"
    assert int(client.hget(day_key, "s_req")) == 2
    assert key["window"] == "month"
    assert minute["subject"] == "*"
    assert first.headers["x-tollway-budget-remaining"]


def _running(sim: Any) -> int:
    with urllib.request.urlopen(sim.url.removesuffix("/v1") + "/sim/stats", timeout=5) as resp:
        return int(json.loads(resp.read())["running"])


async def test_budget_change_applies_while_requests_are_in_flight(app_factory, make_tenant, admin, start_sim, tmp_path):
    slow = start_sim("--ttft-ms", "600")
    tenant = make_tenant()
    config = write_config(tmp_path / "slow.yaml", slow.url)
    async with app_factory(config=config, policy_cache_ttl_s=0) as gw:
        await set_budget(gw, admin, tenant, window="hour", limit_usd="1")
        in_flight = [asyncio.create_task(chat(gw, tenant, i)) for i in range(3)]
        async with asyncio.timeout(30):
            while await asyncio.to_thread(_running, slow) < 3:  # noqa: ASYNC110 (a polled gauge of another process)
                await asyncio.sleep(0.01)
        await set_budget(gw, admin, tenant, window="hour", limit_usd="0.0000001")  # cut to almost nothing
        refused = await chat(gw, tenant, "late")
        done = await asyncio.gather(*in_flight)
        await set_budget(gw, admin, tenant, window="hour", limit_usd="1")
        again = await chat(gw, tenant, "again")
    assert [r.status_code for r in done] == [200, 200, 200]  # admitted under the old limit, completed
    assert refused.status_code == 429
    assert again.status_code == 200


async def test_rate_limits_and_headers(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.put(f"/v1/admin/keys/{tenant.key_id}/limits", headers=admin.headers,
                                   json={"rpm": 3, "tpm": 100000})
        assert resp.status_code == 200
        gw.state.keys._cache.clear()  # the key's limits are read with the key
        results = [await chat(gw, tenant, i) for i in range(4)]
    assert [r.status_code for r in results] == [200, 200, 200, 429]
    assert results[0].headers["x-ratelimit-limit-requests"] == "3"
    assert results[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert results[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert results[0].headers["x-ratelimit-limit-tokens"] == "100000"
    assert results[0].headers["x-ratelimit-reset-requests"].endswith("s")
    error = results[3].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(results[3].headers["retry-after"]) <= 60


async def test_retry_storm_is_refused_and_recorded(app_factory, make_tenant, admin, pg):
    import psycopg

    tenant = make_tenant()
    async with app_factory() as gw:
        await gw.client.put("/v1/admin/policies", headers=admin.headers,
                            json={"tenant": tenant.name, "retry_storm_limit": 5, "retry_storm_window_s": 30})
        results = [await chat(gw, tenant, "same") for _ in range(8)]
        different = await chat(gw, tenant, "different")
        await gw.state.events.drain()
    assert [r.status_code for r in results] == [200] * 5 + [429] * 3
    assert results[5].json()["error"]["code"] == "retry_storm"
    assert 1 <= int(results[5].headers["retry-after"]) <= 30
    assert different.status_code == 200
    with psycopg.connect(pg.url) as conn:
        events = conn.execute("SELECT kind, contained_at - first_offense_at FROM breaker_events"
                              " WHERE tenant_id = %s", (tenant.id,)).fetchall()
    assert len(events) == 1
    assert events[0][0] == "retry_storm"
    assert events[0][1].total_seconds() >= 0


async def test_spend_velocity_soft_steps_down_and_hard_refuses(app_factory, make_tenant, admin, pg, ledger):
    import psycopg

    tenant = make_tenant()
    per_request = worst_case_usd(msg(1), 16)
    async with app_factory() as gw:
        await gw.client.put("/v1/admin/policies", headers=admin.headers, json={
            "tenant": tenant.name, "velocity_soft_usd_per_min": str(per_request),
            "velocity_hard_usd_per_min": str(per_request * 2)})
        results = []
        for i in range(10):
            results.append(await chat(gw, tenant, i))
            await gw.state.quota.drain()  # settlement runs after each answer; let it land
        await gw.state.events.drain()
        await gw.state.ledger.flush()
    codes = [r.status_code for r in results]
    assert codes[:2] == [200, 200]
    assert 429 in codes
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["code"] == "spend_velocity_exceeded"
    rows = ledger("tenant_id = %s AND status = 200", tenant.id)
    assert rows[0]["route_reason"] == "requested"
    # A named model is kept above the soft line (only 'auto' steps down); the crossing is recorded.
    assert any(r["route_reason"] == "requested;velocity_soft" for r in rows[1:])
    spent = sum(r["cost_usd"] for r in rows)
    assert spent <= per_request * 3  # contained within one request of the hard line
    with psycopg.connect(pg.url) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM breaker_events WHERE tenant_id = %s",
                                            (tenant.id,)).fetchall()]
    assert kinds == ["spend_velocity"]


async def test_admin_routes_need_an_admin_key(app_factory, make_tenant):
    tenant, finance = make_tenant(), make_tenant(role="finance")
    async with app_factory() as gw:
        for who in (tenant, finance):
            resp = await gw.client.put("/v1/admin/budgets", headers=who.headers,
                                       json={"tenant": who.name, "window": "day", "limit_usd": "1"})
            assert resp.status_code == 403
        bad = await gw.client.put("/v1/admin/budgets", headers=make_tenant(role="admin").headers,
                                  json={"tenant": tenant.name, "window": "fortnight", "limit_usd": "1"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "window"


@pytest.mark.parametrize("field", ["route_threshold", "default_max_tokens", "retry_storm_limit", "redis_failure",
                                   "degraded_answers", "content_retention_days"])
async def test_null_for_a_policy_field_that_always_has_a_value_is_a_400_and_changes_nothing(app_factory, make_tenant,
                                                                                          admin, field):
    """rpm, tpm and the other limits clear with null; a field that always holds a value (a NOT NULL column) says
    so in a 400 instead of failing in the database, and the policy stands as it was."""
    tenant = make_tenant()
    async with app_factory() as gw:
        before = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                     json={"tenant": tenant.name, "rpm": 100})
        refused = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                      json={"tenant": tenant.name, "rpm": 7, field: None})
        after = await gw.client.put("/v1/admin/policies", headers=admin.headers, json={"tenant": tenant.name})
        cleared = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                      json={"tenant": tenant.name, "rpm": None})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == field
    assert "leave the field out" in refused.json()["error"]["message"]
    assert before.json()["rpm"] == 100 and before.json()[field] is not None
    assert after.json() == before.json()  # the refused request set nothing, its rpm either
    assert cleared.status_code == 200 and cleared.json()["rpm"] is None


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/admin/budgets", "limit_usd", "0.00000000001"),  # would be stored rounded: a limit of $0
    ("/v1/admin/budgets", "limit_usd", "1e20"),
    ("/v1/admin/policies", "velocity_soft_usd_per_min", "1e-30"),
    ("/v1/admin/policies", "velocity_hard_usd_per_min", 12345678901),
])
async def test_a_dollar_amount_the_columns_cannot_hold_is_a_400_naming_it(app_factory, make_tenant, admin, path, field,
                                                                           value):
    tenant = make_tenant()
    body = {"tenant": tenant.name, field: value, **({"window": "day"} if path.endswith("budgets") else {})}
    async with app_factory() as gw:
        resp = await gw.client.put(path, headers=admin.headers, json=body)
        fine = await gw.client.put(path, headers=admin.headers, json={**body, field: "0.0000000001"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field
    assert fine.status_code == 200, fine.text
    assert Decimal(fine.json()[field]) == Decimal("0.0000000001")


async def test_a_reset_that_cannot_clear_its_counters_records_nothing(app_factory, make_tenant, admin, redis_url, pg):
    """A budget reset is recorded (reset_at, the change log) in the same transaction that clears its counters: with
    Redis not answering, the 503 says nothing was changed, and nothing was."""
    import psycopg
    import redis.asyncio as aioredis

    tenant = make_tenant()
    async with app_factory() as gw:
        budget = await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        assert (await chat(gw, tenant, "spend")).status_code == 200
        await gw.state.quota.drain()
        paused = aioredis.Redis.from_url(redis_url)
        try:
            await paused.execute_command("CLIENT", "PAUSE", "4000", "ALL")
            refused = await gw.client.post("/v1/admin/budgets/reset", headers=admin.headers,
                                           json={"tenant": tenant.name})
        finally:
            await paused.execute_command("CLIENT", "UNPAUSE")
            await paused.aclose()
        with psycopg.connect(pg.url) as conn:
            unrecorded = conn.execute("SELECT reset_at FROM budgets WHERE id = %s", (budget["id"],)).fetchone()
            logged = conn.execute("SELECT count(*) FROM changes WHERE kind = 'budget' AND action = 'reset'"
                                  " AND subject = %s", (str(budget["id"]),)).fetchone()
        done = await gw.client.post("/v1/admin/budgets/reset", headers=admin.headers, json={"tenant": tenant.name})
    assert refused.status_code == 503, refused.text
    assert "nothing was changed" in refused.json()["error"]["message"]
    assert unrecorded == (None,) and logged == (0,)
    assert done.status_code == 200, done.text
    assert done.json()["reset"] == [budget["id"]] and done.json()["counters_cleared"] >= 1


async def test_other_apis_streams_cut_at_the_reservation_end_with_their_own_error_event(app_factory, make_tenant,
                                                                                        admin, ledger):
    """The Responses API and Anthropic's Messages, streamed from an upstream that ignores max_tokens: cut at
    the same reservation as chat, ending with that API's error event; the ledger row says so."""
    tenant = make_tenant()
    async with app_factory() as gw:
        await set_budget(gw, admin, tenant, window="day", limit_usd="1")
        responses = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-ignoremax", "input": "go on", "max_output_tokens": 5, "stream": True})
        messages = await gw.client.post("/v1/messages", headers=tenant.headers, json={
            "model": "sim-ignoremax", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "go on"}]})
        await gw.state.ledger.flush()
    events = event_payloads(responses.text)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "reservation_exceeded"
    assert events[-1]["response"]["status"] == "failed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert len(text.split()) == reserved_output(5)
    last = event_payloads(messages.text)[-1]
    assert (last["type"], last["error"]["code"]) == ("error", "reservation_exceeded")
    for resp, endpoint in ((responses, "responses"), (messages, "messages")):
        [row] = ledger("request_id = %s", resp.headers["x-request-id"])
        assert (row["endpoint"], row["status"], row["error_code"]) == (endpoint, 502, "reservation_exceeded")
