"""Changing a budget changes only what the change gives, over the API and from the CLI alike; a CLI flag is
never silently dropped; a command that finds no store says so instead of creating an empty one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, cwd=cwd, timeout=120)


async def test_the_api_changes_only_the_fields_a_body_gives(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        async def put(**body: Any) -> Any:
            return await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                                       json={"tenant": tenant.name, "window": "day", **body})

        first = await put(limit_usd="5", alerts=["0.5", "forecast"])
        assert first.status_code == 200, first.text
        tokens = (await put(limit_tokens=600)).json()
        assert Decimal(tokens["limit_usd"]) == 5  # kept: the body did not give it
        assert tokens["limit_tokens"] == 600
        assert tokens["alerts"] == first.json()["alerts"]
        cleared = (await put(limit_usd=None)).json()  # an explicit null clears
        assert cleared["limit_usd"] is None
        assert cleared["limit_tokens"] == 600
        last = await put(limit_tokens=None)  # nothing would be left: refused, nothing changes
        assert last.status_code == 400
        assert "delete it" in last.json()["error"]["message"]
        listed = (await gw.client.get(f"/v1/admin/budgets?tenant={tenant.name}", headers=admin.headers)).json()
        assert [(b["limit_usd"], b["limit_tokens"]) for b in listed["data"]] == [(None, 600)]


def test_the_cli_changes_only_what_its_flags_give_and_refuses_a_flag_given_twice(pg, make_tenant, tmp_path):
    tenant = make_tenant()
    env = {"TOLLWAY_DATABASE_URL": pg.url}
    base = ["budgets", "set", "--tenant", tenant.name, "--window", "day"]
    assert cli(*base, "--usd", "5", env=env, cwd=tmp_path).returncode == 0
    out = cli(*base, "--tokens", "600", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    budget = json.loads(out.stdout)
    assert (Decimal(budget["limit_usd"]), budget["limit_tokens"]) == (5, 600)  # --usd kept
    cleared = json.loads(cli(*base, "--usd", "none", env=env, cwd=tmp_path).stdout)
    assert (cleared["limit_usd"], cleared["limit_tokens"]) == (None, 600)
    twice = cli(*base, "--usd", "1", "--usd", "2", env=env, cwd=tmp_path)
    assert twice.returncode == 2
    assert "--usd was given twice" in twice.stderr
    shown = json.loads(cli("budgets", "show", "--tenant", tenant.name, env=env, cwd=tmp_path).stdout)
    [entry] = shown["budgets"]
    assert entry["limit_tokens"] == 600
    assert entry["use"][0]["tokens"] == 0  # its use in the current window, from the ledger
    gone = cli("budgets", "delete", "--tenant", tenant.name, "--id", str(entry["id"]), env=env, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(cli("budgets", "show", "--tenant", tenant.name, env=env, cwd=tmp_path).stdout)["budgets"] == []


def test_repeated_guard_flags_add_up(pg, make_tenant, tmp_path):
    tenant = make_tenant()
    env = {"TOLLWAY_DATABASE_URL": pg.url}
    out = cli("tenants", "guards", "--tenant", tenant.name, "--output", "pii=redact", "--output", "secrets=redact",
              env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["policy"]["output"] == {"pii": "redact", "secrets": "redact"}
    clash = cli("tenants", "guards", "--tenant", tenant.name, "--output", "pii=redact", "--output", "pii=block",
                env=env, cwd=tmp_path)
    assert clash.returncode == 2
    assert "two actions" in clash.stderr


def test_a_read_command_in_another_folder_finds_the_same_store_or_says_it_found_none(tmp_path):
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    env = {"HOME": str(home), "TOLLWAY_KEY_SECRET": os.environ["TOLLWAY_KEY_SECRET"]}
    out = cli("prompts", "list", "--tenant", "default", env=env, cwd=elsewhere)
    assert out.returncode == 2
    assert f"no Tollway database in {home}/.local/share/tollway" in out.stderr
    assert list(elsewhere.iterdir()) == []  # nothing created where it ran
    assert not (home / ".local").exists()  # nor where it looked


ASK = {"model": "sim-large", "messages": [{"role": "user", "content": "how much is left"}], "max_tokens": 16}


async def ask(gw: Any, tenant: Any, times: int = 1) -> None:
    for _ in range(times):
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
        assert resp.status_code == 200, resp.text


async def spent_so_far(gw: Any, tenant: Any, ledger: Any, asks: int) -> tuple[int, int]:
    """``asks`` requests answered and their rows written: the tokens they used, and one request's share."""
    await ask(gw, tenant, asks)
    await gw.state.ledger.flush()
    rows = ledger("tenant_id = %s", tenant.id)
    spent = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    return spent, spent // len(rows)


