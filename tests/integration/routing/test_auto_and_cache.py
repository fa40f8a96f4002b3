"""Routing by difficulty and budget (``auto``), the response cache, and canaries and shadows, against real
scripted upstream processes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from support.routing import ask, calls, counted, stream_text

EASY = "What is the capital of France?"
HARD = ("Which country that borders the nation where the 2014 FIFA World Cup final was played has the "
        "largest population, and who is its current head of government?")


async def test_auto_routes_by_difficulty_and_the_tenant_threshold(routed, sims, make_tenant, admin, ledger):
    big, small = sims(), sims()
    tenant, frugal = make_tenant(), make_tenant()
    async with routed(big=[big.url], small=[small.url]) as gw:
        await gw.client.put("/v1/admin/policies", headers=admin.headers, json={"tenant": frugal.name,
                                                                             "route_threshold": 1.0})

        async def auto(who: Any, content: str, **extra: Any) -> Any:
            resp = await gw.client.post("/v1/chat/completions", headers=who.headers,
                                        json=ask(content, model="auto", **extra))
            assert resp.status_code == 200, resp.text
            return resp

        easy, hard = await auto(tenant, EASY), await auto(tenant, HARD)
        code = await auto(tenant, "Fix this:\n```python\ndef f(x) return x\n```")
        tools = await auto(tenant, EASY, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        frugal_hard = await auto(frugal, HARD)
        await gw.state.ledger.flush()
    assert easy.headers["x-tollway-model"] == "small"
    assert easy.json()["model"] == "small"
    assert easy.headers["x-tollway-route"].startswith("auto:difficulty=0.")
    assert "<0.50" in easy.headers["x-tollway-route"]
    assert hard.headers["x-tollway-model"] == "big"
    assert ">=0.50" in hard.headers["x-tollway-route"]
    assert code.headers["x-tollway-model"] == "big"
    assert "(code)" in code.headers["x-tollway-route"]
    assert tools.headers["x-tollway-model"] == "big"
    assert "tools" in tools.headers["x-tollway-route"]
    assert frugal_hard.headers["x-tollway-model"] == "small"  # threshold 1: only a certain 'hard' goes large
    [row] = ledger("request_id = %s", hard.headers["x-request-id"])
    assert (row["model"], row["tier"], row["route_reason"]) == ("big", "large", hard.headers["x-tollway-route"])


async def test_auto_steps_down_near_budget_exhaustion(routed, sims, make_tenant, admin):
    big, small = sims(), sims()
    tenant = make_tenant()
    async with routed(big=[big.url], small=[small.url], routing={"budget_step_down_headroom": 0.5}) as gw:
        roomy = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD, model="auto"))
        # a budget this request's worst case (about $0.00042 on the large model) fills more than half of
        await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                            json={"tenant": tenant.name, "window": "day", "limit_usd": "0.0007"})
        tight = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD, model="auto"))
    assert roomy.headers["x-tollway-model"] == "big"
    assert tight.status_code == 200
    assert tight.headers["x-tollway-model"] == "small"
    assert tight.headers["x-tollway-route"].endswith(";budget_step_down")


async def test_auto_takes_a_cheaper_tier_when_the_budget_no_longer_holds_the_large_one(routed, sims, make_tenant,
                                                                                       admin, ledger):
    big, small = sims(), sims()
    tenant = make_tenant()
    async with routed(big=[big.url], small=[small.url]) as gw:
        # room for the small model's worst case (about $0.00002), not the large one's (about $0.0004); a storm
        # limit of 1 shows the second admission try is not counted as a retry
        await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                            json={"tenant": tenant.name, "window": "day", "limit_usd": "0.0002"})
        await gw.client.put("/v1/admin/policies", headers=admin.headers,
                            json={"tenant": tenant.name, "retry_storm_limit": 1})
        hard = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD, model="auto"))
        named = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD + "?"))
        await gw.state.quota.drain()
        await gw.state.ledger.flush()
    assert hard.status_code == 200, hard.text
    assert hard.headers["x-tollway-model"] == "small"
    assert hard.headers["x-tollway-route"].endswith(";budget_step_down")
    assert named.status_code == 429
    assert named.json()["error"]["code"] == "insufficient_quota"
    [row] = ledger("request_id = %s", hard.headers["x-request-id"])
    assert (row["model"], row["status"]) == ("small", 200)
    assert 0 < row["cost_usd"] < Decimal("0.0002")
    assert calls(big) == 0


async def test_deterministic_requests_are_served_from_the_cache(routed, sims, make_tenant, admin, ledger):
    big, small = sims(), sims()
    tenant, other = make_tenant(), make_tenant()
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    q = ask("cache me", temperature=0)
    async with routed(big=[big.url], small=[small.url], metric_reader=reader) as gw:
        first = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=q)
        reordered = dict(reversed(list(q.items())))  # the same request, keys in another order
        second = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=reordered)
        async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers,
                                    json={**q, "stream": True, "stream_options": {"include_usage": True}}) as streamed:
            frames = await stream_text(streamed)
        other_tenant = await gw.client.post("/v1/chat/completions", headers=other.headers, json=q)
        sampled = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask("cache me"))
                   for _ in range(2)]
        await gw.state.ledger.flush()
        report = await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                     params={"tenant": tenant.name, "group_by": "model"})
    assert "x-tollway-cache" not in first.headers
    assert second.headers["x-tollway-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.headers["x-tollway-cost-usd"] == "0.0000000000"
    assert streamed.headers["x-tollway-cache"] == "hit"
    assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames if f["choices"]) == \
        first.json()["choices"][0]["message"]["content"]
    assert frames[-1]["usage"] == first.json()["usage"]
    assert "x-tollway-cache" not in other_tenant.headers  # per tenant
    assert all("x-tollway-cache" not in r.headers for r in sampled)  # not deterministic: not cached
    assert calls(big) == 4  # first, the other tenant's, and the two sampled requests
    assert counted(reader, "tollway.cache.hits") == {(("gen_ai.request.model", "big"),): 2}
    [hit] = ledger("request_id = %s", second.headers["x-request-id"])
    first_cost = Decimal(first.headers["x-tollway-cost-usd"])
    assert (hit["cache_hit"], hit["cost_usd"], hit["saved_usd"], hit["model"]) == (True, 0, first_cost, "big")
    totals = report.json()["totals"]
    assert (totals["cache_hits"], Decimal(totals["cache_saved_usd"])) == (2, 2 * first_cost)
    assert totals["requests"] == 5
    assert (Decimal(totals["spend_usd"]) == sum(
        Decimal(r.headers["x-tollway-cost-usd"]) for r in (first, *sampled)))


async def test_a_cached_answer_from_a_model_the_policy_now_excludes_is_a_miss(routed, sims, make_tenant, admin):
    big, small = sims(), sims()
    tenant = make_tenant()
    q = ask("what is the capital of France?", model="auto", temperature=0)
    async with routed(big=[big.url], small=[small.url]) as gw:
        easy = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=q)
        hit = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=q)
        floor = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                    json={"tenant": tenant.name, "quality_floor": "large"})
        raised = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=q)
        again = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=q)
    assert floor.status_code == 200, floor.text
    assert (easy.headers["x-tollway-model"], hit.headers["x-tollway-model"]) == ("small", "small")
    assert "x-tollway-cache" not in easy.headers
    assert hit.headers["x-tollway-cache"] == "hit"
    # the floor now excludes the small tier: its cached answer is not served, the large model answers
    assert raised.headers["x-tollway-model"] == "big"
    assert "x-tollway-cache" not in raised.headers
    assert again.headers["x-tollway-model"] == "big"
    assert again.headers["x-tollway-cache"] == "hit"
    assert (calls(small), calls(big)) == (1, 1)


async def test_a_finished_deterministic_stream_is_cached_too(routed, sims, make_tenant):
    big, small = sims(), sims()
    tenant = make_tenant()
    q = ask("stream then cache", seed=7, stream=True)
    async with routed(big=[big.url], small=[small.url]) as gw:
        async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers, json=q) as first:
            streamed = await stream_text(first)
        await gw.state.routing.drain()  # the cache write runs after the stream, off the request path
        again = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={**q, "stream": False})
        sampled = ask("stream, not deterministic", stream=True)
        for _ in range(2):
            async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers, json=sampled) as resp:
                await stream_text(resp)
                assert "x-tollway-cache" not in resp.headers
            await gw.state.routing.drain()
    text = "".join(f["choices"][0]["delta"].get("content", "") for f in streamed if f.get("choices"))
    assert "x-tollway-cache" not in first.headers
    assert again.headers["x-tollway-cache"] == "hit"
    assert again.json()["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert again.json()["choices"][0]["finish_reason"] == "stop"
    assert again.json()["model"] == "big"
    assert calls(big) == 3  # the first stream and the two sampled ones


async def test_canary_by_end_user_and_shadow_samples(routed, sims, make_tenant, admin, ledger, pg):
    import psycopg

    big, small, candidate = sims(), sims(), sims()
    tenant = make_tenant()
    extra = [{"name": "big-v2", "upstream": "cand", "upstream_model": "sim-large", "tier": "large",
              "price": {"input_per_mtok": "2", "output_per_mtok": "10"}},
             {"name": "small-v2", "upstream": "cand", "upstream_model": "sim-small", "tier": "small",
              "price": {"input_per_mtok": "0.1", "output_per_mtok": "0.4"}}]
    routing = {"rollouts": [{"model": "big", "candidate": "big-v2", "canary_percent": 30},
                            {"model": "small", "candidate": "small-v2", "shadow_percent": 100}]}
    served: dict[str, set[str]] = {}
    async with routed(big=[big.url], small=[small.url], routing=routing, extra_models=extra,
                       extra_upstreams=[{"name": "cand", "base_url": candidate.url}]) as gw:
        for round_ in range(2):
            for user in range(30):
                resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                            json=ask(f"round {round_}", user=f"user-{user}"))
                assert resp.status_code == 200
                served.setdefault(f"user-{user}", set()).add(resp.headers["x-tollway-model"])
        shadowed = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                        json={**ask("shadow me"), "model": "small"})
        await gw.state.shadows.drain()
        await gw.state.ledger.flush()
        report = await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                     params={"tenant": tenant.name, "group_by": "model"})
    # the same user always sees the same variant; about 30% of users see the candidate
    assert all(len(models) == 1 for models in served.values())
    canary_users = [u for u, models in served.items() if models == {"big-v2"}]
    assert 3 <= len(canary_users) <= 18
    canary_rows = ledger("tenant_id = %s AND rollout = 'canary'", tenant.id)
    assert len(canary_rows) == 2 * len(canary_users)
    assert {r["model"] for r in canary_rows} == {"big-v2"}
    assert all(r["route_reason"] == "requested;canary:big-v2" for r in canary_rows)
    # shadow: the user got the primary's answer; the candidate's was recorded, and costed apart
    assert shadowed.headers["x-tollway-model"] == "small"
    assert shadowed.json()["model"] == "small"
    [row] = ledger("request_id = %s", shadowed.headers["x-request-id"] + ".shadow")
    assert (row["role"], row["model"], row["status"], row["rollout"]) == ("shadow", "small-v2", 200, "shadow")
    assert row["cost_usd"] > 0
    with psycopg.connect(pg.url) as conn:
        sample = conn.execute("SELECT model, candidate, status, primary_output, candidate_output, candidate_cost_usd"
                              " FROM shadow_samples WHERE request_id = %s",
                              (shadowed.headers["x-request-id"],)).fetchone()
    assert sample is not None
    assert sample[:3] == ("small", "small-v2", 200)
    assert sample[3] is None and sample[4] is None  # the content policy's default: scores and metadata only
    assert sample[5] == row["cost_usd"]
    totals = report.json()["totals"]
    assert Decimal(totals["shadow_usd"]) == row["cost_usd"]
    assert totals["requests"] == 61  # shadow rows are not requests
