"""Caps on requests in flight at once, per tenant and per key: counted in Redis by the admission script across
every gateway, given back as each request settles or its lease runs out, never counted as spent."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from support.config import write_config

from tollway.errors import RateLimited
from tollway.gateway.metering.quota import Demand, QuotaService
from tollway.gateway.metering.quota.local import LocalCounters
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import TenantPolicy, TenantRules
from tollway.keyspace import parallel_key


def _running(sim: Any) -> int:
    with urllib.request.urlopen(sim.url.removesuffix("/v1") + "/sim/stats", timeout=5) as resp:
        return int(json.loads(resp.read())["running"])


async def _upstream_holds(sim: Any, n: int) -> None:
    async with asyncio.timeout(30):
        while await asyncio.to_thread(_running, sim) < n:  # noqa: ASYNC110 (a polled gauge of another process)
            await asyncio.sleep(0.01)


def chat(client: httpx.AsyncClient, headers: dict[str, str], i: Any, *, stream: bool = False) -> Any:
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": "sim-large", "messages": [{"role": "user", "content": f"question {i}"}],
                             "max_tokens": 16, "stream": stream})


async def test_a_tenants_cap_refuses_what_is_over_it_and_nobody_else(app_factory, make_tenant, admin, start_sim,
                                                                    tmp_path, ledger):
    slow = start_sim("--ttft-ms", "800")
    tenant, other = make_tenant(), make_tenant()
    async with app_factory(config=write_config(tmp_path / "slow.yaml", slow.url), policy_cache_ttl_s=0) as gw:
        set_cap = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                      json={"tenant": tenant.name, "max_parallel_requests": 2})
        assert set_cap.status_code == 200, set_cap.text
        assert set_cap.json()["max_parallel_requests"] == 2
        held = [asyncio.create_task(chat(gw.client, tenant.headers, i, stream=i == 1)) for i in range(2)]
        await _upstream_holds(slow, 2)
        requests_before = slow.metric('tollway_sim_requests_total{model="sim-large"}')
        refused = await chat(gw.client, tenant.headers, "third")
        streamed_refusal = await chat(gw.client, tenant.headers, "fourth", stream=True)
        neighbour = await chat(gw.client, other.headers, "another tenant")  # not counted against the cap
        upstream_saw = slow.metric('tollway_sim_requests_total{model="sim-large"}') - requests_before
        done = await asyncio.gather(*held)
        await gw.state.quota.drain()  # their settlements have landed: the cap is free again
        again = await asyncio.gather(*(chat(gw.client, tenant.headers, f"again {i}") for i in range(2)))
        lifted = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                     json={"tenant": tenant.name, "max_parallel_requests": None})
        assert lifted.status_code == 200 and lifted.json()["max_parallel_requests"] is None
        uncapped = await asyncio.gather(*(chat(gw.client, tenant.headers, f"free {i}") for i in range(4)))
        await gw.state.ledger.flush()
    assert [r.status_code for r in done] == [200, 200]
    for resp in (refused, streamed_refusal):
        assert resp.status_code == 429
        error = resp.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "parallel_requests_exceeded")
        assert "limit 2, in flight 2" in error["message"]
        assert resp.headers["retry-after"] == "1"
    assert upstream_saw == 1  # the other tenant's request only
    assert neighbour.status_code == 200
    assert "x-ratelimit-limit-requests" not in done[0].headers  # a cap is not a rate: OpenAI's headers stay off
    assert [r.status_code for r in again] == [200, 200]
    assert [r.status_code for r in uncapped] == [200] * 4
    [row] = ledger("request_id = %s", refused.headers["x-request-id"])
    assert (row["status"], row["error_code"], row["cost_usd"]) == (429, "parallel_requests_exceeded", 0)


async def test_the_gateways_default_cap_holds_a_tenant_without_its_own_and_a_policy_overrides_it(
        app_factory, make_tenant, admin, start_sim, tmp_path):
    """TOLLWAY_DEFAULT_MAX_PARALLEL_REQUESTS caps every tenant whose policy sets none; a tenant's own cap, higher
    or lower, replaces it; clearing the tenant's cap returns it to the default."""
    slow = start_sim("--ttft-ms", "800")
    tenant, other = make_tenant(), make_tenant()
    async with app_factory(config=write_config(tmp_path / "slow.yaml", slow.url), policy_cache_ttl_s=0,
                           default_max_parallel_requests=1) as gw:
        shown = await gw.client.get("/v1/admin/policies", headers=admin.headers, params={"tenant": tenant.name})
        held = [asyncio.create_task(chat(gw.client, t.headers, t.name)) for t in (tenant, other)]
        await _upstream_holds(slow, 2)  # one each: the default is per tenant, not the gateway's whole
        refused = await chat(gw.client, tenant.headers, "second at once")
        first = await asyncio.gather(*held)
        await gw.state.quota.drain()
        raised = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                     json={"tenant": tenant.name, "max_parallel_requests": 3})
        assert raised.status_code == 200, raised.text
        assert raised.json()["effective"] == {"max_parallel_requests": 3}
        three = await asyncio.gather(*(chat(gw.client, tenant.headers, f"three {i}") for i in range(3)))
        await gw.state.quota.drain()
        cleared = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                      json={"tenant": tenant.name, "max_parallel_requests": None})
        assert cleared.status_code == 200 and cleared.json()["max_parallel_requests"] is None
        assert cleared.json()["effective"] == {"max_parallel_requests": 1}
        back = await asyncio.gather(*(chat(gw.client, tenant.headers, f"back {i}") for i in range(2)))
    assert shown.status_code == 200, shown.text  # what holds the tenant, and where it comes from
    assert (shown.json()["max_parallel_requests"], shown.json()["effective"]) == (None, {"max_parallel_requests": 1})
    assert [r.status_code for r in first] == [200, 200]
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "parallel_requests_exceeded")
    assert "limit 1, in flight 1" in refused.json()["error"]["message"]
    assert [r.status_code for r in three] == [200] * 3
    assert sorted(r.status_code for r in back) == [200, 429]


