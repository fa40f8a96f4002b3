"""Evals in the gateway against the real PostgreSQL, Redis and scripted upstream processes: the echo model
answers with the last user message, so an item's answer (and its pass or fail) is planted exactly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

MIXED = [  # 3 of 4 pass
    {"id": "paris", "messages": [{"role": "user", "content": "The capital of France is Paris."}],
     "checks": [{"type": "contains", "value": "Paris"}, {"type": "regex", "pattern": "^The capital"}]},
    {"id": "number", "messages": [{"role": "user", "content": "It costs 41.9 dollars"}],
     "checks": [{"type": "numeric", "value": 42, "tolerance": 0.5}]},
    {"id": "json", "messages": [{"role": "user", "content": '{"city": "Oslo"}'}],
     "checks": [{"type": "json", "schema": {"type": "object", "required": ["city"]}}]},
    {"id": "wrong", "messages": [{"role": "user", "content": "Lyon"}],
     "checks": [{"type": "exact", "value": "Paris"}]},
]


async def run(gw: Any, who: Any, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    resp = await gw.client.post("/v1/evals/runs", headers=who.headers,
                                json={"set": {"name": "mixed", "items": items}, "model": "sim-echo", "wait": True,
                                      **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_a_run_goes_through_the_chat_path_and_stores_its_results(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        started = await gw.client.post("/v1/evals/runs", headers=tenant.headers,
                                        json={"set": {"name": "mixed", "items": MIXED}, "model": "sim-echo",
                                              "concurrency": 2})
        assert started.status_code == 202
        assert started.json()["status"] == "running"
        run_id = started.json()["id"]
        for _ in range(100):
            got = (await gw.client.get(f"/v1/evals/runs/{run_id}", headers=tenant.headers)).json()
            if got["status"] != "running":
                break
            await asyncio.sleep(0.05)
        await gw.state.ledger.flush()
        listed = (await gw.client.get("/v1/evals/runs", headers=tenant.headers)).json()["data"]
    assert got["status"] == "done"
    assert (got["passed"], got["items"], got["done"]) == (3, 4, 4)
    assert got["summary"]["pass_rate"] == 0.75
    assert got["models"] == ["sim-echo"]
    results = {r["item_id"]: r for r in got["results"]}
    assert not results["wrong"]["passed"]
    assert "expected 'Paris'" in results["wrong"]["checks"][0]["detail"]
    assert results["number"]["checks"][0]["passed"]
    rows = ledger("tenant_id = %s AND %s = ANY(tags)", tenant.id, f"eval-run:{run_id}")
    assert len(rows) == 4
    assert all("eval" in r["tags"] for r in rows)
    assert {r["request_id"] for r in rows} == {r["request_id"] for r in got["results"]}
    assert listed[0]["id"] == run_id


async def test_runs_are_the_tenants_own(app_factory, make_tenant):
    owner, other, finance = make_tenant(), make_tenant(), make_tenant(role="finance")
    async with app_factory() as gw:
        mine = await run(gw, owner, MIXED[:1])
        peek = await gw.client.get(f"/v1/evals/runs/{mine['id']}", headers=other.headers)
        refused = await gw.client.post("/v1/evals/runs", headers=finance.headers,
                                       json={"set": {"items": MIXED}, "model": "sim-echo"})
        bad = await gw.client.post("/v1/evals/runs", headers=owner.headers,
                                   json={"set": {"items": [{"id": "x", "messages": [], "checks": []}]},
                                         "model": "sim-echo"})
        no_target = await gw.client.post("/v1/evals/runs", headers=owner.headers, json={"set": {"items": MIXED}})
    assert peek.status_code == 404
    assert refused.status_code == 403
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_golden_set"
    assert no_target.status_code == 400
    assert no_target.json()["error"]["param"] == "model"


def flipped(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The same items with the first n made to fail."""
    out = []
    for i, item in enumerate(items):
        text = item["messages"][0]["content"]
        out.append({**item, "messages": [{"role": "user", "content": "nope" if i < n else text}]})
    return out


