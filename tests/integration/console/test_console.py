"""The console against the real embedded PostgreSQL with seeded ledger rows: the numbers equal the ledger and
the API, tenants stay apart whatever the URL says, sign-in takes finance and admin keys only, sessions end;
per-budget alert thresholds; /metrics in Prometheus format, behind an admin key on the main port."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from support.ledger import ledger_spend, seed

from tollway.local.embedded import free_port


async def sign_in(client: Any, key: str) -> Any:
    return await client.post("/console/login", data={"key": key}, follow_redirects=False)


def money(value: str | Decimal) -> str:
    return f"${Decimal(value):,.6f}"


async def test_costs_page_equals_the_ledger_and_the_api_and_downloads_what_it_shows(app_factory, make_tenant, pg):
    tenant = make_tenant(role="finance")
    seed(pg.url, tenant)
    today = datetime.now(UTC).date()
    start = today - timedelta(days=2)
    period = {"from": start.isoformat(), "to": today.isoformat()}
    async with app_factory() as gw:
        login = await sign_in(gw.client, tenant.key)
        assert login.status_code == 303
        assert login.headers["location"] == "/console/costs"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert "max-age=" in cookie
        assert "path=/console" in cookie
        page = await gw.client.get("/console/costs", params=period)
        assert page.status_code == 200, page.text
        as_json = (await gw.client.get("/console/costs.json", params=period)).json()
        as_csv = (await gw.client.get("/console/costs.csv", params=period)).text
        api = {g: (await gw.client.get("/v1/reports/costs", headers=tenant.headers,
                                       params={**period, "group_by": g})).json()
               for g in ("model", "route", "role", "user", "tag", "prompt")}
        instants = {"from": f"{start.isoformat()}T07:00:00+01:00", "to": f"{today.isoformat()}T12:30:00Z"}
        timed = {"console": (await gw.client.get("/console/costs.json", params=instants)).json(),
                 "page": (await gw.client.get("/console/costs", params=instants)).text,
                 "api": (await gw.client.get("/v1/reports/costs", headers=tenant.headers,
                                             params={**instants, "group_by": "model"})).json()}
        api_csvs = {g: (await gw.client.get("/v1/reports/costs", headers=tenant.headers,
                                            params={**period, "group_by": g, "format": "csv"})).text
                    for g in ("model", "route", "role")}
    spend = ledger_spend(pg.url, tenant.id, start, today)
    assert Decimal(as_json["totals"]["spend_usd"]) == spend == Decimal(api["model"]["totals"]["spend_usd"])
    html = page.text
    assert re.search(r'id="total-spend">\s*' + re.escape(money(spend)), html)
    assert money(api["model"]["totals"]["routing_saved_usd"]) in html
    sections = {s["group"]: s["rows"] for s in as_json["sections"]}
    for group in ("model", "route", "role", "user", "tag", "prompt"):
        assert {r["group"]: r["spend_usd"] for r in sections[group]} == \
               {g["group"]: g["spend_usd"] for g in api[group]["groups"]}, group
    assert {r["group"] for r in sections["route"]} <= {"requested", "auto-large", "auto-small", "cache-hit",
                                                       "fallback", "attempt", "shadow"}
    assert "auto-large" in {r["group"] for r in sections["route"]}  # sim-large is the top tier
    for row in sections["model"]:
        assert money(row["spend_usd"]) in html
    # the CSV holds exactly the tables on the page, each in the cost report's one CSV shape: the same
    # columns and rows as the API's CSV for that grouping, TOTAL row included
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    api_csv = {g: list(csv.DictReader(io.StringIO(text))) for g, text in api_csvs.items()}
    assert list(rows[0]) == list(api_csv["model"][0])  # one set of columns
    for group, expected in sections.items():
        got = [r for r in rows if r["group_by"] == group]
        assert [(r["group"], Decimal(r["spend_usd"])) for r in got] == \
               [*((r["group"], Decimal(r["spend_usd"])) for r in expected), ("TOTAL", spend)], group
        if group in api_csv:  # the same rows (the page orders them by spend)
            assert sorted(got, key=lambda r: r["group"]) == sorted(api_csv[group], key=lambda r: r["group"]), group
    # a period of date-times (UTC, the API's), from the console's form as from the API
    assert Decimal(timed["console"]["totals"]["spend_usd"]) == Decimal(timed["api"]["totals"]["spend_usd"])
    assert timed["console"]["totals"]["requests"] == timed["api"]["totals"]["requests"] > 0
    assert timed["console"]["from"] == f"{start.isoformat()}T06:00:00"  # shown as UTC, to the second
    assert 'type="datetime-local"' in timed["page"]
    daily = [r for r in rows if r["group_by"] == "day_by_model"]
    assert sum(Decimal(r["spend_usd"]) for r in daily) == spend
    assert len({r["group"].split()[0] for r in daily}) == 3


async def test_finance_sees_its_own_tenant_only_and_app_keys_cannot_sign_in(app_factory, make_tenant, pg):
    a, b = make_tenant(role="finance"), make_tenant(role="finance")
    app = make_tenant()
    seed(pg.url, b, rows=20)
    async with app_factory() as gw:
        refused = await sign_in(gw.client, app.key)
        wrong = await sign_in(gw.client, "tw-not-a-key")
        empty = await sign_in(gw.client, "")
        assert refused.status_code == 403
        assert "set-cookie" not in refused.headers
        assert "finance and admin keys" in refused.text
        assert wrong.status_code == 401
        assert empty.status_code == 401
        assert (await gw.client.get("/console/costs", follow_redirects=False)).status_code == 303
        await sign_in(gw.client, a.key)
        for path in (f"/console/costs?tenant={b.name}", f"/console/costs.csv?tenant={b.name}",
                     f"/console/costs.json?tenant={b.name}", f"/console/budgets?tenant={b.name}"):
            resp = await gw.client.get(path)
            assert resp.status_code == 403, path
            assert "own tenant" in resp.text
            assert b.name not in resp.text
        for path in ("/console/operations", "/console/audit", "/console/keys"):
            assert (await gw.client.get(path)).status_code == 403, path
        own = (await gw.client.get("/console/costs.json")).json()
        assert own["tenant"] == a.name
        assert own["totals"]["requests"] == 0
        bad = await gw.client.get("/console/costs", params={"from": "yesterday"})
        assert bad.status_code == 400
        assert "must be a date" in bad.text


async def test_forged_expired_and_signed_out_sessions_are_refused(app_factory, make_tenant, pg):
    finance = make_tenant(role="finance")
    async with app_factory() as gw:
        gw.client.cookies.set("tollway_console", "forged-token", domain="tollway", path="/console")
        forged = await gw.client.get("/console/costs", follow_redirects=False)
        assert forged.status_code == 303
        assert forged.headers["location"] == "/console/login"
        gw.client.cookies.clear()
        await sign_in(gw.client, finance.key)
        assert (await gw.client.get("/console/budgets")).status_code == 200
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second' WHERE key_id = %s",
                         (finance.key_id,))
        expired = await gw.client.get("/console/budgets", follow_redirects=False)
        assert expired.status_code == 303
        gw.client.cookies.clear()
        await sign_in(gw.client, finance.key)
        assert (await gw.client.get("/console/costs")).status_code == 200
        await gw.client.post("/console/logout")
        with psycopg.connect(pg.url) as conn:
            live = conn.execute("SELECT count(*) FROM console_sessions WHERE key_id = %s AND expires_at > now()",
                                (finance.key_id,)).fetchone()
        assert live == (0,)


async def test_admin_revokes_a_key_in_the_console_and_the_audit_page_shows_it(app_factory, make_tenant, admin, pg):
    victim = make_tenant()
    async with app_factory() as gw:
        await sign_in(gw.client, admin.key)
        limits = await gw.client.put(f"/v1/admin/keys/{victim.key_id}/limits", headers=admin.headers,
                                     json={"rpm": 60, "max_parallel_requests": 2})
        assert limits.status_code == 200
        keys = await gw.client.get("/console/keys", params={"tenant": victim.name})
        assert keys.status_code == 200
        assert f"Revoke key {victim.key_id}" in keys.text
        assert "60 requests/min, 2 at once" in keys.text
        assert victim.key not in keys.text
        no_token = await gw.client.post(f"/console/keys/{victim.key_id}/revoke", data={})
        assert no_token.status_code == 403
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', keys.text)
        assert csrf is not None
        done = await gw.client.post(f"/console/keys/{victim.key_id}/revoke", data={"csrf": csrf.group(1)},
                                    follow_redirects=False)
        assert done.status_code == 303
        chat = await gw.client.post("/v1/chat/completions", headers=victim.headers, json={
            "model": "sim-small", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 401
        audit = await gw.client.get("/console/audit", params={"tenant": victim.name})
        assert audit.status_code == 200
        assert f"key {victim.key_id}: revoke" in audit.text
        assert "revoked in the console" in audit.text
        ops = await gw.client.get("/console/operations")
        assert ops.status_code == 200
        assert "table-replicas" in ops.text
        assert "sim" in ops.text
        budgets = await gw.client.get("/console/budgets")
        assert budgets.status_code == 200


async def test_per_budget_alert_thresholds_fire_once_per_window(app_factory, make_tenant, admin, pg):
    from psycopg_pool import AsyncConnectionPool

    from tollway.gateway.metering.budget_alerts import check_budgets

    tenant = make_tenant()
    async with app_factory() as gw:
        bad = await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": tenant.name, "window": "day", "limit_usd": "1", "alerts": ["0.5", "banana"]})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "alerts"
        put = await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": tenant.name, "window": "day", "limit_usd": "1", "alerts": ["50%", "0.9"]})
        assert put.status_code == 200
        assert put.json()["alerts"] == ["0.5", "0.9"]
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("INSERT INTO ledger (request_id, created_at, tenant_id, key_id, endpoint, cost_usd, latency_ms,"
                     " status) VALUES (%s, now(), %s, %s, 'chat.completions', 0.85, 1, 200)",
                     (f"spend-{tenant.name}", tenant.id, tenant.key_id))
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True)
        first = await check_budgets(pool, ((0.8, 1.0), True))
        again = await check_budgets(pool, ((0.8, 1.0), True))
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute("SELECT evidence->>'threshold', evidence->>'forecast_share' FROM alerts"
                            " WHERE tenant_id = %s ORDER BY id", (tenant.id,)).fetchall()
    thresholds = sorted(r[0] for r in rows if r[0] is not None)
    assert thresholds == ["0.5"]  # the budget's own thresholds, not the gateway's 0.8; 0.9 not reached
    assert all(r[1] is None for r in rows)  # the budget set no forecast alert
    assert first >= 1
    assert again == 0


async def test_metrics_are_prometheus_text_behind_an_admin_key_and_open_on_the_metrics_port(
        app_factory, make_tenant, admin):
    tenant = make_tenant()
    port = free_port()
    async with app_factory(metrics_port=port, metrics_budget_interval_s=0.2) as gw:
        await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                            json={"tenant": tenant.name, "window": "month", "limit_usd": "10"})
        for model in ("sim-small", "sim-large", "sim-error"):
            await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
                "model": model, "messages": [{"role": "user", "content": "metrics"}], "max_tokens": 4})
        await gw.state.ledger.flush()
        for _ in range(100):  # budget use is re-read every metrics_budget_interval_s (up to 10 s under load)
            resp = await gw.client.get("/metrics", headers=admin.headers)
            if any(s.labels.get("tenant") == tenant.name for f in text_string_to_metric_families(resp.text)
                   if f.name == "tollway_budget_use_ratio" for s in f.samples):
                break
            await asyncio.sleep(0.1)
        anonymous = await gw.client.get("/metrics")
        app_key = await gw.client.get("/metrics", headers=tenant.headers)
        assert anonymous.status_code == 401
        assert app_key.status_code == 403
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        async with httpx.AsyncClient() as plain:  # the metrics port: no key
            open_port = await plain.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert open_port.status_code == 200
        assert "tollway_requests_total" in open_port.text
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    for name in ("tollway_requests", "tollway_tokens", "tollway_cost_usd", "tollway_request_duration_seconds",
                 "tollway_upstream_breaker_state", "tollway_upstream_in_flight", "tollway_guard_outcomes",
                 "tollway_ledger_queue_depth", "tollway_ledger_spill_bytes", "tollway_ledger_rejected_bytes",
                 "tollway_budget_use_ratio",
                 "tollway_failed_attempts", "tollway_upstream_latency_seconds"):
        assert name in families, name
    mine = [s for s in families["tollway_requests"].samples if s.labels.get("tenant") == tenant.name]
    assert sum(s.value for s in mine if s.name == "tollway_requests_total") == 3
    assert {(s.labels["model"], s.labels["status"]) for s in mine if s.value} >= {("sim-small", "200"),
                                                                                ("sim-large", "200")}
    assert any(s.labels.get("tenant") == tenant.name for s in families["tollway_budget_use_ratio"].samples)
    for family in families.values():  # no per-request or per-user labels
        for sample in family.samples:
            assert not {"request_id", "user", "key", "tag"} & set(sample.labels)


async def test_a_budget_draws_a_burn_down_for_each_of_its_limits(app_factory, make_tenant, admin, pg):
    """Dollars and tokens: one chart each, in its own unit, beside a token-only budget's."""
    tenant = make_tenant()
    seed(pg.url, tenant, days=1, rows=40)
    async with app_factory() as gw:
        for body in ({"window": "day", "limit_usd": "5", "limit_tokens": 90_000},
                     {"scope": "user", "subject": "u1", "window": "month", "limit_tokens": 50_000}):
            put = await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={"tenant": tenant.name, **body})
            assert put.status_code == 200, put.text
        assert (await sign_in(gw.client, admin.key)).status_code == 303
        page = (await gw.client.get("/console/budgets", params={"tenant": tenant.name})).text
    figures = re.findall(r"<figure.*?</figure>", page, re.S)
    assert len(figures) == 3  # day: dollars and tokens; month, one user: tokens
    assert sum("limit: $5.000000" in f for f in figures) == 1
    assert sum("limit: 90,000 tokens" in f for f in figures) == 1
    assert sum("limit: 50,000 tokens" in f for f in figures) == 1
    assert all("<polyline" in f for f in figures)