async def test_a_keys_cap_holds_across_gateways_and_leaves_the_tenants_other_keys_alone(
        app_factory, make_tenant, make_key, admin, start_sim, tmp_path):
    slow = start_sim("--ttft-ms", "800")
    tenant = make_tenant()
    second_key = {"Authorization": f"Bearer {make_key(tenant.name)}"}
    config = write_config(tmp_path / "slow.yaml", slow.url)
    async with app_factory(config=config) as one, app_factory(config=config) as two:
        limits = await one.client.put(f"/v1/admin/keys/{tenant.key_id}/limits", headers=admin.headers,
                                      json={"max_parallel_requests": 2})
        assert limits.json() == {"key_id": tenant.key_id, "rpm": None, "tpm": None, "max_parallel_requests": 2}
        listed = await one.client.get("/v1/admin/keys", headers=admin.headers, params={"tenant": tenant.name})
        assert [k["max_parallel_requests"] for k in listed.json()["data"] if k["id"] == tenant.key_id] == [2]
        two.state.keys._cache.clear()  # the other gateway reads the key again (its cache lives seconds)
        held = [asyncio.create_task(chat(gw.client, tenant.headers, i)) for i, gw in enumerate((one, two))]
        await _upstream_holds(slow, 2)
        refused = [await chat(gw.client, tenant.headers, "over") for gw in (one, two)]
        other_key = await chat(one.client, second_key, "the tenant's other key")
        done = await asyncio.gather(*held)
        await one.state.quota.drain()
        await two.state.quota.drain()
        after = await chat(two.client, tenant.headers, "after")
    assert [r.status_code for r in done] == [200, 200]
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(429, "parallel_requests_exceeded")] * 2
    assert "this key" in refused[0].json()["error"]["message"]
    assert other_key.status_code == 200
    assert after.status_code == 200