async def test_compare_finds_regressions_and_says_whether_they_are_real(app_factory, make_tenant):
    tenant = make_tenant()
    items = [{"id": f"q{i:02d}", "messages": [{"role": "user", "content": f"answer {i} is yes"}],
              "checks": [{"type": "contains", "value": "yes"}]} for i in range(20)]
    async with app_factory() as gw:
        base = await run(gw, tenant, items)
        many = await run(gw, tenant, flipped(items, 12))
        few = await run(gw, tenant, flipped(items, 1))
        big = (await gw.client.get(f"/v1/evals/compare?a={base['id']}&b={many['id']}", headers=tenant.headers)).json()
        small = (await gw.client.get(f"/v1/evals/compare?a={base['id']}&b={few['id']}", headers=tenant.headers)).json()
    assert big["regressions"] == [f"q{i:02d}" for i in range(12)]
    assert big["improvements"] == []
    assert big["passes"]["significant"]
    assert big["passes"]["p_value"] < 0.001
    assert small["regressions"] == ["q00"]
    assert not small["passes"]["significant"]
    assert (small["pass_rate"]["a"], small["pass_rate"]["b"]) == (1.0, 0.95)


async def test_judge_scores_through_a_versioned_judge_prompt_and_a_weak_judge_is_skipped(app_factory, make_tenant):
    eng = make_tenant(role="prompt_engineer")
    judge = ("variables:\n  rubric: {type: string}\n  question: {type: string}\n  answer: {type: string}\n"
             "messages:\n  - {role: user, content: \"Score: {% if 'Paris' in answer %}9{% else %}2{% endif %}/10\"}\n")
    check = {"type": "judge", "rubric": "Names the capital correctly", "prompt": "judge", "model": "sim-echo",
             "min_score": 0.7}
    items = [{"id": "good", "messages": [{"role": "user", "content": "Paris"}], "checks": [check]},
             {"id": "bad", "messages": [{"role": "user", "content": "Lyon"}], "checks": [check]},
             {"id": "weak", "messages": [{"role": "user", "content": "Paris"}],
              "checks": [{**check, "prompt": None, "model": "sim-small"}, {"type": "contains", "value": "Paris"}]}]
    async with app_factory() as gw:
        v = (await gw.client.post("/v1/prompts/judge/versions", headers=eng.headers,
                                  json={"content": judge, "message": "judge"})).json()["version"]
        await gw.client.put("/v1/prompts/judge/labels/production", headers=eng.headers, json={"version": v})
        result = await run(gw, eng, items)
    by_id = {r["item_id"]: r for r in result["results"]}
    assert by_id["good"]["passed"]
    assert by_id["good"]["score"] == 0.9
    assert not by_id["bad"]["passed"]
    assert by_id["bad"]["score"] == 0.2
    weak = by_id["weak"]
    assert weak["passed"]
    assert weak["checks"][0]["passed"] is None
    assert "weak judge" in weak["checks"][0]["detail"]
    assert result["summary"]["judge_skipped"] == 1


