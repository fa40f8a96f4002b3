"""Cost reports for finance: totals equal the ledger, CSV opens in a spreadsheet, tenants stay apart."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg


async def traffic(gw: Any, tenant: Any) -> None:
    plan = [("sim-large", "alice", "search,beta"), ("sim-large", "bob", "search"), ("sim-small", "alice", None),
            ("sim-small", None, "chat"), ("no-such-model", "bob", None)]
    for i, (model, user, tags) in enumerate(plan):
        headers = {**tenant.headers, **({"x-tollway-user": user} if user else {}),
                   **({"x-tollway-tags": tags} if tags else {})}
        await gw.client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": f"report line {i}"}], "max_tokens": 3 + i})
    await gw.state.ledger.flush()


def ledger_totals(pg_url: str, tenant_id: int) -> tuple[Decimal, int, int]:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT sum(cost_usd), sum(input_tokens), count(*) FROM ledger WHERE tenant_id = %s",
                           (tenant_id,)).fetchone()
    assert row is not None
    return Decimal(row[0]), int(row[1]), int(row[2])


async def test_report_totals_equal_the_ledger(app_factory, make_tenant, pg, admin):
    tenant = make_tenant()
    finance = make_tenant(role="finance")
    async with app_factory() as gw:
        await traffic(gw, tenant)
        reports = {}
        for group in ("day", "model", "key", "user", "tag"):
            resp = await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                       params={"group_by": group, "tenant": tenant.name})
            assert resp.status_code == 200, resp.text
            reports[group] = resp.json()
        other = await gw.client.get("/v1/reports/costs", headers=finance.headers, params={"tenant": tenant.name})
        own = await gw.client.get("/v1/reports/costs", headers=finance.headers)
        by_tenant = await gw.client.get("/v1/reports/costs", headers=finance.headers, params={"group_by": "tenant"})
        app_key = await gw.client.get("/v1/reports/costs", headers=tenant.headers)
    spend, input_tokens, requests = ledger_totals(pg.url, tenant.id)
    for group, report in reports.items():
        totals = report["totals"]
        assert Decimal(totals["spend_usd"]) == spend, group
        assert (totals["input_tokens"], totals["requests"]) == (input_tokens, requests)
        if group != "tag":  # a row with two tags counts in both tag groups
            assert sum(Decimal(g["spend_usd"]) for g in report["groups"]) == spend
    models = {g["group"]: g for g in reports["model"]["groups"]}
    assert set(models) == {"sim-large", "sim-small", "(none)"}  # the refused request named no known model
    assert reports["day"]["groups"][0]["group"] == date.today().isoformat()
    assert {g["group"] for g in reports["tag"]["groups"]} == {"search", "beta", "chat", "(none)"}
    assert {g["group"] for g in reports["user"]["groups"]} == {"alice", "bob", "(none)"}
    errors = sum(g["errors"] for g in reports["model"]["groups"])
    assert errors == 1
    assert other.status_code == 403
    assert by_tenant.status_code == 403
    assert app_key.status_code == 403
    assert own.status_code == 200 and own.json()["totals"]["requests"] == 0  # the finance tenant spent nothing


async def test_rows_written_while_a_report_is_read_are_in_its_groups_and_totals_or_in_neither(
        app_factory, make_tenant, admin, monkeypatch):
    from tollway.gateway.metering import reports

    tenant = make_tenant()
    async with app_factory() as gw:
        await traffic(gw, tenant)
        read_totals = reports.totals

        async def totals_after_another_request(conn: Any, q: Any) -> dict[str, Any]:
            # a request ends and its ledger row is written between the report's groups and its totals
            await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
                "model": "sim-small", "messages": [{"role": "user", "content": "meanwhile"}], "max_tokens": 4})
            await gw.state.ledger.flush()
            return await read_totals(conn, q)

        monkeypatch.setattr(reports, "totals", totals_after_another_request)
        first = (await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                     params={"group_by": "model", "tenant": tenant.name})).json()
        second = (await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                      params={"group_by": "model", "tenant": tenant.name})).json()
    for report in (first, second):
        assert sum(Decimal(g["spend_usd"]) for g in report["groups"]) == Decimal(report["totals"]["spend_usd"])
        assert sum(g["requests"] for g in report["groups"]) == report["totals"]["requests"]
    assert second["totals"]["requests"] == first["totals"]["requests"] + 1  # the row written meanwhile


async def test_admin_groups_by_tenant_and_budget_use_is_reported(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                            json={"tenant": tenant.name, "scope": "user", "subject": "*", "window": "month",
                                  "limit_usd": "0.5"})
        await traffic(gw, tenant)
        by_tenant = (await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                         params={"group_by": "tenant"})).json()
        by_user = (await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                       params={"group_by": "user", "tenant": tenant.name})).json()
    assert tenant.name in {g["group"] for g in by_tenant["groups"]}
    alice = next(g for g in by_user["groups"] if g["group"] == "alice")
    [use] = alice["budgets"]
    assert (use["window"], use["limit_usd"]) == ("month", "0.5000000000")
    assert Decimal(use["used_usd"]) == Decimal(alice["spend_usd"])
    assert use["used_pct"] == float(round(Decimal(alice["spend_usd"]) / Decimal("0.5") * 100, 2))


async def test_csv_has_a_header_and_iso_dates(app_factory, make_tenant, pg, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        await traffic(gw, tenant)
        resp = await gw.client.get("/v1/reports/costs", headers=admin.headers, params={
            "group_by": "day", "format": "csv", "tenant": tenant.name, "from": "2026-01-01"})
        bad = [await gw.client.get("/v1/reports/costs", headers=admin.headers, params=p) for p in (
            {"group_by": "planet"}, {"from": "yesterday"}, {"format": "xlsx"}, {"from": "2026-02-01", "to": "2026-01-01"})]
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in resp.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert list(rows[0]) == ["group_by", "group", "from", "to", "spend_usd", "input_tokens", "output_tokens",
                             "cached_tokens", "requests", "errors", "cache_hits", "cache_saved_usd",
                             "failed_attempts", "shadow_usd", "guard_blocked", "guard_fallbacks", "guard_redacted",
                                 "top_tier_usd", "routing_saved_usd"]
    assert rows[0]["group"] == date.today().isoformat()
    assert rows[0]["from"].startswith("2026-01-01T00:00:00")
    assert rows[-1]["group"] == "TOTAL"
    assert Decimal(rows[-1]["spend_usd"]) == ledger_totals(pg.url, tenant.id)[0]
    assert [b.status_code for b in bad] == [400, 400, 400, 400]
    assert [b.json()["error"]["param"] for b in bad] == ["group_by", "from", "format", "from"]


async def test_the_cli_prints_the_same_report_as_the_api(app_factory, make_tenant, admin, pg):
    import asyncio
    import json
    import subprocess
    import sys

    tenant = make_tenant()
    async with app_factory() as gw:
        await traffic(gw, tenant)
        api = (await gw.client.get("/v1/reports/costs", headers=admin.headers,
                                   params={"tenant": tenant.name, "group_by": "model"})).json()

    def cli(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tollway.cli", "reports", "costs", "--tenant", tenant.name,
                              "--group-by", "model", *extra], capture_output=True, text=True, timeout=60,
                             env={"TOLLWAY_DATABASE_URL": pg.url, "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    as_json = json.loads(await asyncio.to_thread(cli, "--format", "json"))
    assert as_json["totals"] == api["totals"]
    assert as_json["groups"] == api["groups"]
    table = await asyncio.to_thread(cli)
    total_line = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert api["totals"]["spend_usd"] in total_line
    assert "sim-large" in table
    assert (await asyncio.to_thread(cli, "--format", "csv")).splitlines()[-1].split(",")[1] == "TOTAL"


async def test_daily_rollup_and_ledger_give_the_same_report_for_every_group(app_factory, make_tenant, pg, admin):
    """Whole UTC days are read from the rollup the ledger's trigger keeps; a window that is not is summed
    from the ledger itself: both give the same numbers, and the routing savings price served answers at
    the top tier."""
    tenant = make_tenant()
    async with app_factory() as gw:
        await traffic(gw, tenant)
        today = date.today().isoformat()
        for group in ("day", "model", "tier", "key", "user", "tag", "prompt", "route", "role"):
            by_day = await gw.client.get("/v1/reports/costs", headers=admin.headers, params={
                "group_by": group, "tenant": tenant.name, "from": today, "to": today})
            by_time = await gw.client.get("/v1/reports/costs", headers=admin.headers, params={
                "group_by": group, "tenant": tenant.name, "from": f"{today}T00:00:00.000001Z",
                "to": f"{today}T23:59:59.999999Z"})
            assert by_day.status_code == by_time.status_code == 200, by_day.text
            a, b = by_day.json(), by_time.json()
            for g in (*a["groups"], *b["groups"]):
                g.pop("budgets", None)
            assert a["groups"] == b["groups"] and a["totals"] == b["totals"], group
    spend, _, _ = ledger_totals(pg.url, tenant.id)
    assert Decimal(a["totals"]["spend_usd"]) == spend
    assert {g["group"] for g in a["groups"]} == {"answer"}  # the last group: by ledger role
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute("SELECT model, input_tokens, output_tokens, cost_usd, baseline_usd FROM ledger"
                            " WHERE tenant_id = %s AND role = 'answer' AND status < 400", (tenant.id,)).fetchall()
    large_in, large_out = (Decimal(p) / 1_000_000 for p in (3, 15))  # sim-large is the top tier in the tests
    for _model, tin, tout, _cost, baseline in rows:
        assert baseline == tin * large_in + tout * large_out
    saved = sum(b - c for _, _, _, c, b in rows)
    assert Decimal(a["totals"]["routing_saved_usd"]) == saved


async def test_a_window_of_part_days_adds_the_rollup_of_its_whole_days_to_the_ledger_of_its_ends(
        app_factory, make_tenant, pg, admin):
    """Three days of seeded rows; a window from the first day's 06:30 to the last day's 02:15 is read as
    one whole day from the rollup and two part days from the ledger: every number equals the ledger's."""
    from support.ledger import seed

    tenant = make_tenant()
    seed(pg.url, tenant, days=3, rows=300)
    today = datetime.now(UTC).date()
    start = datetime.combine(today - timedelta(days=2), time(6, 30), UTC)
    end = datetime.combine(today, time(2, 15), UTC)
    async with app_factory() as gw:
        resp = await gw.client.get("/v1/reports/costs", headers=admin.headers, params={
            "group_by": "model", "tenant": tenant.name, "from": start.isoformat(), "to": end.isoformat()})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute(
            "SELECT model, sum(cost_usd) FILTER (WHERE role <> 'shadow'), count(*) FILTER (WHERE role = 'answer'),"
            " sum(input_tokens) FILTER (WHERE role <> 'shadow') FROM ledger WHERE tenant_id = %s"
            " AND created_at >= %s AND created_at < %s GROUP BY model", (tenant.id, start, end)).fetchall()
    assert rows  # the window holds rows from all three days' parts
    expected = {m: (Decimal(spend), int(n), int(tokens)) for m, spend, n, tokens in rows}
    got = {g["group"]: (Decimal(g["spend_usd"]), g["requests"], g["input_tokens"]) for g in report["groups"]}
    assert got == expected
    assert Decimal(report["totals"]["spend_usd"]) == sum(s for s, _, _ in expected.values())