async def test_a_dead_gateways_requests_leave_the_cap_when_their_leases_run_out(redis_url):
    """A gateway that dies cannot settle: its holds on the cap go back when their leases run out (the next
    admission or the sweeper finds them), and a cap's hold is never counted as spent."""
    client = aioredis.from_url(redis_url)
    quota = QuotaService(client, lease_s=0.5, fail_open_share=0.5)
    tenant_id = 930_000 + int(time.time()) % 10_000
    principal = Principal(key_id=5, tenant_id=tenant_id, tenant="capped", role="app", allowed_models=None)
    rules = TenantRules(TenantPolicy(tenant_id, retry_storm_limit=0, max_parallel_requests=1), ())

    async def admit(rid: str) -> Any:
        return await quota.admit(principal, rules, rid=rid, end_user=None, session=None, fingerprint=rid,
                                 demand=Demand(usd_nano=0, tokens=10))

    dead = await admit("dead")
    assert dead.reservation._renewal is not None
    dead.reservation._renewal.cancel()  # as if its gateway died: never renewed, never settled
    with pytest.raises(RateLimited, match="limit 1, in flight 1"):
        await admit("while it lives")
    await asyncio.sleep(0.6)
    alive = await admit("after its lease")
    key = parallel_key(tenant_id, "tenant")
    assert await client.hget(key, "r") == b"0:0:1"  # only the new request holds it
    await alive.reservation.settle(Decimal(0), 10)
    assert await client.hget(key, "r") == b"0:0:0"
    assert await client.hget(key, "s_req") is None  # held, never spent
    assert await client.ttl(key) == -1  # no window: it lives as long as the cap is used
    await client.aclose()


def test_without_redis_a_cap_is_a_share_of_it_in_each_process_held_until_settled():
    from tollway.gateway.metering.quota.counters import Counter

    cap = Counter(parallel_key(1, "tenant"), (-1, -1, 10), 0, None, rate_scope="tenant", parallel=True)
    local = LocalCounters(share=0.3)
    demand = Demand(0, 0)
    assert [local.admit([cap], demand) for _ in range(4)] == [None, None, None, cap]  # 3 of 10 here
    local.release([cap])
    assert local.admit([cap], demand) is None
    assert local.admit([cap], demand) is cap
    tiny = Counter(parallel_key(1, "key:2"), (-1, -1, 1), 0, None, rate_scope="key", parallel=True)
    assert [local.admit([tiny], demand) for _ in range(2)] == [None, tiny]  # never less than one



async def test_without_redis_a_rate_limit_or_a_cap_out_of_local_headroom_is_a_429():
    """Failing open, a rate limit or a cap that runs out of its local share refuses with a 429 that names it
    (a rate limit once failed an assertion meant for budgets there: a 500)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    quota = QuotaService(client, lease_s=30, fail_open_share=0.5, script_channel=False)
    rated = Principal(key_id=8, tenant_id=8, tenant="open", role="app", allowed_models=None, rpm=4)
    capped = Principal(key_id=8, tenant_id=8, tenant="open", role="app", allowed_models=None, max_parallel_requests=4)
    policy = TenantPolicy(8, redis_failure="open", retry_storm_limit=0)
    for principal, what, code, admitted in ((rated, "key's rate limit", "rate_limit_exceeded", 1),
                                            (capped, "key's cap on requests in flight", "parallel_requests_exceeded", 2)):
        outcomes = []
        for i in range(3):
            try:
                await quota.admit(principal, TenantRules(policy, ()), rid=f"r{i}", end_user=None, session=None,
                                  fingerprint=f"r{i}", demand=Demand(0, 10))
            except RateLimited as exc:
                outcomes.append((exc.code, what in str(exc)))
            else:
                outcomes.append(("admitted", True))
        # rpm 4, nothing seen yet: half assumed used, half of the rest here; a cap of 4: half of it here
        assert outcomes == [("admitted", True)] * admitted + [(code, True)] * (3 - admitted)
    await client.aclose()


async def test_a_key_limit_under_one_is_a_400_not_a_database_error(pg, make_tenant):
    import psycopg

    from tollway.errors import InvalidRequest
    from tollway.gateway.tenancy.policy import set_key_limits

    tenant = make_tenant()
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        with pytest.raises(InvalidRequest, match="max_parallel_requests"):
            await set_key_limits(conn, tenant.key_id, rpm=None, tpm=None, max_parallel_requests=0)
        assert (await set_key_limits(conn, tenant.key_id, rpm=None, tpm=None, max_parallel_requests=3)
                )["max_parallel_requests"] == 3
