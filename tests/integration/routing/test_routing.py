"""Routing against real scripted upstream processes: a primary that errors, times out before the first
byte, cuts streams, stalls, flaps, is dead or saturates its queue; who answered, how many attempts each
upstream got (an open breaker gets none beyond its probes), deadlines, and the ledger rows."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

BIG_PRICE = {"input_per_mtok": "3", "output_per_mtok": "15"}
SMALL_PRICE = {"input_per_mtok": "0.15", "output_per_mtok": "0.6"}



def stats(sim: Any) -> dict[str, Any]:
    with urllib.request.urlopen(sim.url.removesuffix("/v1") + "/sim/stats", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def calls(sim: Any) -> int:
    return int(stats(sim)["total"])


@pytest.fixture
def sims(start_sim: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Scripted upstreams for one test, stopped after it."""
    started: list[Any] = []

    def start(*args: str) -> Any:
        sim = start_sim(*args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.process.kill()  # a scripted hang would hold a graceful shutdown for its whole sleep
    for sim in started:
        sim.process.wait(10)


def routing_config(path: Path, *, big: list[str], small: list[str], routing: dict[str, Any] | None = None,
                   vllm_metrics: bool = False, extra_models: list[dict[str, Any]] | None = None,
                   extra_upstreams: list[dict[str, Any]] | None = None) -> Path:
    """'big' (tier large) on the `big` replicas, 'small' (tier small) on the `small` ones."""
    upstreams = [{"name": f"big-{i}", "base_url": url, "timeout_s": 30, "vllm_metrics": vllm_metrics}
                 for i, url in enumerate(big)]
    upstreams += [{"name": f"small-{i}", "base_url": url, "timeout_s": 30} for i, url in enumerate(small)]
    upstreams += extra_upstreams or []
    models = [
        {"name": "big", "upstreams": [u["name"] for u in upstreams if u["name"].startswith("big")],
         "upstream_model": "sim-large", "tier": "large", "price": BIG_PRICE, "capabilities": ["tools", "json_mode"]},
        {"name": "small", "upstreams": [u["name"] for u in upstreams if u["name"].startswith("small")],
         "upstream_model": "sim-small", "tier": "small", "price": SMALL_PRICE, "capabilities": ["json_mode"]},
        *(extra_models or []),
    ]
    config = {"upstreams": upstreams, "models": models,
              "routing": {"tiers": [{"name": "large", "deadline_s": 5, "ttft_deadline_s": 5},
                                    {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}],
                          **(routing or {})}}
    path.write_text(yaml.safe_dump(config))
    return path


def ask(content: str = "say something", **extra: Any) -> dict[str, Any]:
    return {"model": "big", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


async def stream_text(resp: Any) -> list[dict[str, Any]]:
    frames = []
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            frames.append(json.loads(line[6:]))
    return frames


@pytest.fixture
def gateway(app_factory: Any, tmp_path: Path) -> Callable[..., Any]:
    def make(metric_reader: Any = None, **kwargs: Any) -> Any:
        return app_factory(config=routing_config(tmp_path / "routing.yaml", **kwargs), metric_reader=metric_reader)
    return make


def counted(reader: Any, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
    """A metric's data points (counter or gauge) from an in-memory metric reader, by attribute set."""
    out: dict[tuple[tuple[str, Any], ...], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        out[tuple(sorted(point.attributes.items()))] = point.value
    return out


async def test_an_erroring_primary_falls_back_to_the_next_tier(gateway, sims, make_tenant, ledger):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    primary, fallback = sims("--fault", "error"), sims()
    tenant = make_tenant()
    reader = InMemoryMetricReader()
    async with gateway(big=[primary.url], small=[fallback.url], metric_reader=reader) as gw:
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


async def test_open_breaker_gets_no_requests_beyond_its_probes(gateway, sims, make_tenant, ledger):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    primary, fallback = sims("--fault", "error"), sims()
    tenant = make_tenant()
    routing = {"breaker": {"consecutive_failures": 2, "open_s": 1.0, "half_open_probes": 1}}
    reader = InMemoryMetricReader()
    async with gateway(big=[primary.url], small=[fallback.url], routing=routing, metric_reader=reader) as gw:
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


async def test_a_dead_single_replica_is_not_hammered(gateway, sims, make_tenant):
    fallback = sims()
    tenant = make_tenant()
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    routing = {"breaker": {"consecutive_failures": 3, "open_s": 60}}
    async with gateway(big=[dead], small=[fallback.url], routing=routing) as gw:
        results = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                   for i in range(8)]
        replica = gw.state.routing.health["big-0"]
        assert (replica.state, replica.calls, replica.refused_open) == ("open", 3, 0)
    assert [r.status_code for r in results] == [200] * 8
    assert calls(fallback) == 8


async def test_when_every_breaker_is_open_the_answer_is_a_fast_503(gateway, make_tenant, ledger):
    tenant = make_tenant()
    dead = "http://127.0.0.1:9/v1"
    routing = {"breaker": {"consecutive_failures": 1, "open_s": 60}}
    async with gateway(big=[dead], small=[dead], routing=routing) as gw:
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


async def test_timeout_before_the_first_byte_moves_on_at_the_tier_deadline(gateway, sims, make_tenant, ledger):
    primary, fallback = sims("--fault", "timeout"), sims()
    tenant = make_tenant()
    routing = {"tiers": [{"name": "large", "deadline_s": 0.5, "ttft_deadline_s": 0.4},
                         {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}]}
    async with gateway(big=[primary.url], small=[fallback.url], routing=routing) as gw:
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


async def test_a_stream_stalled_after_its_headers_falls_back_and_charges_the_prompt(gateway, sims, make_tenant,
                                                                                     ledger):
    primary, fallback = sims("--ttft-ms", "3000"), sims()
    tenant = make_tenant()
    routing = {"tiers": [{"name": "large", "deadline_s": 5, "ttft_deadline_s": 0.3},
                         {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}]}
    async with gateway(big=[primary.url], small=[fallback.url], routing=routing) as gw:
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


async def test_a_stream_cut_after_reaching_the_client_is_never_resent(gateway, sims, make_tenant, ledger):
    primary, fallback = sims("--fault", "cut"), sims()
    tenant = make_tenant()
    async with gateway(big=[primary.url], small=[fallback.url]) as gw:
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


async def test_a_flapping_replica_trips_on_its_error_rate(gateway, sims, make_tenant):
    primary, fallback = sims("--fault", "flap"), sims()
    tenant = make_tenant()
    routing = {"breaker": {"consecutive_failures": 10, "error_rate": 0.5, "window": 4, "open_s": 60}}
    async with gateway(big=[primary.url], small=[fallback.url], routing=routing) as gw:
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


async def test_a_saturated_vllm_queue_overflows_to_the_next_tier(gateway, sims, make_tenant):
    primary = sims("--max-concurrency", "1", "--ttft-ms", "1500")
    fallback = sims()
    tenant = make_tenant()
    routing = {"saturation": {"poll_interval_s": 0.05, "max_waiting": 2, "stale_after_s": 5}}
    async with gateway(big=[primary.url], small=[fallback.url], routing=routing, vllm_metrics=True) as gw:
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


async def test_an_invalid_request_is_not_retried_elsewhere(gateway, sims, make_tenant):
    primary, fallback = sims("--fault", "reject"), sims()
    tenant = make_tenant()
    async with gateway(big=[primary.url], small=[fallback.url]) as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask())
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "upstream_rejected_request"
    assert (calls(primary), calls(fallback)) == (1, 0)


async def test_degraded_answer_only_where_the_tenant_enables_it(gateway, sims, make_tenant, admin, ledger):
    primary, fallback = sims("--fault", "error"), sims("--fault", "overloaded")
    plain, degraded = make_tenant(), make_tenant()
    async with gateway(big=[primary.url], small=[fallback.url]) as gw:
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


async def test_replicas_share_load_and_a_system_prompt_keeps_its_replica(gateway, sims, make_tenant):
    a, b, fallback = sims(), sims(), sims()
    tenant = make_tenant()
    async with gateway(big=[a.url, b.url], small=[fallback.url]) as gw:
        gw.state.routing.health.rng = random.Random(7)  # the balancer's random choice, seeded
        await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(f"q{i}"))
                               for i in range(40)))
    assert calls(a) > 5
    assert calls(b) > 5
    assert calls(a) + calls(b) == 40

    c, d = sims(), sims()
    async with gateway(big=[c.url, d.url], small=[fallback.url], routing={"prefix_affinity": True}) as gw:
        for system in ("You are a pirate.", "You are a lawyer.", "You are a poet."):
            before = (calls(c), calls(d))
            for i in range(4):
                resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]))
                assert resp.status_code == 200
            grew = (calls(c) - before[0], calls(d) - before[1])
            assert sorted(grew) == [0, 4], (system, grew)  # all four on one replica


