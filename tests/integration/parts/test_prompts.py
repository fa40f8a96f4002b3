"""Git-versioned prompts against the real PostgreSQL, Redis and scripted upstream: submit, render in chat,
labels, splits, rollback, the gate, roles, concurrency, a second gateway following a label move, a broken
store, and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from support.pool import checked_out

from tollway.errors import ServiceUnavailable
from tollway.prompts import GateResult, Label

GREET = """model: sim-large
messages:
  - {role: system, content: "You greet {{ customer }} politely, in {{ language }}."}
variables:
  customer: {type: string}
  language: {type: string, default: English}
params: {temperature: 0.2, max_tokens: 16}
"""
GREET_V2 = GREET.replace("politely", "warmly")


async def push(gw: Any, who: Any, name: str, content: str, **extra: Any) -> Any:
    return await gw.client.post(f"/v1/prompts/{name}/versions", headers=who.headers,
                                json={"content": content, "message": extra.pop("message", "edit"), **extra})


async def label(gw: Any, who: Any, name: str, lab: str, version: str, **extra: Any) -> Any:
    return await gw.client.put(f"/v1/prompts/{name}/labels/{lab}", headers=who.headers,
                               json={"version": version, **extra})


def chat_body(**prompt: Any) -> dict[str, Any]:
    return {"model": "prompt", "messages": [{"role": "user", "content": "hi"}],
            "prompt": {"name": "greet", "variables": {"customer": "Ada"}, **prompt}}


async def test_submit_label_and_chat_carry_the_version(app_factory, make_tenant, ledger, sim):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET, message="first")).json()["version"]
        moved = await label(gw, eng, "greet", "production", v1)
        assert moved.status_code == 200
        assert moved.json()["gate"]["summary"].startswith("no golden set")
        resp = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=chat_body())
        models = (await gw.client.get("/v1/models", headers=eng.headers)).json()["data"]
        await gw.state.ledger.flush()
        dry = (await gw.client.post("/v1/prompts/greet/render", headers=eng.headers,
                                    json={"variables": {"customer": "Ada"}})).json()
    assert resp.status_code == 200, resp.text
    sent = orjson.loads(sim.get("/sim/last-request?model=sim-large"))
    assert sent["messages"] == [{"role": "system", "content": "You greet Ada politely, in English."},
                                {"role": "user", "content": "hi"}]
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 16)
    assert "prompt" not in sent
    assert resp.headers["x-tollway-prompt-version"] == f"greet@{v1}"
    assert resp.json()["tollway"]["prompt"] == {"name": "greet", "version": v1}
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert (row["prompt_name"], row["prompt_version"], row["model"]) == ("greet", v1, "sim-large")
    assert "prompt" in {m["id"] for m in models}
    large = next(m for m in dry["models"] if m["model"] == "sim-large")
    tokens = large["input_tokens"]
    assert dry["version"] == v1 and dry["requests_per_day_7d"] == round(1 / 7, 2)  # the one chat above
    assert Decimal(large["usd_per_request"]["at_max_tokens"]) == (tokens * 3 + 16 * 15) / Decimal(10**6)


async def test_variables_are_validated_and_name_the_variable(app_factory, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        await label(gw, eng, "greet", "production", v1)
        cases = [({}, "prompt.variables.customer"), ({"customer": 3}, "prompt.variables.customer"),
                 ({"customer": "A", "mood": "x"}, "prompt.variables.mood")]
        for variables, param in cases:
            body = chat_body()
            body["prompt"]["variables"] = variables
            resp = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=body)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


async def test_a_bad_submission_is_refused_and_changes_nothing(app_factory, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        await push(gw, eng, "greet", GREET)
        for bad, words in ((GREET.replace("{{ language }}", "{{ lang }}"), "undeclared variable 'lang'"),
                           ("messages: [oops", "not valid YAML"),
                           (GREET + "golden_set: missing.jsonl\n", "missing.jsonl is not in the repository")):
            resp = await push(gw, eng, "greet", bad)
            assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text
        versions = (await gw.client.get("/v1/prompts/greet/versions", headers=eng.headers)).json()["data"]
    assert len(versions) == 1


async def test_label_moves_are_audited_rollback_and_the_cache_follows_the_version(app_factory, make_tenant, admin):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        v2 = (await push(gw, eng, "greet", GREET_V2, parent=v1)).json()["version"]
        await label(gw, eng, "greet", "production", v1)
        deterministic = {**chat_body(), "temperature": 0}
        first = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=deterministic)
        await label(gw, eng, "greet", "production", v2, reason="warmer")
        second = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=deterministic)
        back = await gw.client.post("/v1/prompts/greet/labels/production/rollback", headers=eng.headers, json={})
        third = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=deterministic)
        audit = (await gw.client.get(f"/v1/admin/changes?tenant={eng.name}", headers=admin.headers)).json()["data"]
        diff = (await gw.client.get(f"/v1/prompts/greet/diff?from={v1}&to={v2}", headers=eng.headers)).json()
    assert first.headers["x-tollway-prompt-version"] == f"greet@{v1}"
    assert second.headers["x-tollway-prompt-version"] == f"greet@{v2}"
    assert "x-tollway-cache" not in second.headers  # a label move never serves the old answer
    assert back.json()["version"] == v1 and third.headers["x-tollway-cache"] == "hit"  # v1's answer again
    moves = [c for c in audit if c["kind"] == "prompt_label"]
    assert [(m["before"] or {}).get("version") for m in moves] == [v2, v1, None]
    assert moves[1]["reason"] == "warmer"
    assert moves[1]["author"] == f"key:{eng.key_id}@{eng.name}"
    assert "-  - {role: system, content: \"You greet {{ customer }} politely" in diff["diff"]


async def test_a_split_is_stable_per_user(app_factory, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        v2 = (await push(gw, eng, "greet", GREET_V2)).json()["version"]
        resp = await label(gw, eng, "greet", "production", v1, split_version=v2, split_percent=50)
        assert resp.status_code == 200, resp.text
        seen: dict[str, set[str]] = {}
        for user in ("u1", "u2", "u3", "u4", "u5", "u6") * 2:
            r = await gw.client.post("/v1/chat/completions", headers=eng.headers, json={**chat_body(), "user": user})
            seen.setdefault(user, set()).add(r.headers["x-tollway-prompt-version"])
    assert all(len(v) == 1 for v in seen.values())  # each user always gets the same version


def test_split_share_within_two_points_over_ten_thousand_users() -> None:
    for percent in (5, 20, 50):
        split = Label("greet", "production", "a" * 40, "b" * 40, percent)
        share = sum(split.pick(f"user-{i}") == "b" * 40 for i in range(10_000)) / 100
        assert abs(share - percent) <= 2, (percent, share)
    # salted per prompt: another prompt's split picks other users
    a = {i for i in range(2000) if Label("a", "p", "x", "y", 50).pick(f"user-{i}") == "y"}
    b = {i for i in range(2000) if Label("b", "p", "x", "y", 50).pick(f"user-{i}") == "y"}
    assert 0.35 < len(a & b) / len(a) < 0.65


async def test_roles_and_tenants(app_factory, make_tenant, admin):
    eng, other, app = make_tenant(role="prompt_engineer"), make_tenant(role="prompt_engineer"), make_tenant()
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        await label(gw, eng, "greet", "production", v1)
        app_list = await gw.client.get("/v1/prompts", headers=app.headers)
        cross_read = await gw.client.get(f"/v1/prompts?tenant={eng.name}", headers=other.headers)
        cross_write = await push(gw, other, "greet", GREET_V2, tenant=eng.name)
        cross_chat = await gw.client.post("/v1/chat/completions", headers=other.headers, json=chat_body())
        admin_read = await gw.client.get(f"/v1/prompts?tenant={eng.name}", headers=admin.headers)
    assert app_list.status_code == 403
    assert cross_read.status_code == 403
    assert cross_write.status_code == 403
    assert cross_chat.status_code == 404  # another tenant's prompt does not exist for this one
    assert [p["name"] for p in admin_read.json()["data"]] == ["greet"]


class Refuse:
    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None,
                    actor: Any = None) -> GateResult:
        return GateResult(False, "pass rate 3/10 below 8/10", {"pass_rate": 0.3})


async def test_the_gate_guards_production_and_an_admin_override_is_recorded(app_factory, make_tenant, admin):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        gw.state.prompt_gate = Refuse()
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        staging = await label(gw, eng, "greet", "staging", v1)
        refused = await label(gw, eng, "greet", "production", v1)
        not_yours = await label(gw, eng, "greet", "production", v1, override=True)
        forced = await label(gw, admin, "greet", "production", v1, override=True, tenant=eng.name, reason="hotfix")
        audit = (await gw.client.get(f"/v1/admin/changes?tenant={eng.name}", headers=admin.headers)).json()["data"]
    assert staging.status_code == 200  # other labels need no gate
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "gate_failed"
    assert refused.json()["error"]["report"] == {"pass_rate": 0.3}
    assert not_yours.status_code == 400
    assert forced.status_code == 200
    assert audit[0]["after"]["gate"] == {"passed": False, "summary": "pass rate 3/10 below 8/10", "overridden": True}


async def test_a_diff_too_large_to_compute_here_is_refused_and_others_run_off_the_event_loop(app_factory,
                                                                                            make_tenant):
    """A line diff's work grows with the product of the two versions' lines: two 60,000-line prompts (a git push
    takes files up to 1 MB) took seconds of CPU on the event loop. Past 10,000 x 10,000 line pairs it is refused
    (413, fetch with git); below, it runs in a thread."""
    import random

    eng = make_tenant(role="prompt_engineer")

    def long(seed: int, n: int) -> str:
        words = random.Random(seed)
        body = "".join(f"      {' '.join(words.choice('abcdefghij') for _ in range(3))}\n" for _ in range(n))
        return f"model: sim-large\nmessages:\n  - role: system\n    content: |\n{body}"

    async with app_factory() as gw:
        pushed = [await push(gw, eng, "big", long(seed, 20_000)) for seed in (1, 2)]
        assert [r.status_code for r in pushed] == [201, 201], pushed[0].text[:300]
        big = [r.json()["version"] for r in pushed]
        small = [(await push(gw, eng, "small", long(seed, 2_000))).json()["version"] for seed in (1, 2)]
        refused = await gw.client.get(f"/v1/prompts/big/diff?from={big[0]}&to={big[1]}", headers=eng.headers)
        fine = await gw.client.get(f"/v1/prompts/small/diff?from={small[0]}&to={small[1]}", headers=eng.headers)
    assert refused.status_code == 413, refused.text
    assert "git" in refused.json()["error"]["message"]
    assert fine.status_code == 200, fine.text
    assert fine.json()["diff"].startswith("--- small@")


async def test_the_registry_holds_the_labelled_versions_and_reads_others_when_named(app_factory, make_tenant):
    """A tenant's history is not held whole in every gateway (thousands of pushed versions would grow each
    one's memory): a registry holds the text of the versions labels name; an older version a request names is
    read from the store then, and the last ``ON_DEMAND`` of those stay held."""
    from tollway.prompts.registry import ON_DEMAND, TenantPrompts

    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        versions = [(await push(gw, eng, "greet", GREET.replace("politely", f"politely {i}"))).json()["version"]
                    for i in range(4)]
        await label(gw, eng, "greet", "production", versions[-1])
        registry = gw.state.prompts
        held = set(registry._tenants[eng.id].contents)
        old = await gw.client.post("/v1/prompts/greet/render", headers=eng.headers,
                                   json={"ref": versions[0], "variables": {"customer": "Ada"}})
        after = set(registry._tenants[eng.id].contents)
        missing = await gw.client.post("/v1/prompts/greet/render", headers=eng.headers,
                                       json={"ref": "f" * 40, "variables": {"customer": "Ada"}})
    assert held == {("greet", versions[-1])}
    assert old.status_code == 200, old.text
    assert "politely 0" in old.text
    assert after == {("greet", versions[-1]), ("greet", versions[0])}
    assert missing.status_code == 404
    tenant = TenantPrompts()
    for i in range(ON_DEMAND + 3):
        tenant.keep(("p", str(i)), "text")
    assert len(tenant.contents) == ON_DEMAND and ("p", "0") not in tenant.contents


class Waits:
    """A gate still running its golden set, until the test lets it answer (it passes)."""

    def __init__(self) -> None:
        self.running = 0
        self.go = asyncio.Event()

    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None,
                    actor: Any = None) -> GateResult:
        self.running += 1
        await self.go.wait()
        return GateResult(True, "pass rate 10/10", {"pass_rate": 1.0})


async def test_a_running_gate_holds_no_connection_and_no_lock(app_factory, make_tenant, admin):
    """A move of production waits for its gate (a golden set through the gateway: minutes) holding neither a
    pooled connection nor the label's row: more such moves than the pool holds leave it free, a rollback of
    production meanwhile is answered at once, and the gated moves then find production moved (409,
    ``label_moved``) instead of overwriting the rollback. A rollout of production gates the same way."""
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        pool = gw.state.pool
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        v2 = (await push(gw, eng, "greet", GREET_V2)).json()["version"]
        v3 = (await push(gw, eng, "greet", GREET.replace("politely", "briefly"))).json()["version"]
        assert (await label(gw, eng, "greet", "production", v1)).status_code == 200
        assert (await label(gw, eng, "greet", "production", v2)).status_code == 200
        gw.state.prompt_gate = waits = Waits()
        n = pool.max_size + 2
        moves = [asyncio.create_task(label(gw, eng, "greet", "production", v3)) for _ in range(n)]
        rollout = asyncio.create_task(gw.client.post("/v1/admin/prompt-rollouts", headers=admin.headers, json={
            "tenant": eng.name, "prompt": "greet", "label": "production", "version": v3, "steps": [10, 100]}))
        for _ in range(100):
            if waits.running == n + 1:
                break
            await asyncio.sleep(0.02)
        running = waits.running
        held = await checked_out(pool)
        back = await asyncio.wait_for(gw.client.post("/v1/prompts/greet/labels/production/rollback",
                                                     headers=eng.headers, json={}), 5)
        waits.go.set()
        moved = await asyncio.gather(*moves)
        rolled = await rollout
        listed = (await gw.client.get("/v1/prompts", headers=eng.headers)).json()["data"]
    assert running == n + 1  # every gate was running at once
    assert held <= 2, held  # (the ledger's writer, a connection on its way back to the pool)
    assert back.status_code == 200, back.text
    assert {r.status_code for r in moved} == {409}
    assert {r.json()["error"]["code"] for r in moved} == {"label_moved"}
    assert (rolled.status_code, rolled.json()["error"]["code"]) == (409, "label_moved")
    [greet] = listed
    assert greet["labels"]["production"]["version"] == v1  # the rollback stands


async def test_twenty_concurrent_submissions_none_lost(app_factory, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v0 = (await push(gw, eng, "same", GREET)).json()["version"]
        others = [push(gw, eng, f"p{i}", GREET.replace("politely", f"politely {i}")) for i in range(10)]
        same = [push(gw, eng, "same", GREET.replace("politely", f"kindly {i}"), parent=v0) for i in range(10)]
        results = await asyncio.gather(*others, *same)
        versions = (await gw.client.get("/v1/prompts", headers=eng.headers)).json()["data"]
    assert [r.status_code for r in results[:10]] == [201] * 10  # other files: rebased, all land
    same_codes = sorted(r.status_code for r in results[10:])
    assert same_codes == [201] + [409] * 9  # the same file from one parent: one lands, the rest are stale
    assert {p["name"]: p["versions"] for p in versions} == {**{f"p{i}": 1 for i in range(10)}, "same": 2}


async def test_a_second_gateway_serves_a_label_move(app_factory, make_tenant, pg):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as one, app_factory() as two:
        v1 = (await push(one, eng, "greet", GREET)).json()["version"]
        v2 = (await push(one, eng, "greet", GREET_V2)).json()["version"]
        await label(one, eng, "greet", "production", v1)
        await label(one, eng, "greet", "production", v2)
        with psycopg.connect(pg.url) as conn:
            row = conn.execute("SELECT max(id) FROM changes").fetchone()
        assert row is not None
        await asyncio.wait_for(two.state.changes.applied(row[0]), 10)  # waits on the event, no sleep
        resp = await two.client.post("/v1/chat/completions", headers=eng.headers, json=chat_body())
    assert resp.headers["x-tollway-prompt-version"] == f"greet@{v2}"


async def test_a_broken_store_keeps_the_last_good_versions_serving(app_factory, make_tenant, monkeypatch):
    """The labelled versions keep serving from memory; a version no label names (read from the store when a
    request names it) is a 503 that says so while the store is down."""
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v0 = (await push(gw, eng, "greet", GREET_V2)).json()["version"]
        v1 = (await push(gw, eng, "greet", GREET)).json()["version"]
        await label(gw, eng, "greet", "production", v1)

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise psycopg.OperationalError("the prompt store is down")

        monkeypatch.setattr(gw.state.pool, "getconn", broken)
        await gw.state.prompts.load(eng.id)
        assert "the prompt store is down" in (gw.state.prompts.last_error or "")
        with pytest.raises(ServiceUnavailable, match="not one this gateway holds"):
            await gw.state.prompts.render(eng.id, "t", {"name": "greet", "version": v0,
                                                        "variables": {"customer": "Ada"}})
        monkeypatch.undo()
        resp = await gw.client.post("/v1/chat/completions", headers=eng.headers, json=chat_body())
        again = await gw.state.prompts.render(eng.id, "t", {"name": "greet", "version": v0,
                                                           "variables": {"customer": "Ada"}})
    assert resp.status_code == 200
    assert resp.headers["x-tollway-prompt-version"] == f"greet@{v1}"
    assert "warmly" in again.messages[0]["content"]  # read from the store once it answers again


def _cli(pg: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "TOLLWAY_DATABASE_URL": pg.url}
    out = subprocess.run([sys.executable, "-m", "tollway.cli", "prompts", *args], capture_output=True, text=True,
                         env=env, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("golden", [True])
async def test_the_cli_round_trip(app_factory, make_tenant, pg, tmp_path, golden):
    eng = make_tenant(role="prompt_engineer")
    path = tmp_path / "greet.yaml"
    path.write_text(GREET + "golden_set: greet.golden.jsonl\n")
    (tmp_path / "greet.golden.jsonl").write_text(
        '{"id": "q1", "variables": {"customer": "Ada"}, "checks": [{"type": "contains", "value": "Ada"}]}\n')
    t = ("--tenant", eng.name)
    v1 = (await asyncio.to_thread(_cli, pg, "push", str(path), "-m", "first", *t, "--author", "ada")).stdout.strip()
    path.write_text(GREET_V2 + "golden_set: greet.golden.jsonl\n")
    v2 = (await asyncio.to_thread(_cli, pg, "push", str(path), "-m", "warmer", *t)).stdout.strip().splitlines()[-1]
    # the golden set runs in the gateway only: the CLI, writing the database directly, moves production by
    # an override (recorded), and says so otherwise
    gated = await asyncio.to_thread(_cli, pg, "label", "greet", "production", v1, *t, check=False)
    assert gated.returncode != 0
    assert "only the gateway can run" in gated.stderr
    await asyncio.to_thread(_cli, pg, "label", "greet", "production", v1, *t, "--override")
    await asyncio.to_thread(_cli, pg, "label", "greet", "production", v2, *t, "--override")
    back = (await asyncio.to_thread(_cli, pg, "rollback", "greet", "production", *t)).stdout
    shown = (await asyncio.to_thread(_cli, pg, "show", "greet@production", *t)).stdout
    diff = (await asyncio.to_thread(_cli, pg, "diff", "greet", v1, v2, *t)).stdout
    rendered = (await asyncio.to_thread(_cli, pg, "render", "greet@production", "--var", "customer=Ada",
                                        "--json", *t)).stdout
    listed = (await asyncio.to_thread(_cli, pg, "list", *t)).stdout
    assert orjson.loads(back)["version"] == v1
    assert "politely" in shown
    assert "+  - {role: system, content: \"You greet {{ customer }} warmly" in diff
    assert orjson.loads(rendered)["messages"][0]["content"] == "You greet Ada politely, in English."
    assert listed.startswith(f"greet\t{v2[:12]}\tproduction={v1[:12]}")
    async with app_factory() as gw:  # what the CLI wrote is what the API serves
        versions = (await gw.client.get("/v1/prompts/greet/versions", headers=eng.headers)).json()["data"]
    assert [(v["version"], v["author"]) for v in versions][1] == (v1, "ada")


async def test_a_corrupt_store_is_a_doctor_finding(app_factory, make_tenant, pg, redis_url):
    from tollway.prompts.store import verify

    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        await push(gw, eng, "greet", GREET)
    with psycopg.connect(pg.url, autocommit=True) as conn:
        row = conn.execute("SELECT sha, type_num, data FROM prompt_objects WHERE tenant_id = %s AND type_num = 3",
                           (eng.id,)).fetchone()
        assert row is not None
        conn.execute("DELETE FROM prompt_objects WHERE tenant_id = %s AND sha = %s", (eng.id, row[0]))
        try:
            async with await psycopg.AsyncConnection.connect(pg.url) as aconn:
                problems = await verify(aconn, eng.id)
            env = {"PATH": "/usr/bin:/bin", "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url}
            doctor = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tollway.cli", "doctor"],
                                             capture_output=True, text=True, env=env, timeout=60)
        finally:  # the shared test database must stay whole for the other tests' doctor runs
            conn.execute("INSERT INTO prompt_objects (tenant_id, sha, type_num, data) VALUES (%s, %s, %s, %s)",
                         (eng.id, *row))
    assert problems
    assert "files are missing" in problems[0]
    assert doctor.returncode == 1
    assert f"FAIL  prompts: RuntimeError: tenant {eng.id}: commit" in doctor.stdout


async def test_the_responses_api_prompt_names_a_version_or_a_label(app_factory, make_tenant, ledger, sim):
    """``prompt: {id, version, variables}`` of the Responses API: id is the prompt's name, version a label of
    it or a version; with no model the prompt's applies."""
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        v1 = (await push(gw, eng, "greet", GREET, message="first")).json()["version"]
        v2 = (await push(gw, eng, "greet", GREET_V2, message="second")).json()["version"]
        await label(gw, eng, "greet", "production", v1)
        answers = {}
        for ref in ("production", v2, None):
            prompt = {"id": "greet", "variables": {"customer": "Ada"}, **({"version": ref} if ref else {})}
            resp = await gw.client.post("/v1/responses", headers=eng.headers, json={"prompt": prompt, "input": "hi"})
            assert resp.status_code == 200, resp.text
            answers[ref] = (resp.json()["tollway"]["prompt"]["version"],
                            orjson.loads(sim.get("/sim/last-request?model=sim-large"))["messages"][0]["content"])
        missing = await gw.client.post("/v1/responses", headers=eng.headers,
                                       json={"prompt": {"id": "greet", "version": "staging"}, "input": "hi"})
    assert answers == {"production": (v1, "You greet Ada politely, in English."),
                       v2: (v2, "You greet Ada warmly, in English."),
                       None: (v1, "You greet Ada politely, in English.")}
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "prompt_not_found"
