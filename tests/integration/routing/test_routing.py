"""Routing against real scripted upstream processes: a primary that errors, times out before the first
byte, cuts streams, stalls, flaps, is dead or saturates its queue; who answered, how many attempts each
upstream got (an open breaker gets none beyond its probes), deadlines, and the ledger rows."""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal

from support.routing import ask, calls, counted, stats, stream_text


async def test_an_erroring_primary_falls_back_to_the_next_tier(routed, sims, make_tenant, ledger):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    primary, fallback = sims("--fault", "error"), sims()
    tenant = make_tenant()
    reader = InMemoryMetricReader()
    async with routed(big=[primary.url], small=[fallback.url], metric_reader=reader) as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask())
        await gw.state.ledger.flush()
        attempts = counted(reader, "tollway.routing.failed_attempts")
    assert attempts == {(("error.type", "upstream_error"), ("gen_ai.request.model", "big"),
                         ("tollway.upstream", "big-0")): 1}
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-tollway-model"] == "small"
    assert resp.json()["model"] == "small"
    assert resp.headers["x-tollway-route"] == "requested"
    assert (calls(primary), calls(fallback)) == (1, 1)
    rid = resp.headers["x-request-id"]
    [answer] = ledger("request_id = %s", rid)
    [attempt] = ledger("request_id = %s", rid + ".a1")
    assert (answer["role"], answer["model"], answer["upstream"], answer["tier"], answer["attempt"], answer["status"]) \
        == ("answer", "small", "small-0", "small", 2, 200)
    assert answer["cost_usd"] > 0
    # the failed attempt reached the upstream but nothing was produced: a row, at no cost
    assert (attempt["role"], attempt["model"], attempt["upstream"], attempt["status"], attempt["error_code"],
            attempt["cost_usd"]) == ("attempt", "big", "big-0", 502, "upstream_error", Decimal(0))


async def test_open_breaker_gets_no_requests_beyond_its_probes(routed, sims, make_tenant, ledger):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    primary, fallback = sims("--fault", "error"), sims()
    tenant = make_tenant()
    routing = {"breaker": {"consecutive_failures": 2, "open_s": 1.0, "half_open_probes": 1}}
    reader = InMemoryMetricReader()
    async with routed(big=[primary.url], small=[fallback.url], routing=routing, metric_reader=reader) as gw:
        assert counted(reader, "tollway.routing.breaker.state") == {
            (("tollway.upstream", "big-0"),): 0, (("tollway.upstream", "small-0"),): 0}
        first = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                 for i in range(10)]
        assert calls(primary) == 2  # two failures opened the breaker; the other eight never went there
        assert counted(reader, "tollway.routing.breaker.state")[(("tollway.upstream", "big-0"),)] == 2
        assert counted(reader, "tollway.routing.breaker.trips") == {
            (("tollway.upstream", "big-0"),): 1, (("tollway.upstream", "small-0"),): 0}
        assert counted(reader, "tollway.routing.outstanding")[(("tollway.upstream", "small-0"),)] == 0
        assert first[-1].headers["x-tollway-route"] == "requested;big:down;target=small"
        await asyncio.sleep(1.1)
        # cool-down over: concurrent requests, but only one probe may go to the half-open replica
        after = await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                                      json=ask(f"p{i}")) for i in range(6)))
        health = (await gw.client.get("/v1/admin/routing", headers=tenant.headers)).status_code
    assert calls(primary) == 3  # exactly one probe; it failed, so the breaker is open again
    assert all(r.status_code == 200 and r.headers["x-tollway-model"] == "small" for r in [*first, *after])
    assert calls(fallback) == 16
    assert health == 403  # an app key cannot read the routing state


async def test_a_dead_single_replica_is_not_hammered(routed, sims, make_tenant):
    fallback = sims()
    tenant = make_tenant()
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    routing = {"breaker": {"consecutive_failures": 3, "open_s": 60}}
    async with routed(big=[dead], small=[fallback.url], routing=routing) as gw:
        results = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                   for i in range(8)]
        replica = gw.state.routing.health["big-0"]
        assert (replica.state, replica.calls, replica.refused_open) == ("open", 3, 0)
    assert [r.status_code for r in results] == [200] * 8
    assert calls(fallback) == 8