EASY = "What is the capital of France?"
HARD = ("Which country that borders the nation where the 2014 FIFA World Cup final was played has the "
        "largest population, and who is its current head of government?")


async def test_auto_routes_by_difficulty_and_the_tenant_threshold(gateway, sims, make_tenant, admin, ledger):
    big, small = sims(), sims()
    tenant, frugal = make_tenant(), make_tenant()
    async with gateway(big=[big.url], small=[small.url]) as gw:
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


async def test_auto_steps_down_near_budget_exhaustion(gateway, sims, make_tenant, admin):
    big, small = sims(), sims()
    tenant = make_tenant()
    async with gateway(big=[big.url], small=[small.url], routing={"budget_step_down_headroom": 0.5}) as gw:
        roomy = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD, model="auto"))
        # a budget this request's worst case (about $0.00042 on the large model) fills more than half of
        await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                            json={"tenant": tenant.name, "window": "day", "limit_usd": "0.0007"})
        tight = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask(HARD, model="auto"))
    assert roomy.headers["x-tollway-model"] == "big"
    assert tight.status_code == 200
    assert tight.headers["x-tollway-model"] == "small"
    assert tight.headers["x-tollway-route"].endswith(";budget_step_down")


async def test_auto_takes_a_cheaper_tier_when_the_budget_no_longer_holds_the_large_one(gateway, sims, make_tenant,
                                                                                       admin, ledger):
    big, small = sims(), sims()
    tenant = make_tenant()
    async with gateway(big=[big.url], small=[small.url]) as gw:
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


async def test_deterministic_requests_are_served_from_the_cache(gateway, sims, make_tenant, admin, ledger):
    big, small = sims(), sims()
    tenant, other = make_tenant(), make_tenant()
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    q = ask("cache me", temperature=0)
    async with gateway(big=[big.url], small=[small.url], metric_reader=reader) as gw:
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


async def test_a_cached_answer_from_a_model_the_policy_now_excludes_is_a_miss(gateway, sims, make_tenant, admin):
    big, small = sims(), sims()
    tenant = make_tenant()
    q = ask("what is the capital of France?", model="auto", temperature=0)
    async with gateway(big=[big.url], small=[small.url]) as gw:
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


async def test_a_finished_deterministic_stream_is_cached_too(gateway, sims, make_tenant):
    big, small = sims(), sims()
    tenant = make_tenant()
    q = ask("stream then cache", seed=7, stream=True)
    async with gateway(big=[big.url], small=[small.url]) as gw:
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


async def test_canary_by_end_user_and_shadow_samples(gateway, sims, make_tenant, admin, ledger, pg):
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
    async with gateway(big=[big.url], small=[small.url], routing=routing, extra_models=extra,
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
