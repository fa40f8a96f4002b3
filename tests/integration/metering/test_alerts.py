"""Alerts against the real PostgreSQL and a real webhook receiver on loopback: raised once per key,
delivered signed, retried with backoff after a failure, listed by the admin API and the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from tollway.infra.alerts import Delivery, Webhook, raise_alert, sign, verify

SECRET = "s3cret"


async def serve_hook(hook: Any) -> tuple[web.AppRunner, str]:
    """``hook`` as a webhook endpoint on loopback: its runner and URL."""
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hook"


async def receiver(statuses: list[int]) -> tuple[web.AppRunner, str, list[tuple[bytes, str]]]:
    """A webhook endpoint answering ``statuses`` in turn (then 200), keeping what it got."""
    got: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((await request.read(), request.headers.get("x-tollway-signature", "")))
        return web.Response(status=statuses.pop(0) if statuses else 200)

    runner, url = await serve_hook(hook)
    return runner, url, got


async def test_an_alert_is_raised_once_delivered_signed_and_retried(pg, make_tenant):
    tenant = make_tenant()
    runner, url, got = await receiver([503])
    async with AsyncConnectionPool(pg.url, open=False) as pool, aiohttp.ClientSession() as session:
        async with pool.connection() as conn:
            first = await raise_alert(conn, tenant_id=tenant.id, kind="budget", subject="7",
                                      dedupe_key=f"budget:{tenant.id}:80:2026-11", message="80% of the budget used",
                                      evidence={"used_usd": "8.00", "limit_usd": "10.00"})
            again = await raise_alert(conn, tenant_id=tenant.id, kind="budget", subject="7",
                                      dedupe_key=f"budget:{tenant.id}:80:2026-11", message="80% again")
            # the sweep delivers every pending alert: alerts other tests raised are not this test's to send
            await conn.execute("UPDATE alerts SET delivered_at = now() WHERE delivered_at IS NULL AND id <> %s",
                               (first,))
        delivery = Delivery(pool, session, Webhook(url, SECRET))
        assert await delivery.sweep() == 0  # the receiver answered 503: retried later, not now
        assert await delivery.sweep() == 0
        await asyncio.sleep(1.1)  # the first backoff is one second
        assert await delivery.sweep() == 1
        assert await delivery.sweep() == 0  # delivered once
    await runner.cleanup()
    assert first is not None
    assert again is None
    assert len(got) == 2
    body, signature = got[-1]
    assert verify(SECRET, body, signature)
    assert not verify("other", body, signature)
    assert not verify(SECRET, body, sign(SECRET, body, at=1))  # a replayed old signature
    payload = json.loads(body)
    assert (payload["kind"], payload["message"], payload["evidence"]["limit_usd"]) == \
        ("budget", "80% of the budget used", "10.00")
    with psycopg.connect(pg.url) as conn:
        attempts, error, delivered = conn.execute("SELECT attempts, last_error, delivered_at FROM alerts"
                                                  " WHERE id = %s", (first,)).fetchone()
    assert attempts == 2
    assert error is None
    assert delivered is not None


async def test_a_slow_receiver_holds_no_pooled_connection_and_no_replica_sends_twice(pg, make_tenant):
    """A receiver that takes its time (up to the webhook's timeout, for each of a sweep's alerts) must not hold
    a connection of the pool the requests use, nor open a window in which another replica sends the same alert."""
    tenant = make_tenant()
    arrived, release = asyncio.Event(), asyncio.Event()
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        arrived.set()
        await release.wait()
        return web.Response(status=200)

    runner, url = await serve_hook(hook)
    async with AsyncConnectionPool(pg.url, min_size=2, max_size=2, open=False) as pool, \
            aiohttp.ClientSession() as session:
        async with pool.connection() as conn:
            await conn.execute("UPDATE alerts SET delivered_at = now() WHERE delivered_at IS NULL")
            alert = await raise_alert(conn, tenant_id=tenant.id, kind="budget", subject="7",
                                      dedupe_key=f"budget:{tenant.id}:slow", message="slow receiver")
        one, other = (Delivery(pool, session, Webhook(url, SECRET, timeout_s=10)) for _ in range(2))
        first = asyncio.create_task(one.sweep())
        await asyncio.wait_for(arrived.wait(), 5)
        stats = pool.get_stats()
        checked_out = stats["pool_size"] - stats["pool_available"]
        assert await other.sweep() == 0  # the alert is claimed: the other replica leaves it
        release.set()
        assert await first == 1
    await runner.cleanup()
    assert checked_out == 0
    assert len(got) == 1
    with psycopg.connect(pg.url) as conn:
        attempts, delivered = conn.execute("SELECT attempts, delivered_at FROM alerts WHERE id = %s",
                                           (alert,)).fetchone()
    assert attempts == 1
    assert delivered is not None


async def test_alerts_are_listed_by_the_admin_api_and_the_cli(app_factory, make_tenant, admin, pg):
    tenant = make_tenant()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("INSERT INTO alerts (tenant_id, kind, subject, dedupe_key, message) VALUES"
                     " (%s, 'drift', 'route sim-large', %s, 'pass rate fell')", (tenant.id, f"drift:{tenant.id}"))
    async with app_factory() as gw:
        listed = await gw.client.get("/v1/admin/alerts", headers=admin.headers, params={"tenant": tenant.name})
        refused = await gw.client.get("/v1/admin/alerts", headers=tenant.headers)
    [alert] = listed.json()["data"]
    assert (alert["kind"], alert["message"], alert["delivered_at"]) == ("drift", "pass rate fell", None)
    assert refused.status_code == 403
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tollway.cli", "alerts", "list", "--tenant",
                                                   tenant.name, "--json"], capture_output=True, text=True,
                                  env={"TOLLWAY_DATABASE_URL": pg.url, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [a["message"] for a in json.loads(out.stdout)] == ["pass rate fell"]




async def test_budget_alerts_fire_once_per_threshold_and_window(app_factory, make_tenant, admin, pg):
    from datetime import UTC, datetime

    from tollway.gateway.metering.budget_alerts import check_budgets

    tenant = make_tenant()
    body = {"model": "sim-large", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    async with app_factory(budget_alerts="") as gw:  # the periodic check off: this test drives it
        budget = (await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": tenant.name, "window": "day", "limit_tokens": 500})).json()
        pool = gw.state.pool

        sent = 0

        async def spend(requests: int) -> int:
            nonlocal sent
            for _ in range(requests):
                sent += 1  # each one different: the same body 20 times in 10 s is a retry storm
                ask = {**body, "messages": [{"role": "user", "content": f"hello there {sent}"}]}
                resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ask)
                assert resp.status_code == 200, resp.text
            await gw.state.ledger.flush()
            with psycopg.connect(pg.url) as conn:
                return int(conn.execute("SELECT sum(input_tokens + output_tokens) FROM ledger WHERE tenant_id = %s",
                                        (tenant.id,)).fetchone()[0])

        def raised() -> int:  # this tenant's alerts so far (check_budgets checks every tenant's budgets)
            with psycopg.connect(pg.url) as conn:
                return int(conn.execute("SELECT count(*) FROM alerts WHERE tenant_id = %s",
                                        (tenant.id,)).fetchone()[0])

        async def check(forecast: bool = False, at: datetime | None = None) -> int:
            before = raised()
            await check_budgets(pool, ((0.8, 1.0), forecast), now=at or now)
            return raised() - before

        now = datetime.now(UTC)
        used = await spend(10)
        assert used < 400  # under 80%
        first = await check()
        while used < 400:
            used = await spend(1)
        second = await check()
        third = await check()
        late = await check(True, now.replace(hour=23, minute=0))
        forecast = await check(True, now.replace(hour=12, minute=0))
    with psycopg.connect(pg.url) as conn:
        alerts = dict(conn.execute("SELECT dedupe_key, message FROM alerts WHERE tenant_id = %s ORDER BY id",
                                   (tenant.id,)).fetchall())
    day = f"{now:%Y%m%d}T0000"  # the window's label: its start
    key = f"budget:{budget['id']}::0.8:{day}"
    assert (first, second, third) == (0, 1, 0)  # once per threshold and window
    assert f"is at {used / 500:.0%} of its limit ({used} tokens of 500 tokens)" in alerts[key]
    # over 80% used: at 23:00 the day's rate carried to midnight stays under the limit; at noon it passes it
    assert late == 0
    assert forecast == 1
    assert f"budget:{budget['id']}::forecast:{day}" in alerts