async def test_the_endpoint_rollup_is_backfilled_from_the_ledger(app_factory, make_tenant, pg, admin):
    """Migration 0017 rolls the ledger up by endpoint: written by the ledger's own trigger from then on, and
    for the rows before it by the same rollup over the ledger (``ledger_rollup_sql(source, dims)``); both
    equal a count straight from the ledger."""
    tenant = make_tenant()
    async with app_factory() as gw:
        await traffic(gw, tenant)
        await gw.client.post("/v1/completions", headers=tenant.headers,
                             json={"model": "sim-small", "prompt": "legacy", "max_tokens": 2})
        await gw.state.ledger.flush()
    query = ("SELECT value, sum(requests), sum(output_tokens), sum(spend_usd) FROM ledger_daily"
             " WHERE tenant_id = %s AND dim = 'endpoint' GROUP BY value ORDER BY value")
    truth = ("SELECT endpoint, count(*) FILTER (WHERE role = 'answer'), sum(output_tokens), sum(cost_usd)"
             " FROM ledger WHERE tenant_id = %s GROUP BY endpoint ORDER BY endpoint")
    with psycopg.connect(pg.url, autocommit=True) as conn:
        expected = conn.execute(truth, (tenant.id,)).fetchall()
        by_trigger = conn.execute(query, (tenant.id,)).fetchall()
        with conn.transaction():  # as the migration backfilled: this tenant's rows, that dimension only
            conn.execute("DELETE FROM ledger_daily WHERE tenant_id = %s AND dim = 'endpoint'", (tenant.id,))
            conn.execute("CREATE TEMP TABLE before_0017 ON COMMIT DROP AS SELECT * FROM ledger WHERE tenant_id = %s",
                         (tenant.id,))
            [sql] = conn.execute("SELECT ledger_rollup_sql('before_0017', ARRAY['endpoint'])").fetchone()
            conn.execute(sql)
            others = conn.execute("SELECT count(*) FROM ledger_daily WHERE tenant_id = %s AND dim <> 'endpoint'"
                                  " AND requests > 0", (tenant.id,)).fetchone()
        backfilled = conn.execute(query, (tenant.id,)).fetchall()
    assert {row[0] for row in expected} == {"chat.completions", "completions"}
    assert by_trigger == backfilled == expected
    assert others[0] > 0  # the other dimensions were left as they were (not doubled: compared in the tests above)