GREET_GOOD = """\
model: sim-echo
messages:
  - {role: user, content: "The capital of {{ country }} is {{ capital }}."}
variables:
  country: {type: string}
  capital: {type: string}
golden_set: capitals.golden.jsonl
"""
GREET_BAD = GREET_GOOD.replace("The capital of {{ country }} is {{ capital }}.", "I do not know {{ country }}.")
GREET_BETTER = GREET_GOOD.replace("is {{ capital }}.", "is {{ capital }}, a fine city.")
CAPITALS = "\n".join(
    f'{{"id": "{c}", "variables": {{"country": "{c}", "capital": "{k}"}}, '
    f'"checks": [{{"type": "contains", "value": "{k}"}}]}}'
    for c, k in [("France", "Paris"), ("Norway", "Oslo"), ("Peru", "Lima"), ("Chile", "Santiago"),
                 ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Spain", "Madrid")])


async def test_the_gate_refuses_a_worse_version_passes_a_better_one_and_an_override_is_recorded(
        app_factory, make_tenant, admin, pg):
    eng = make_tenant(role="prompt_engineer")
    async with app_factory() as gw:
        async def push(content: str) -> str:
            resp = await gw.client.post("/v1/prompts/capitals/versions", headers=eng.headers, json={
                "content": content, "message": "edit", "files": {"capitals.golden.jsonl": CAPITALS}})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["version"])

        async def promote(version: str, who: Any = eng, **extra: Any) -> Any:
            return await gw.client.put("/v1/prompts/capitals/labels/production", headers=who.headers,
                                       json={"version": version, **extra})

        good = await push(GREET_GOOD)
        first = await promote(good)
        bad = await push(GREET_BAD)
        refused = await promote(bad)
        better = await push(GREET_BETTER)
        passed = await promote(better)
        forced = await promote(bad, admin, override=True, tenant=eng.name, reason="hotfix, evals rerun later")
        runs = (await gw.client.get("/v1/evals/runs", headers=eng.headers)).json()["data"]
    assert first.status_code == 200
    assert first.json()["gate"]["passed"]
    assert first.json()["gate"]["report"]["candidate"]["pass_rate"] == 1.0
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "gate_failed"
    assert "pass rate 0%" in refused.json()["error"]["message"]
    assert passed.status_code == 200
    assert passed.json()["gate"]["passed"]
    assert forced.status_code == 200
    assert not forced.json()["gate"]["passed"]
    assert {r["purpose"] for r in runs} == {"gate"}
    assert all(r["status"] == "done" for r in runs)
    with psycopg.connect(pg.url) as conn:
        row = conn.execute("SELECT after, reason FROM changes WHERE tenant_id = %s AND kind = 'prompt_label'"
                           " ORDER BY id DESC LIMIT 1", (eng.id,)).fetchone()
    assert row[0]["gate"]["overridden"] is True
    assert row[1] == "hotfix, evals rerun later"


async def test_feedback_is_joined_to_the_ledger_and_tenant_checked(app_factory, make_tenant, admin):
    tenant, other, finance = make_tenant(), make_tenant(), make_tenant(role="finance")
    async with app_factory() as gw:
        answer = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": [{"role": "user", "content": "hi"}]})
        request_id = answer.headers["x-request-id"]
        given = await gw.client.post("/v1/feedback", headers=tenant.headers,
                                     json={"request_id": request_id, "score": 0.0, "label": "thumbs_down",
                                           "comment": "wrong"})
        again = await gw.client.post("/v1/feedback", headers=tenant.headers,
                                     json={"request_id": request_id, "score": 1.0})
        foreign = await gw.client.post("/v1/feedback", headers=other.headers,
                                       json={"request_id": request_id, "score": 1.0})
        empty = await gw.client.post("/v1/feedback", headers=tenant.headers, json={"request_id": request_id})
        unknown, waited = [], []
        for rid in ("not-an-id", request_id.upper(), request_id + "0", "req_" + "0" * 24):
            started = time.perf_counter()
            unknown.append(await gw.client.post("/v1/feedback", headers=tenant.headers,
                                                json={"request_id": rid, "score": 1}))
            waited.append(time.perf_counter() - started)
        report = await gw.client.get("/v1/reports/feedback", headers=admin.headers,
                                     params={"tenant": tenant.name, "group_by": "model"})
        own = await gw.client.get("/v1/reports/feedback?group_by=model", headers=finance.headers)
    assert given.status_code == 201, given.text
    assert (given.json()["model"], given.json()["label"]) == ("sim-large", "thumbs_down")
    assert again.status_code == 201
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "request_not_found"
    assert empty.status_code == 400
    # an id of a shape the gateway never makes is unknown at once; one of its shape is waited for (another
    # replica's row may be on its way) before the same 404
    assert [(r.status_code, r.json()["error"]["code"]) for r in unknown] == [(404, "request_not_found")] * 4
    assert sum(waited[:3]) < 1.5 and waited[3] >= 1.5, waited  # (a wait is 7 x 0.25 s)
    [group] = report.json()["groups"]
    assert group == {"group": "sim-large", "feedback": 2, "mean_score": 0.5, "scored": 2,
                     "labels": {"thumbs_down": 1}}
    assert own.status_code == 200 and own.json()["groups"] == []  # the finance key's own tenant has none