async def test_when_every_breaker_is_open_the_answer_is_a_fast_503(routed, make_tenant, ledger):
    tenant = make_tenant()
    dead = "http://127.0.0.1:9/v1"
    routing = {"breaker": {"consecutive_failures": 1, "open_s": 60}}
    async with routed(big=[dead], small=[dead], routing=routing) as gw:
        first = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask())
        later = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask("again"))
        await gw.state.ledger.flush()
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "upstream_unavailable"
    assert later.status_code == 503
    assert later.json()["error"]["code"] == "no_upstream_available"
    assert later.headers["retry-after"] == "1"
    assert len(ledger("request_id LIKE %s", first.headers["x-request-id"] + ".a%")) == 2  # big, then small
    assert ledger("request_id LIKE %s", later.headers["x-request-id"] + ".a%") == []  # nothing was tried


async def test_timeout_before_the_first_byte_moves_on_at_the_tier_deadline(routed, sims, make_tenant, ledger):
    primary, fallback = sims("--fault", "timeout"), sims()
    tenant = make_tenant()
    routing = {"tiers": [{"name": "large", "deadline_s": 0.5, "ttft_deadline_s": 0.4},
                         {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}]}
    async with routed(big=[primary.url], small=[fallback.url], routing=routing) as gw:
        started = time.perf_counter()
        plain = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask())
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers,
                                    json=ask(stream=True)) as resp:
            frames = await stream_text(resp)
        stream_s = time.perf_counter() - started
        await gw.state.ledger.flush()
    # Lower bounds only (a busy machine can always be slower): the large tier was given its whole
    # deadline before the fallback answered; that it then moved on is in the attempt rows below.
    assert plain.status_code == 200
    assert plain.headers["x-tollway-model"] == "small"
    assert plain_s >= 0.5
    assert resp.status_code == 200
    assert resp.headers["x-tollway-model"] == "small"
    assert stream_s >= 0.4
    assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames if f.get("choices"))
    attempts = ledger("request_id = %s", plain.headers["x-request-id"] + ".a1")
    assert attempts[0]["error_code"] == "upstream_timeout"
    assert attempts[0]["cost_usd"] == 0


async def test_a_stream_stalled_after_its_headers_falls_back_and_charges_the_prompt(routed, sims, make_tenant,
                                                                                     ledger):
    primary, fallback = sims("--ttft-ms", "3000"), sims()
    tenant = make_tenant()
    routing = {"tiers": [{"name": "large", "deadline_s": 5, "ttft_deadline_s": 0.3},
                         {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}]}
    async with routed(big=[primary.url], small=[fallback.url], routing=routing) as gw:
        async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers,
                                    json=ask("a stalled stream", stream=True)) as resp:
            frames = await stream_text(resp)
        await gw.state.ledger.flush()
    assert resp.headers["x-tollway-model"] == "small"
    assert all(f["model"] == "small" for f in frames)
    rid = resp.headers["x-request-id"]
    [attempt] = ledger("request_id = %s", rid + ".a1")
    # the upstream had accepted the stream (and read the prompt) before the deadline passed
    assert (attempt["error_code"], attempt["output_tokens"], attempt["usage_source"]) == \
        ("upstream_timeout", 0, "estimated")
    assert attempt["input_tokens"] > 0
    assert attempt["cost_usd"] == Decimal(attempt["input_tokens"]) * 3 / 10**6


async def test_a_stream_cut_after_reaching_the_client_is_never_resent(routed, sims, make_tenant, ledger):
    primary, fallback = sims("--fault", "cut"), sims()
    tenant = make_tenant()
    async with routed(big=[primary.url], small=[fallback.url]) as gw:
        async with gw.client.stream("POST", "/v1/chat/completions", headers=tenant.headers,
                                    json=ask(stream=True)) as resp:
            frames = await stream_text(resp)
        await gw.state.ledger.flush()
    assert resp.status_code == 200
    assert frames[-1]["error"]["code"] == "upstream_stream_cut" or frames[-1]["error"]["code"] == \
        "upstream_bad_response"
    assert any(f.get("choices") and f["choices"][0]["delta"].get("content") for f in frames[:-1])
    assert (calls(primary), calls(fallback)) == (1, 0)
    [row] = ledger("request_id LIKE %s", resp.headers["x-request-id"] + "%")
    assert row["status"] == 502
    assert row["model"] == "big"
    assert row["output_tokens"] > 0
    assert row["cost_usd"] > 0


async def test_a_flapping_replica_trips_on_its_error_rate(routed, sims, make_tenant):
    primary, fallback = sims("--fault", "flap"), sims()
    tenant = make_tenant()
    routing = {"breaker": {"consecutive_failures": 10, "error_rate": 0.5, "window": 4, "open_s": 60}}
    async with routed(big=[primary.url], small=[fallback.url], routing=routing) as gw:
        results = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                   for i in range(12)]
        state = gw.state.routing.health["big-0"].state
    assert all(r.status_code == 200 for r in results)
    models = [r.headers["x-tollway-model"] for r in results]
    # failure (answered by small), success, failure, success, failure: the last four outcomes are half
    # failures and the fifth was one, so the breaker opens there; nothing more goes to the flapping replica
    assert models[:5] == ["small", "big", "small", "big", "small"]
    assert set(models[5:]) == {"small"}
    assert calls(primary) == 5
    assert state == "open"


