"""Budgets when things break: a gateway killed mid-request, Redis stopped mid-traffic, windows rolling
over, counters that drifted from the ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from support.config import write_config

from tollway.gateway.metering.quota import Demand, QuotaService, budget_counter
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import Budget, TenantPolicy, TenantRules
from tollway.local.embedded import EmbeddedRedis

MSG = "how much does this cost"



def body(i: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-large", "messages": [{"role": "user", "content": f"{MSG} {i}"}], "max_tokens": 16,
            **extra}


def admin_put(url: str, admin: Any, path: str, payload: dict[str, Any]) -> None:
    resp = httpx.put(url.removesuffix("/v1") + path, headers=admin.headers, json=payload, timeout=10)
    assert resp.status_code == 200, resp.text


def test_a_sigkilled_gateways_reservations_are_spent_and_written_to_the_ledger(
        serve, start_sim, pg, redis_url, make_tenant, admin, ledger, tmp_path):
    """A gateway killed mid-request cannot settle: its leases run out, what they reserved is counted as spent
    (the upstream may have billed it) and the survivor's sweeper writes each one as an unsettled ledger row,
    so the budget, the ledger and the reports agree."""
    slow = start_sim("--tokens-per-s", "4", "--completion-tokens", "200")
    config = write_config(tmp_path / "slow.yaml", slow.url)
    env = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "0",
           "TOLLWAY_LEASE_S": "3", "TOLLWAY_POLICY_CACHE_TTL_S": "0", "TOLLWAY_SWEEP_INTERVAL_S": "0.5"}
    first = serve("--config", str(config), env=env)
    second = serve("--config", str(config), env=env)
    tenant = make_tenant()
    # Room for three worst cases, not four: 28 reserved output tokens each at $15/M plus a short prompt,
    # and for a stream the prompt of each of the two fallback attempts it might make.
    admin_put(first.url, admin, "/v1/admin/budgets", {"tenant": tenant.name, "window": "day", "limit_usd": "0.0022"})
    streams = []
    for i in range(3):
        client = httpx.Client(timeout=30)
        response = client.send(client.build_request("POST", first.url + "/chat/completions", headers=tenant.headers,
                                                    json=body(i, stream=True)), stream=True)
        assert response.status_code == 200
        streams.append((client, response))
    refused = httpx.post(first.url + "/chat/completions", headers=tenant.headers, json=body("x"), timeout=10)
    assert refused.status_code == 429, "three reservations must fill the budget"
    os.kill(first.process.pid, signal.SIGKILL)  # no shutdown, no settlement, no ledger rows
    first.process.wait()
    killed_at = time.monotonic()
    for client, response in streams:
        response.close()
        client.close()

    # Leases are renewed every lease/3 (1 s) while their gateway lives: the dead one's run out 2-3 s after the
    # kill, each on its own renewal's clock; the next sweep (every 0.5 s) writes their rows.
    while len(rows := ledger("tenant_id = %s AND error_code = 'unsettled'", tenant.id)) < 3:
        assert time.monotonic() < killed_at + 3 + 10, f"{len(rows)} of 3 unsettled rows written"
        time.sleep(0.25)
    time.sleep(1)  # and no row written twice
    rows = ledger("tenant_id = %s AND error_code = 'unsettled'", tenant.id)
    assert len(rows) == 3
    assert all(r["usage_source"] == "reserved" and r["status"] == 502 and r["cost_usd"] > 0 for r in rows)
    assert all(r["endpoint"] == "chat.completions" and r["model"] == "sim-large" for r in rows)
    assert sum(r["cost_usd"] for r in rows) <= Decimal("0.0022")
    still = httpx.post(second.url + "/chat/completions", headers=tenant.headers, json=body("after"), timeout=30)
    assert still.status_code == 429, "what the dead gateway reserved stays spent"
    reconciled = httpx.post(second.url.removesuffix("/v1") + "/v1/admin/reconcile", headers=admin.headers,
                            json={"tenant": tenant.name}, timeout=30)
    assert reconciled.json()["drifts"] == [], "Redis and the ledger agree"


async def test_an_expired_lease_is_spent_once_and_swept_once(redis_url, pg, make_tenant, tmp_path):
    from psycopg_pool import AsyncConnectionPool

    from tollway.gateway.metering.ledger import Ledger, LedgerRow
    from tollway.gateway.metering.sweeper import Sweeper

    tenant = make_tenant()
    client = aioredis.from_url(redis_url)
    quota = QuotaService(client, lease_s=0.5, fail_open_share=0.5)
    principal = Principal(key_id=tenant.key_id, tenant_id=tenant.id, tenant=tenant.name, role="app",
                          allowed_models=None)
    budget = Budget(id=tenant.id, tenant_id=tenant.id, scope="tenant", subject="", period="day",
                    limit_usd=Decimal("0.000002"), limit_tokens=None)
    rules = TenantRules(TenantPolicy(tenant.id, retry_storm_limit=0), (budget,))
    demand = Demand(usd_nano=1000, tokens=7)

    def row(rid: str) -> LedgerRow:
        return LedgerRow(request_id=rid, created_at=datetime.now(UTC), tenant_id=tenant.id, key_id=tenant.key_id,
                         endpoint="chat.completions", model="sim-large")

    async def admit(rid: str, r: LedgerRow | None = None, d: Demand = demand) -> Any:
        return await quota.admit(principal, rules, rid=rid, end_user=None, session=None, fingerprint=rid,
                                 demand=d, row=r or row(rid))

    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2) as pool:
        store = Ledger(pool, tmp_path / "spill", queue_size=100, batch_size=10, flush_interval_s=0.05,
                       retry_interval_s=1)
        sweeper = Sweeper(pool, client, store, interval_s=1, grace_s=0)
        dead = await admit("dead")
        dead.reservation._renewal.cancel()  # as if its gateway died: never renewed, never settled
        lost_row = row("lost")
        lost = await admit("lost", lost_row)
        await lost.reservation.settle(Decimal("0.0000004"), 5)  # settled; its row dies with its gateway
        await asyncio.sleep(0.6)
        with pytest.raises(Exception, match="day budget"):  # the dead reservation counts as spent
            await admit("next")
        counter = budget_counter(budget, "", datetime.now(UTC))
        assert int(await client.hget(counter.key, "s_usd")) == 1000 + 400
        await dead.reservation.settle(Decimal("0.0000001"), 1)  # a late settlement adds nothing
        assert int(await client.hget(counter.key, "s_usd")) == 1400

        # Other gateways of this test session sweep too (every tenant, every interval): whichever sweeps
        # first, the ledger ends the same, and a second sweep adds nothing.
        await sweeper.run(force=True)

        async def rows() -> list[tuple[Any, ...]]:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT request_id, cost_usd, status, error_code, usage_source,"
                                         " output_tokens FROM ledger WHERE tenant_id = %s ORDER BY request_id",
                                         (tenant.id,))
                return [tuple(r) for r in await cur.fetchall()]

        swept = [("dead", Decimal("0.000001"), 502, "unsettled", "reserved", 7),
                 ("lost", Decimal("0.0000004"), 200, None, "recovered", 5)]
        assert await rows() == swept
        report = await sweeper.run(force=True)
        assert (report.unsettled, report.recovered) == (0, 0)  # swept once
        assert await rows() == swept

        await store.start()  # a live gateway: its row reaches the ledger and the request leaves Redis
        kept = row("kept")
        held = await admit("kept", kept, Demand(usd_nano=100, tokens=1))
        await held.reservation.settle(Decimal(0), 0)
        quota.ack([kept])
        await quota.drain()
        report = await sweeper.run(force=True)  # the grace is 0 here: an unacknowledged one would be swept
        assert (report.unsettled, report.recovered) == (0, 0)
        assert await rows() == swept
        await store.stop()
    await client.aclose()


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_redis_stopped_mid_traffic_follows_each_tenants_policy(app_factory, own_redis, make_tenant, admin,
                                                                     ledger, sim):
    closed, fail_open = make_tenant(), make_tenant()
    per_request_limit = Decimal("0.01")
    async with app_factory(redis_url=own_redis.url) as gw:
        for tenant in (closed, fail_open):
            r = await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                                    json={"tenant": tenant.name, "window": "day", "limit_usd": str(per_request_limit)})
            assert r.status_code == 200
        r = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                json={"tenant": fail_open.name, "redis_failure": "open"})
        assert r.status_code == 200
        for i in range(3):
            for tenant in (closed, fail_open):
                assert (await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body(i))).status_code == 200
        await asyncio.to_thread(own_redis.stop)
        before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
        refused = await gw.client.post("/v1/chat/completions", headers=closed.headers, json=body("down"))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "quota_unavailable"
        assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before  # nothing sent upstream
        open_results = [await gw.client.post("/v1/chat/completions", headers=fail_open.headers, json=body(f"o{i}"))
                        for i in range(60)]
        await gw.state.ledger.flush()
    statuses = [r.status_code for r in open_results]
    assert statuses[0] == 200 and 429 in statuses  # served on local counters, then stopped: never unlimited
    assert all(r.headers.get("x-tollway-budget-mode") == "local" for r in open_results if r.status_code == 200)
    spent = sum(r["cost_usd"] for r in ledger("tenant_id = %s", fail_open.id))
    assert spent <= per_request_limit
    closed_rows = ledger("tenant_id = %s AND status = 503", closed.id)
    assert [(r["error_code"], r["cost_usd"]) for r in closed_rows] == [("quota_unavailable", 0)]


def solo_tenant(base: int, name: str, period: str, limit_usd: str) -> tuple[Principal, Budget, TenantRules]:
    """A tenant of its own (ids from ``base``, varied per run) with one USD budget and no storm breaker."""
    tenant_id = base + int(time.time()) % 10_000
    principal = Principal(key_id=1, tenant_id=tenant_id, tenant=name, role="app", allowed_models=None)
    budget = Budget(id=tenant_id, tenant_id=tenant_id, scope="tenant", subject="", period=period,
                    limit_usd=Decimal(limit_usd), limit_tokens=None)
    return principal, budget, TenantRules(TenantPolicy(tenant_id, retry_storm_limit=0), (budget,))


async def test_minute_window_rolls_over(redis_url):
    client = aioredis.from_url(redis_url)
    now = [datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC)]
    quota = QuotaService(client, lease_s=30, fail_open_share=0.5, clock=lambda: now[0])
    principal, budget, rules = solo_tenant(900_000, "roll", "minute", "0.000002")

    async def admit(rid: str) -> Any:
        return await quota.admit(principal, rules, rid=rid, end_user=None, session=None, fingerprint=rid,
                                 demand=Demand(usd_nano=1500, tokens=10))

    first = await admit("a")
    await first.reservation.settle(Decimal("0.0000015"), 10)
    now[0] = datetime(2026, 11, 22, 10, 0, 59, 900000, tzinfo=UTC)
    with pytest.raises(Exception) as refused:
        await admit("b")
    assert "minute budget" in str(refused.value)
    assert refused.value.headers["retry-after"] == "1"
    now[0] = datetime(2026, 11, 22, 10, 1, 0, tzinfo=UTC)
    second = await admit("c")  # a new minute, a new allowance
    await second.reservation.settle(Decimal("0.000001"), 10)
    old = budget_counter(budget, "", datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC))
    new = budget_counter(budget, "", now[0])
    assert int(await client.hget(old.key, "s_usd")) == 1500
    assert int(await client.hget(new.key, "s_usd")) == 1000
    assert 0 < await client.ttl(new.key) <= 60 + 3600
    await client.aclose()


async def test_reconciliation_raises_counters_that_fell_behind_the_ledger(app_factory, make_tenant, admin, redis_url):
    tenant = make_tenant()
    async with app_factory() as gw:
        r = await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                                json={"tenant": tenant.name, "window": "month", "limit_usd": "5"})
        budget_id = r.json()["id"]
        for i in range(3):
            assert (await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body(i))).status_code == 200
        client = aioredis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(f"tw:{{t:{tenant.id}}}:b:{budget_id}:*")]
        settled = {k: await client.hget(k, "s_usd") for k in keys if await client.type(k) == b"hash"}
        counter_key, value = next((k, v) for k, v in settled.items() if v is not None)
        await client.delete(counter_key)  # the settlements are lost (a Redis restart without persistence)
        resp = await gw.client.post("/v1/admin/reconcile", headers=admin.headers, json={"tenant": tenant.name})
        assert resp.status_code == 200
        report = resp.json()
        assert report["corrected"] == 1
        [drift] = report["drifts"]
        assert drift["redis_usd"] == "0"
        assert Decimal(drift["ledger_usd"]) == Decimal(int(value)) / 10**9
        assert await client.hget(counter_key, "s_usd") == value  # restored from the ledger
        again = await gw.client.post("/v1/admin/reconcile", headers=admin.headers, json={"tenant": tenant.name})
        assert again.json()["drifts"] == []
        await client.aclose()


async def test_settling_zero_amounts_releases_every_counter(redis_url):
    """A token-only budget and a rate limit reserve zero dollars; settling them must still work."""
    client = aioredis.from_url(redis_url)
    quota = QuotaService(client, lease_s=30, fail_open_share=0.5)
    tenant_id = 920_000 + int(time.time()) % 10_000
    principal = Principal(key_id=3, tenant_id=tenant_id, tenant="zero", role="app", allowed_models=None,
                          rpm=100, tpm=None)
    budget = Budget(id=tenant_id, tenant_id=tenant_id, scope="tenant", subject="", period="hour",
                    limit_usd=None, limit_tokens=10_000)
    rules = TenantRules(TenantPolicy(tenant_id, retry_storm_limit=0), (budget,))
    admission = await quota.admit(principal, rules, rid="z", end_user=None, session=None, fingerprint="z",
                                  demand=Demand(usd_nano=0, tokens=500))
    assert admission.headers["x-ratelimit-remaining-requests"] == "99"
    await admission.reservation.settle(Decimal(0), 120)
    for counter in admission.reservation.counters:
        assert await client.hget(counter.key, "r") == b"0:0:0"
    token_counter = admission.reservation.counters[0]
    assert int(await client.hget(token_counter.key, "s_tok")) == 120
    await client.aclose()
