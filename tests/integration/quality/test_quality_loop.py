"""The live quality loop against the real PostgreSQL, Redis and a scripted upstream that answers from a
fixture file with configurable error rates (a planted regression): live sampling, drift alerts, the
automatic rollback of a prompt label and of a model canary, a progressive rollout that advances on good
traffic and rolls back on bad, rollouts changed at run time, and the content policy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.conftest import write_config

GOOD = "Paris is the capital of France."
BAD = "I'm sorry, I can't help with that."
QUALITY = {"sample_rate": 1.0, "max_sample_rate": 1.0, "interval_s": 3600, "baseline_samples": 40,
           "window": 40, "min_samples": 40, "pass_drop": 0.2, "alpha": 0.01,
           "evidence_hours": 0}  # these tests pack days of traffic into seconds: evidence per sample
PROMPT_V1 = "model: sim-large\nmessages:\n  - {role: system, content: \"Answer briefly (prompt v1).\"}\n"
PROMPT_V2 = PROMPT_V1.replace("prompt v1", "prompt v2")
PROMPT_V3 = PROMPT_V1.replace("prompt v1", "prompt v3")  # as good as v1


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fixture") / "answers.json"
    path.write_text(json.dumps({
        "answer": GOOD, "wrong": BAD, "error_rate": 0.03, "seed": 11,
        "rules": [{"contains": "prompt v2", "error_rate": 0.6},   # the regression a promotion plants
                  {"model": "sim-cand", "error_rate": 0.6},        # a bad canary
                  {"model": "sim-good", "error_rate": 0.03}]}))     # a good one
    return path


@pytest.fixture(scope="module")
def fixture_sim(start_sim: Any, fixture_file: Path) -> Any:
    return start_sim("--fixture", str(fixture_file))


@pytest.fixture
def quality_app(app_factory: Any, fixture_sim: Any, tmp_path: Path) -> Any:
    def make(**quality: Any) -> Any:
        path = write_config(tmp_path / "tollway.yaml", fixture_sim.url, extra_models=[
            {"name": n, "upstream": "sim", "tier": "large", "price": {"input_per_mtok": "3", "output_per_mtok": "15"}}
            for n in ("sim-cand", "sim-good")])
        config = yaml.safe_load(path.read_text())
        config["quality"] = {**QUALITY, **quality}
        path.write_text(yaml.safe_dump(config))
        return app_factory(config=path)
    return make


async def chat(gw: Any, who: Any, n: int, *, start: int = 0, **body: Any) -> None:
    for i in range(start, start + n):
        resp = await gw.client.post("/v1/chat/completions", headers=who.headers, json={
            "model": "sim-large", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "user": f"user-{i}", **body})
        assert resp.status_code == 200, resp.text


async def settle(gw: Any) -> list[dict[str, Any]]:
    """Every sample scored, then one monitor pass; the alerts it raised."""
    await gw.state.quality.queue.join()
    raised: list[dict[str, Any]] = await gw.state.monitor.run_pass()
    return raised


async def until_alert(gw: Any, who: Any, rounds: int, per_round: int = 10, **body: Any) -> list[dict[str, Any]]:
    for r in range(rounds):
        await chat(gw, who, per_round, start=1000 + r * per_round, **body)
        if raised := await settle(gw):
            return raised
    return []


def rows(pg: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.url) as conn:
        return conn.execute(sql, args).fetchall()


async def test_a_promoted_prompt_that_regresses_is_alerted_and_rolled_back(quality_app, make_tenant, admin, pg):
    eng = make_tenant(role="prompt_engineer")
    async with quality_app() as gw:
        v1 = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                   json={"content": PROMPT_V1, "message": "v1"})).json()["version"]
        v2 = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                   json={"content": PROMPT_V2, "message": "v2"})).json()["version"]
        assert (await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers,
                                    json={"version": v1})).status_code == 200
        prompt = {"model": "prompt", "prompt": {"name": "faq"}}
        await chat(gw, eng, 60, **prompt)
        assert await settle(gw) == []  # the baseline: v1's answers, nothing to report
        moved = await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers, json={"version": v2})
        assert moved.status_code == 200
        await settle(gw)  # the monitor sees the move: a watch of v2 against v1
        raised = await until_alert(gw, eng, 12, **prompt)
        await gw.state.changes.applied(rows(pg, "SELECT max(id) FROM changes")[0][0])
        served = await gw.client.post("/v1/chat/completions", headers=eng.headers, json={
            "model": "prompt", "prompt": {"name": "faq"}, "messages": [{"role": "user", "content": "hi"}]})
        listed = (await gw.client.get("/v1/admin/alerts", headers=admin.headers,
                                      params={"tenant": eng.name})).json()["data"]
    assert raised, "the regression was not detected within 120 requests"
    alert = raised[0]
    assert alert["kind"] == "prompt"
    assert alert["action"] == "rollback"
    assert any(f["detector"] == "pass_rate" for f in alert["findings"])
    finding = next(f for f in alert["findings"] if f["detector"] == "pass_rate")
    assert finding["baseline"] > 0.85
    assert finding["current"] < finding["baseline"]
    assert listed[0]["kind"] == "drift"
    assert listed[0]["evidence"]["findings"] == alert["findings"]
    # one alert for one move: the label's steady watch is per version, so it does not report the move too
    assert len([a for a in listed if a["kind"] == "drift"]) == 1, listed
    label, = rows(pg, "SELECT version FROM prompt_labels WHERE tenant_id = %s AND name = 'faq'", eng.id)
    assert label[0] == v1  # rolled back
    assert served.json()["tollway"]["prompt"]["version"] == v1
    author, after, reason = rows(pg, "SELECT author, after, reason FROM changes WHERE tenant_id = %s AND kind ="
                                     " 'prompt_label' ORDER BY id DESC LIMIT 1", eng.id)[0]
    assert author == "tollway-quality"
    assert after["evidence"]["alert"] == alert["alert"]
    assert "quality monitor" in reason


async def test_a_moved_label_is_watched_past_its_days_until_its_test_has_decided(quality_app, make_tenant, pg):
    """A quiet route may not have the samples for a decision within ``watch_days``: its watch runs on until
    its SPRT has accepted "no drop" (or breached), ``watch_max_days`` at most; a new leader does the same."""
    eng = make_tenant(role="prompt_engineer")
    prompt = {"model": "prompt", "prompt": {"name": "faq"}}
    async with quality_app(watch_days=1, watch_max_days=10) as gw:
        monitor = gw.state.monitor
        v1 = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                   json={"content": PROMPT_V1, "message": "v1"})).json()["version"]
        v3 = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                   json={"content": PROMPT_V3, "message": "v3"})).json()["version"]
        await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers, json={"version": v1})
        await chat(gw, eng, 60, **prompt)
        assert await settle(gw) == []
        await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers, json={"version": v3})
        change = rows(pg, "SELECT max(id) FROM changes WHERE kind = 'prompt_label'")[0][0]
        key = f"prompt:{eng.id}:faq:production:{change}"

        async def moved_ago(days: int) -> None:  # as if the move was that long ago: a new leader reads the changes
            with psycopg.connect(pg.url) as conn:
                conn.execute("UPDATE changes SET at = now() - make_interval(days => %s) WHERE id = %s", (days, change))
            monitor.rebuild()  # what a new leader does (these tests run passes without the leader's lock)
            await settle(gw)

        await chat(gw, eng, 3, start=100, **prompt)
        await moved_ago(11)  # past watch_max_days: not watched, decided or not
        assert key not in monitor.watches
        await moved_ago(2)  # past its day, and the route quiet since: undecided, so still watched
        watch = monitor.watches[key]
        assert not watch.decided()
        for r in range(20):
            await chat(gw, eng, 5, start=200 + 5 * r, **prompt)
            assert await settle(gw) == []  # as good as v1: no alert
            if key not in monitor.watches:
                break
        assert key not in monitor.watches  # decided ("no drop"): done with
        assert watch.decided()
        assert rows(pg, "SELECT version FROM prompt_labels WHERE tenant_id = %s AND name = 'faq'", eng.id)[0][0] == v3
        await moved_ago(2)  # a new leader rebuilds the watch from the samples: decided, so not watched
        assert key not in monitor.watches


async def test_a_rollout_step_is_watched_however_long_its_evidence_takes(quality_app, make_tenant, admin, pg):
    """A quiet label's rollout step may need weeks for ``min_samples``: it is watched past ``watch_days`` and
    ``watch_max_days`` until it moves on or back (unwatched, its split would hold for good), by a new leader
    too; a plain move that old is not watched."""
    eng = make_tenant(role="prompt_engineer")
    prompt = {"model": "prompt", "prompt": {"name": "faq"}}
    async with quality_app(watch_days=1, watch_max_days=10) as gw:
        monitor = gw.state.monitor
        made = {}
        for name, content in (("v1", PROMPT_V1), ("v3", PROMPT_V3)):
            made[name] = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                               json={"content": content, "message": name})).json()["version"]
        await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers, json={"version": made["v1"]})
        await chat(gw, eng, 60, **prompt)
        assert await settle(gw) == []
        started = await gw.client.post("/v1/admin/prompt-rollouts", headers=admin.headers, json={
            "tenant": eng.name, "prompt": "faq", "label": "production", "version": made["v3"], "steps": [30, 100],
            "min_samples": 5000})  # more than this test sends: the step waits for evidence throughout
        assert started.status_code == 200, started.text
        change = rows(pg, "SELECT max(id) FROM changes WHERE kind = 'prompt_label'")[0][0]
        key = f"prompt:{eng.id}:faq:production:{change}"
        for r in range(30):
            await chat(gw, eng, 10, start=100 + 10 * r, **prompt)
            assert await settle(gw) == []
            if monitor.watches[key].decided():
                break
        assert monitor.watches[key].decided()  # its SPRT accepted, its min_samples not yet in
        for days in (2, 11):  # past watch_days, then past watch_max_days; a new leader each time
            with psycopg.connect(pg.url) as conn:
                conn.execute("UPDATE changes SET at = now() - make_interval(days => %s) WHERE id = %s", (days, change))
            monitor.rebuild()
            await settle(gw)
            assert key in monitor.watches, f"a rollout step {days} days old is still watched"
        rates = dict(rows(pg, "SELECT key, rate FROM quality_rates"))
        assert rates.get(f"prompt:{eng.id}:faq:production@{made['v3']}") == 1.0  # short of evidence: the ceiling
        with psycopg.connect(pg.url) as conn:  # the label moved by hand meanwhile: that old move is not watched
            conn.execute("UPDATE prompt_rollouts SET state = 'rolled_back' WHERE tenant_id = %s", (eng.id,))
        monitor.rebuild()
        await settle(gw)
        assert key not in monitor.watches


async def test_a_bad_model_canary_is_rolled_back_on_every_replica(quality_app, make_tenant, admin, pg):
    app = make_tenant()
    async with quality_app() as gw:
        async with quality_app() as other:  # a second replica: the change reaches it through the channel
            await chat(gw, app, 60)  # the primary's answers: the canary's baseline
            await settle(gw)
            put = await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                                      json={"candidate": "sim-cand", "percent": 50, "reason": "try cand"})
            assert put.status_code == 200, put.text
            change_id = rows(pg, "SELECT max(id) FROM changes")[0][0]
            await other.state.changes.applied(change_id)
            assert other.state.catalog.has_canaries
            raised = await until_alert(gw, app, 15)
            await other.state.changes.applied(rows(pg, "SELECT max(id) FROM changes")[0][0])
            listed = (await gw.client.get("/v1/admin/rollouts", headers=admin.headers)).json()["data"]
            other_canaries = other.state.catalog.has_canaries
            # the console of the other replica (not the monitor's leader) shows the same rollout and alert
            signed = await other.client.post("/console/login", data={"key": admin.key}, follow_redirects=False)
            assert signed.status_code == 303
            page = (await other.client.get("/console/quality")).text
    assert raised
    assert raised[0]["kind"] == "canary"
    assert raised[0]["action"] == "rollback"
    drift_rows = page.split('id="table-drift"')[1].split("</table>")[0]
    rollout_rows = page.split('id="table-rollouts"')[1].split("</table>")[0]
    assert raised[0]["message"] in drift_rows
    assert "pass_rate (sprt)" in drift_rows
    assert "rollback" in drift_rows
    assert "sim-cand" in rollout_rows
    assert "rolled back" in rollout_rows
    assert "This replica does not lead the quality monitor" in page
    rollout = next(r for r in listed if r["model"] == "sim-large")
    assert (rollout["state"], rollout["canary_percent"]) == ("rolled_back", 0)
    assert not other_canaries
    canary_rows = rows(pg, "SELECT count(*) FROM quality_samples WHERE tenant_id = %s AND rollout_of = 'sim-large'"
                           " AND model = 'sim-cand'", app.id)[0][0]
    assert canary_rows >= 5
    action, after = rows(pg, "SELECT action, after FROM changes WHERE kind = 'rollout' AND subject = 'sim-large'"
                             " ORDER BY id DESC LIMIT 1")[0]
    assert action == "rollback"
    assert after["evidence"]["findings"]


async def test_a_progressive_rollout_advances_on_good_traffic_and_rolls_back_on_bad(quality_app, make_tenant,
                                                                                      admin, pg):
    app = make_tenant()
    async with quality_app() as gw:
        await chat(gw, app, 60)
        await settle(gw)
        put = await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                                  json={"candidate": "sim-good", "steps": [30, 60, 100], "min_samples": 25})
        assert put.json()["canary_percent"] == 30
        seen = []
        for r in range(40):
            await chat(gw, app, 10, start=5000 + 10 * r)
            assert await settle(gw) == []  # good traffic: no alert
            state = (await gw.client.get("/v1/admin/rollouts", headers=admin.headers)).json()["data"]
            now = next(x for x in state if x["model"] == "sim-large")
            if not seen or seen[-1] != (now["step"], now["state"]):
                seen.append((now["step"], now["state"]))
            if now["state"] == "complete":
                break
        assert seen[-1] == (2, "complete")
        assert [s for s, _ in seen] == [0, 1, 2, 2]
        steps = rows(pg, "SELECT action, after->'evidence'->>'samples' FROM changes WHERE kind = 'rollout' AND"
                         " subject = 'sim-large' AND action = 'advance' ORDER BY id DESC LIMIT 3")
        assert len(steps) == 3
        assert all(int(n) >= 25 for _, n in steps)
        # the completed candidate is the model's traffic now: its steady watch takes it on
        await chat(gw, app, 10, start=9000)
        await settle(gw)
        watched = {w["subject"]: w for w in gw.state.monitor.describe() if w["kind"] == "steady"}
        assert watched["model sim-good"]["baseline_samples"] >= 25, watched
        # the same steps with a bad candidate: rolled back at the first step
        await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                            json={"candidate": "sim-cand", "steps": [30, 60, 100], "min_samples": 25})
        raised = await until_alert(gw, app, 20)
        listed = (await gw.client.get("/v1/admin/rollouts", headers=admin.headers)).json()["data"]
    assert raised
    assert raised[0]["action"] == "rollback"
    bad = next(x for x in listed if x["model"] == "sim-large")
    assert (bad["candidate"], bad["state"], bad["step"], bad["canary_percent"]) == ("sim-cand", "rolled_back", 0, 0)


async def test_a_progressive_prompt_rollout_steps_the_split_then_moves_the_label_or_rolls_back(
        quality_app, make_tenant, admin, pg, monkeypatch):
    eng = make_tenant(role="prompt_engineer")
    prompt = {"model": "prompt", "prompt": {"name": "faq"}}

    async def post(version: str) -> Any:
        return await gw.client.post("/v1/admin/prompt-rollouts", headers=admin.headers, json={
            "tenant": eng.name, "prompt": "faq", "label": "production", "version": version, "steps": [30, 60, 100],
            "min_samples": 25})

    async with quality_app() as gw:
        made = {}
        for name, content in (("v1", PROMPT_V1), ("v2", PROMPT_V2), ("v3", PROMPT_V3)):
            made[name] = (await gw.client.post("/v1/prompts/faq/versions", headers=eng.headers,
                                               json={"content": content, "message": name})).json()["version"]
        await gw.client.put("/v1/prompts/faq/labels/production", headers=eng.headers, json={"version": made["v1"]})
        await chat(gw, eng, 60, **prompt)
        assert await settle(gw) == []
        started = await post(made["v3"])
        assert started.status_code == 200, started.text
        assert started.json()["split"]["split_percent"] == 30
        assert started.json()["split"]["version"] == made["v1"]
        seen: list[tuple[int, str, float]] = []
        for r in range(40):
            await chat(gw, eng, 10, start=7000 + 10 * r, **prompt)
            assert await settle(gw) == []  # a good candidate: no alert at any step
            now = (await gw.client.get("/v1/admin/prompt-rollouts", headers=admin.headers,
                                       params={"tenant": eng.name})).json()["data"][0]
            label = rows(pg, "SELECT version, split_version, split_percent FROM prompt_labels WHERE tenant_id = %s"
                             " AND name = 'faq' AND label = 'production'", eng.id)[0]
            share = float(label[2] or 0) if label[1] == made["v3"] else (100.0 if label[0] == made["v3"] else 0.0)
            if not seen or seen[-1][:2] != (now["step"], now["state"]):
                seen.append((now["step"], now["state"], share))
            if now["state"] == "complete":
                break
        assert [(s, st) for s, st, _ in seen] == [(0, "active"), (1, "active"), (2, "complete")], seen
        assert [share for *_, share in seen] == [30, 60, 100]  # the split, then the label itself
        advances = rows(pg, "SELECT after->'evidence'->>'samples', author FROM changes WHERE tenant_id = %s AND"
                            " kind = 'prompt_label' AND reason LIKE 'no regression%%' ORDER BY id", eng.id)
        assert len(advances) == 2
        assert all(int(n) >= 25 and a == "tollway-quality" for n, a in advances)
        # the old version's steady watch stops setting the label's sampling rate once it is idle (it keeps its
        # evidence: a route may only be quiet)
        steady = [w["subject"] for w in gw.state.monitor.describe() if w["kind"] == "steady"]
        assert any(made["v1"][:12] in subject for subject in steady), steady
        monkeypatch.setattr("tollway.gateway.quality.watches.STEADY_IDLE_S", 0.5)
        await asyncio.sleep(0.6)
        await chat(gw, eng, 5, start=8500, **prompt)
        await settle(gw)
        steady = [w for w in gw.state.monitor.describe() if w["kind"] == "steady"]
        assert all(w["idle"] for w in steady if made["v1"][:12] in w["subject"]), steady
        assert [w["idle"] for w in steady if made["v3"][:12] in w["subject"]] == [False], steady
        # a bad candidate from the new production version: rolled back at its first step, the label untouched
        assert (await post(made["v2"])).status_code == 200
        raised = await until_alert(gw, eng, 30, **prompt)
        await gw.state.changes.applied(rows(pg, "SELECT max(id) FROM changes")[0][0])
        listed = (await gw.client.get("/v1/admin/prompt-rollouts", headers=admin.headers,
                                      params={"tenant": eng.name})).json()["data"]
    assert raised
    assert raised[0]["kind"] == "prompt"
    assert raised[0]["action"] == "rollback"
    assert (listed[0]["candidate"], listed[0]["state"], listed[0]["step"]) == (made["v2"], "rolled_back", 0)
    label = rows(pg, "SELECT version, split_version, split_percent FROM prompt_labels WHERE tenant_id = %s"
                     " AND name = 'faq' AND label = 'production'", eng.id)[0]
    assert label[0] == made["v3"]
    assert not label[1]
    assert not label[2]


async def test_rollouts_are_checked(quality_app, admin, pg, tmp_path):
    async with quality_app() as gw:
        unknown = await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                                      json={"candidate": "nope"})
        steps = await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                                    json={"candidate": "sim-good", "steps": [50, 20]})
        same = await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                                   json={"candidate": "sim-large"})
        app_key = await gw.client.get("/v1/admin/rollouts", headers={"authorization": "Bearer nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "candidate"
    assert steps.status_code == 400
    assert steps.json()["error"]["param"] == "steps"
    assert same.status_code == 400
    assert app_key.status_code == 401


def test_the_cli_sets_lists_and_deletes_rollouts(pg, tmp_path):
    env_args = ["--data-dir", str(tmp_path)]
    base = [sys.executable, "-m", "tollway.cli"]
    env = {"TOLLWAY_DATABASE_URL": pg.url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*base, "rollouts", "set", "sim-small", "--candidate", "sim-good", "--steps", "5,20,50,100",
                          "--shadow-percent", "10", *env_args], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["canary_percent"] == 5
    listed = subprocess.run([*base, "rollouts", "list", "--json", *env_args], capture_output=True, text=True,
                            env=env, check=True)
    mine = next(r for r in json.loads(listed.stdout) if r["model"] == "sim-small")
    assert (mine["steps"], mine["shadow_percent"], mine["state"]) == ([5, 20, 50, 100], 10, "active")
    bad = subprocess.run([*base, "rollouts", "set", "sim-small", "--candidate", "sim-good", "--steps", "0,200",
                          *env_args], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "steps" in bad.stderr
    subprocess.run([*base, "rollouts", "delete", "sim-small", *env_args], capture_output=True, text=True, env=env,
                   check=True)


async def test_content_follows_the_tenant_policy_and_is_erased_on_request(quality_app, make_tenant, admin, pg):
    app = make_tenant()
    async with quality_app() as gw:
        await chat(gw, app, 3)  # default policy: scores and metadata only
        await gw.state.quality.queue.join()
        policy = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                     json={"tenant": app.name, "store_content": True, "content_retention_days": 1})
        assert policy.status_code == 200, policy.text
        await gw.state.changes.applied(rows(pg, "SELECT max(id) FROM changes")[0][0])
        await chat(gw, app, 4)
        await gw.state.quality.queue.join()
        stored = rows(pg, "SELECT end_user, output_text, prompt_text, passed FROM quality_samples WHERE tenant_id = %s"
                          " ORDER BY id", app.id)
        assert [r[1] for r in stored[:3]] == [None] * 3
        assert all(r[3] is not None for r in stored)
        assert all(r[1] == GOOD or r[1] == BAD for r in stored[3:])
        assert "capital" in stored[3][2]
        erased = await gw.client.post("/v1/admin/content/erase", headers=admin.headers,
                                      json={"tenant": app.name, "user": stored[3][0]})
        assert erased.status_code == 200
        assert erased.json()["erased"]["quality_samples"] == 1
        left = rows(pg, "SELECT end_user FROM quality_samples WHERE tenant_id = %s AND output_text IS NOT NULL",
                    app.id)
        assert len(left) == 3
        assert stored[3][0] not in {r[0] for r in left}
        with psycopg.connect(pg.url) as conn:  # two days old: past the tenant's retention of one day
            conn.execute("UPDATE quality_samples SET created_at = now() - interval '2 days' WHERE request_id IN"
                         " (SELECT request_id FROM quality_samples WHERE tenant_id = %s ORDER BY id DESC LIMIT 1)",
                         (app.id,))
        from tollway.gateway.quality.sampling import apply_retention

        async with gw.state.pool.connection() as conn:
            removed = await apply_retention(conn)
        assert removed["quality_samples"] >= 1
        assert len(rows(pg, "SELECT 1 FROM quality_samples WHERE tenant_id = %s AND output_text IS NOT NULL",
                        app.id)) == 2
        whole = await gw.client.post("/v1/admin/content/erase", headers=admin.headers, json={"tenant": app.name})
        unknown = await gw.client.post("/v1/admin/content/erase", headers=admin.headers, json={"tenant": "nobody"})
        not_admin = await gw.client.post("/v1/admin/content/erase", headers=app.headers, json={"tenant": app.name})
    assert whole.json()["erased"]["quality_samples"] == 2
    assert unknown.status_code == 404
    assert not_admin.status_code == 403
    assert not rows(pg, "SELECT 1 FROM quality_samples WHERE tenant_id = %s AND output_text IS NOT NULL", app.id)
    erasure, = rows(pg, "SELECT author FROM changes WHERE tenant_id = %s AND kind = 'content' AND subject = %s",
                    app.id, app.name)
    assert erasure[0]


async def test_a_full_queue_drops_and_counts_and_never_delays(quality_app, make_tenant):
    app = make_tenant()
    async with quality_app(queue_size=1, scorers=1) as gw:
        gw.state.quality.rng.seed(1)
        for task in gw.state.quality._workers:  # scorers stopped: the queue fills
            task.cancel()
        await chat(gw, app, 5)
        dropped = gw.state.quality.dropped
        quality = (await gw.client.get("/v1/admin/quality", headers={"authorization": "Bearer x"})).status_code
    assert dropped == 4
    assert quality == 401


async def test_without_auto_rollback_a_breach_is_alerted_once_and_the_canary_stays(quality_app, make_tenant, admin):
    app = make_tenant()
    async with quality_app() as gw:
        await chat(gw, app, 60)
        await settle(gw)
        await gw.client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                            json={"candidate": "sim-cand", "percent": 50, "auto_rollback": False})
        raised = await until_alert(gw, app, 15)
        await chat(gw, app, 40, start=9000)
        again = await settle(gw)  # the same rollout, more bad answers: no second alert, no rollback
        listed = (await gw.client.get("/v1/admin/rollouts", headers=admin.headers)).json()["data"]
    assert raised
    assert raised[0]["action"] is None
    assert again == []
    rollout = next(r for r in listed if r["model"] == "sim-large")
    assert (rollout["state"], rollout["canary_percent"]) == ("active", 50)


def insert_samples(pg: Any, tenant_id: int, model: str, passes: list[bool], *, start_h: float | None = None,
                   every_s: float = 0.0) -> None:
    """Scored samples of a route; ``start_h`` hours ago, one every ``every_s`` seconds (default: now)."""
    with psycopg.connect(pg.url) as conn:
        for i, ok in enumerate(passes):
            ago = None if start_h is None else start_h * 3600 - i * every_s
            conn.execute("INSERT INTO quality_samples (tenant_id, request_id, model, passed, refusal, guard_failed,"
                         " output_chars, tokens, cost_usd, sample_rate, created_at) VALUES (%s, 'r', %s, %s, false,"
                         " false, 30, 10, 0.0001, 1.0, now() - make_interval(secs => coalesce(%s, 0)))",
                         (tenant_id, model, ok, ago))


BASELINE = [i % 25 != 0 for i in range(100)]  # a 96% pass rate; five failures in a row breach it (window 40)


async def test_a_route_quiet_for_hours_keeps_its_evidence(quality_app, make_tenant, pg):
    """A drop that starts in the evening and goes on after a quiet night is found: the steady watch keeps
    its baseline and its CUSUM through the night (it used to be dropped after an idle hour and rebuilt from
    the newest samples, the drop's included, with its CUSUM at zero)."""
    tenant = make_tenant()
    async with quality_app() as gw:
        monitor = gw.state.monitor
        await monitor.run_pass()  # leads from the newest sample
        insert_samples(pg, tenant.id, "sim-night", BASELINE)
        await monitor.run_pass()
        insert_samples(pg, tenant.id, "sim-night", [False] * 3)  # the drop begins: not yet evidence enough
        assert await monitor.run_pass() == []
        watch = monitor.watches["steady:model:sim-night"]
        watch.fed_at -= 5 * 3600  # five quiet hours
        assert await monitor.run_pass() == []
        [state] = [w for w in monitor.describe() if w["watch"] == "steady:model:sim-night"]
        assert state["idle"] is True  # it no longer sets the route's sampling rate...
        assert monitor.watches["steady:model:sim-night"] is watch  # ...and keeps its evidence
        insert_samples(pg, tenant.id, "sim-night", [False] * 2)  # morning: the drop goes on
        raised = await monitor.run_pass()
    assert [r["watch"] for r in raised] == ["steady:model:sim-night"]
    assert raised[0]["findings"][0]["detector"] == "pass_rate"


async def test_a_rebuilt_steady_watch_replays_the_newest_samples_instead_of_learning_them(quality_app,
                                                                                          make_tenant, pg):
    """A watch rebuilt from the stored samples (a new leader, a route back after a week) is what the watch
    would be had it run all along: the newest ``lag`` samples go through its tests, not into its baseline."""
    tenant = make_tenant()
    async with quality_app() as gw:
        monitor = gw.state.monitor
        await monitor.run_pass()
        insert_samples(pg, tenant.id, "sim-rebuilt", [*BASELINE, *BASELINE, False, False, False])
        await monitor.run_pass()
        del monitor.watches["steady:model:sim-rebuilt"]  # forgotten (or another replica leads now)
        insert_samples(pg, tenant.id, "sim-rebuilt", [False, False])
        raised = await monitor.run_pass()
    # seeded with all 203 earlier samples (the old way) its baseline would have taken in the three failures
    # and its CUSUM would start at zero: two more failures are not evidence enough then
    assert [r["watch"] for r in raised] == ["steady:model:sim-rebuilt"]
    # the alert's evidence is the test that breached (the watch has started over by the time it is written)
    assert raised[0]["samples"] > 0 and "pass_rate" in raised[0]["detectors"] and raised[0]["baseline_samples"] > 0


async def test_failures_packed_into_minutes_wait_for_hours_of_evidence(quality_app, make_tenant, pg):
    """The monitor paces evidence by the samples' times: the same failures that breach at once when they
    come within minutes of each other (an upstream hiccup sampled at a raised rate) breach only when they
    span hours (a drop that lasts)."""
    tenant = make_tenant()
    failures = [False] * 8 + [True, False] * 4  # well past the threshold, counted per sample
    async with quality_app(evidence_hours=3) as gw:
        monitor = gw.state.monitor
        await monitor.run_pass()
        insert_samples(pg, tenant.id, "sim-burst", BASELINE, start_h=60, every_s=1800)  # two days, every half hour
        insert_samples(pg, tenant.id, "sim-lasting", BASELINE, start_h=60, every_s=1800)
        await monitor.run_pass()
        insert_samples(pg, tenant.id, "sim-burst", failures, start_h=8, every_s=30)  # eight minutes
        insert_samples(pg, tenant.id, "sim-lasting", failures, start_h=8, every_s=1800)  # eight hours
        raised = await monitor.run_pass()
        burst = monitor.watches["steady:model:sim-burst"].steady
    assert [r["watch"] for r in raised] == ["steady:model:sim-lasting"]
    assert burst is not None and burst.test is not None
    cusum = burst.test.pass_tests[0].cusum
    assert cusum is not None and 0 < cusum.llr <= cusum.h / 3 + 1e-9  # it climbed a third of the way, no more


def insert_failed_attempts(pg: Any, tenant: Any, model: str, n: int, *, start_h: float, every_s: float) -> None:
    """Ledger rows of attempts that failed at the upstream (as the gateway writes them before falling back)."""
    with psycopg.connect(pg.url) as conn:
        for i in range(n):
            conn.execute("INSERT INTO ledger (request_id, created_at, tenant_id, key_id, endpoint, model, role, attempt,"
                         " status, error_code, latency_ms) VALUES (%s, now() - make_interval(secs => %s), %s, %s,"
                         " 'chat.completions', %s, 'attempt', 1, 502, 'upstream_error', 5)",
                         (f"hiccup-{model}-{i}", start_h * 3600 - i * every_s, tenant.id, tenant.key_id, model))


async def test_failures_inside_an_upstream_incident_are_set_aside(quality_app, make_tenant, admin, pg, monkeypatch):
    """The same burst of failed answers on two routes, evidence per sample (no rise limit): on the route whose
    upstream failed attempts meanwhile (an incident in the ledger) it is set aside and raises nothing; on the
    other (a hiccup that answered 200) it is a breach. Failures after the incident still count."""
    tenant = make_tenant()
    burst = [False] * 8 + [True, False] * 4
    async with quality_app() as gw:
        monitor = gw.state.monitor
        await monitor.run_pass()
        for model in ("sim-hiccup", "sim-silent"):
            insert_samples(pg, tenant.id, model, BASELINE, start_h=60, every_s=1800)
        await monitor.run_pass()
        # the last eight minutes (the monitor reads the failed attempts of the last buckets each pass)
        insert_failed_attempts(pg, tenant, "sim-hiccup", 6, start_h=0.14, every_s=60)
        for model in ("sim-hiccup", "sim-silent"):
            insert_samples(pg, tenant.id, model, burst, start_h=0.14, every_s=30)
        raised = await monitor.run_pass()
        assert [r["watch"] for r in raised] == ["steady:model:sim-silent"]
        assert monitor.core.incidents.set_aside == len(burst)
        view = (await gw.client.get("/v1/admin/quality", headers=admin.headers)).json()["incidents"]
        ours = [w["model"] for w in view["windows"] if w["model"] in ("sim-hiccup", "sim-silent")]
        assert ours == ["sim-hiccup"] and view["set_aside"] == len(burst)  # (other tests' upstreams fail too)
        # the console shows the leader's watches and incidents (another gateway of the session may hold the lock)
        monkeypatch.setattr(type(monitor), "leading", property(lambda _: True))
        await gw.client.post("/console/login", data={"key": admin.key}, follow_redirects=False)
        table = (await gw.client.get("/console/quality")).text.split('id="table-incidents"')[1].split("</table>")[0]
        assert "sim-hiccup" in table and "sim-silent" not in table
        insert_samples(pg, tenant.id, "sim-hiccup", burst, start_h=-2, every_s=60)  # two hours on: evidence
        raised = await monitor.run_pass()
    assert [r["watch"] for r in raised] == ["steady:model:sim-hiccup"]