async def test_a_saturated_vllm_queue_overflows_to_the_next_tier(routed, sims, make_tenant):
    primary = sims("--max-concurrency", "1", "--ttft-ms", "1500")
    fallback = sims()
    tenant = make_tenant()
    routing = {"saturation": {"poll_interval_s": 0.05, "max_waiting": 2, "stale_after_s": 5}}
    async with routed(big=[primary.url], small=[fallback.url], routing=routing, vllm_metrics=True) as gw:
        slow = [asyncio.create_task(gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                                   json=ask(f"slow {i}"))) for i in range(3)]
        deadline = time.monotonic() + 5
        while gw.state.routing.health["big-0"].waiting != 2 and time.monotonic() < deadline:  # noqa: ASYNC110 (a polled gauge)
            await asyncio.sleep(0.02)
        assert gw.state.routing.health["big-0"].saturated()
        quick = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask("now please"))
        await asyncio.gather(*slow)
    assert quick.status_code == 200
    assert quick.headers["x-tollway-model"] == "small"
    assert quick.headers["x-tollway-route"] == "requested;big:saturated;target=small"
    assert stats(primary)["requests"] == {"sim-large": 3}  # the quick one never queued behind the slow ones


async def test_an_invalid_request_is_not_retried_elsewhere(routed, sims, make_tenant):
    primary, fallback = sims("--fault", "reject"), sims()
    tenant = make_tenant()
    async with routed(big=[primary.url], small=[fallback.url]) as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask())
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "upstream_rejected_request"
    assert (calls(primary), calls(fallback)) == (1, 0)


async def test_degraded_answer_only_where_the_tenant_enables_it(routed, sims, make_tenant, admin, ledger):
    primary, fallback = sims("--fault", "error"), sims("--fault", "overloaded")
    plain, degraded = make_tenant(), make_tenant()
    async with routed(big=[primary.url], small=[fallback.url]) as gw:
        set_policy = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                         json={"tenant": degraded.name, "degraded_answers": True})
        assert set_policy.status_code == 200
        assert set_policy.json()["degraded_answers"] is True
        refused = await gw.client.post("/v1/chat/completions", headers=plain.headers, json=ask())
        answer = await gw.client.post("/v1/chat/completions", headers=degraded.headers, json=ask())
        async with gw.client.stream("POST", "/v1/chat/completions", headers=degraded.headers,
                                    json=ask(stream=True)) as streamed:
            frames = await stream_text(streamed)
        await gw.state.ledger.flush()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "upstream_unavailable"
    assert "x-tollway-degraded" not in refused.headers
    assert answer.status_code == 200
    assert answer.headers["x-tollway-degraded"] == "true"
    assert "degraded answer" in answer.json()["choices"][0]["message"]["content"]
    assert answer.headers["x-tollway-cost-usd"] == "0.0000000000"
    assert streamed.headers["x-tollway-degraded"] == "true"
    assert "degraded" in "".join(f["choices"][0]["delta"].get("content", "") for f in frames if f["choices"])
    [row] = ledger("request_id = %s", answer.headers["x-request-id"])
    assert (row["degraded"], row["status"], row["cost_usd"], row["model"]) == (True, 200, 0, "tollway-degraded")
    assert row["route_reason"] == "requested;degraded:upstream_unavailable"


async def test_replicas_share_load_and_a_system_prompt_keeps_its_replica(routed, sims, make_tenant):
    a, b, fallback = sims(), sims(), sims()
    tenant = make_tenant()
    async with routed(big=[a.url, b.url], small=[fallback.url]) as gw:
        gw.state.routing.health.rng = random.Random(7)  # the balancer's random choice, seeded
        await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                               for i in range(40)))
    assert calls(a) > 5
    assert calls(b) > 5
    assert calls(a) + calls(b) == 40

    c, d = sims(), sims()
    async with routed(big=[c.url, d.url], small=[fallback.url], routing={"prefix_affinity": True}) as gw:
        for system in ("You are a pirate.", "You are a lawyer.", "You are a poet."):
            before = (calls(c), calls(d))
            for i in range(4):
                resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]))
                assert resp.status_code == 200
            grew = (calls(c) - before[0], calls(d) - before[1])
            assert sorted(grew) == [0, 4], (system, grew)  # all four on one replica