async def test_a_budget_set_mid_window_counts_what_the_window_already_spent(app_factory, make_tenant, pg, ledger,
                                                                            tmp_path):
    """Set from the CLI (no Redis access there): the gateway seeds the new budget's counter from the ledger
    when the change reaches it, so the next request is judged against the day's real spend."""
    import asyncio

    tenant = make_tenant()
    async with app_factory() as gw:
        spent, per_request = await spent_so_far(gw, tenant, ledger, 4)
        # room for one more request by tokens actually used, not for its worst case (prompt + max_tokens)
        out = await asyncio.to_thread(cli, "budgets", "set", "--tenant", tenant.name, "--window", "day", "--tokens",
                                      str(spent + per_request), env={"TOLLWAY_DATABASE_URL": pg.url}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        # the change channel's notification, and the seeding it starts: watch the budget's counter (no request
        # is spent while waiting), then ask
        from datetime import UTC, datetime

        from tollway.gateway.metering.quota import budget_counter
        from tollway.gateway.tenancy.policy import Budget

        made = json.loads(out.stdout)
        budget = Budget(made["id"], tenant.id, "tenant", "", "day", None, spent + per_request)
        key = budget_counter(budget, "", datetime.now(UTC)).key
        for _ in range(100):
            counted = await gw.state.redis.hget(key, "s_tok")
            if counted is not None and int(counted) >= spent:
                break
            await asyncio.sleep(0.1)
        refused = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
    assert refused.status_code == 429, refused.text  # a counter starting at zero would have admitted it
    assert refused.json()["error"]["code"] == "insufficient_quota"


async def test_a_budget_set_from_the_cli_is_seeded_before_the_command_returns(app_factory, make_tenant, pg, ledger,
                                                                              redis_url, tmp_path):
    """Where the CLI reaches Redis it raises the new budget's counter to the ledger itself, as the API does,
    instead of leaving it at zero until a gateway hears of the change (no gateway runs while it does here)."""
    import asyncio
    from datetime import UTC, datetime

    import redis

    from tollway.gateway.metering.quota import budget_counter
    from tollway.gateway.tenancy.policy import Budget

    tenant = make_tenant()
    async with app_factory() as gw:
        spent, _ = await spent_so_far(gw, tenant, ledger, 3)
    out = await asyncio.to_thread(cli, "budgets", "set", "--tenant", tenant.name, "--window", "day", "--tokens",
                                  str(10 * spent), env={"TOLLWAY_DATABASE_URL": pg.url,
                                                        "TOLLWAY_REDIS_URL": redis_url}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    key = budget_counter(Budget(made["id"], tenant.id, "tenant", "", "day", None, 10 * spent), "",
                         datetime.now(UTC)).key
    counted = redis.Redis.from_url(redis_url).hget(key, "s_tok")
    assert counted is not None and int(counted) == spent  # a counter at zero would admit spent's worth again
    assert made["seeded"] is True
    unseeded = await asyncio.to_thread(cli, "budgets", "set", "--tenant", tenant.name, "--window", "hour",
                                       "--tokens", "5", env={"TOLLWAY_DATABASE_URL": pg.url}, cwd=tmp_path)
    assert json.loads(unseeded.stdout)["seeded"] is False  # no Redis from here: the gateways seed it


async def test_a_budget_set_through_the_api_counts_the_window_s_spend_before_it_answers(app_factory, make_tenant,
                                                                                      admin, ledger):
    """Through the admin API the new budget's counter is seeded from the ledger before the answer: the
    request sent right after it (no wait for the change channel) is judged against the day's real spend."""
    tenant = make_tenant()
    async with app_factory() as gw:
        spent, per_request = await spent_so_far(gw, tenant, ledger, 4)
        await ask(gw, tenant, 2)  # two more, their rows still in this gateway's queue when the budget is set
        spent += 2 * per_request
        # room for one more request by tokens actually used, not for its worst case (prompt + max_tokens)
        made = await gw.client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": tenant.name, "window": "day", "limit_tokens": spent + per_request})
        assert made.status_code == 200, made.text
        refused = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
    assert refused.status_code == 429, refused.text  # a counter starting at zero would have admitted it
    assert refused.json()["error"]["code"] == "insufficient_quota"
