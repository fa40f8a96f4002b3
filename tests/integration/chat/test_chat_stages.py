"""The chat path as stages, in process against real PostgreSQL, Redis and scripted upstream processes:
what an answer says about itself, side rows, the seams parts plug into, one 500 row for an unexpected
failure in any stage, the change channel, discovered replicas and the velocity ceiling under concurrency."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from support import sse_payloads

from tollway.gateway.chat import stages as chat_module
from tollway.gateway.chat.exchange import GuardOutcome, GuardVerdict, Parts, Retrieved, SideCall

MSG = [{"role": "user", "content": "how much does this cost"}]




# -- what an answer says about itself ----------------------------------------------------------------
async def test_json_answer_carries_the_tollway_object_and_headers(app_factory, make_tenant, ledger):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": MSG, "max_tokens": 7})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    info = resp.json()["tollway"]
    request_id = resp.headers["x-request-id"]
    [row] = ledger("request_id = %s", request_id)
    assert info == {"request_id": request_id, "model": "sim-large", "route": "requested",
                    "cost_usd": resp.headers["x-tollway-cost-usd"], "price_source": "config", "prompt": None,
                    "retrieval": None, "guards": []}
    assert Decimal(info["cost_usd"]) == row["cost_usd"]
    assert resp.headers["x-tollway-route"] == "requested"
    assert resp.headers["x-tollway-model"] == "sim-large"
    assert "x-tollway-prompt-version" not in resp.headers
    assert "x-tollway-index-version" not in resp.headers


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_carries_the_tollway_object_on_its_final_chunk(app_factory, make_tenant, ledger, include_usage):
    tenant = make_tenant()
    body: dict[str, Any] = {"model": "sim-small", "messages": MSG, "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        await gw.state.ledger.flush()
    chunks = sse_payloads(resp.text)
    carrying = [c for c in chunks if "tollway" in c]
    assert carrying == [chunks[-1]]  # on the final chunk only, never a frame of its own
    final = chunks[-1]
    if include_usage:
        assert final["choices"] == []
        assert final["usage"]["completion_tokens"] == 4
    else:
        assert final["choices"][0]["finish_reason"] == "stop"
        assert "usage" not in final
    assert all(c["choices"] for c in chunks[:-1])  # clients reading choices[0] of every frame keep working
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert final["tollway"]["request_id"] == resp.headers["x-request-id"]
    assert Decimal(final["tollway"]["cost_usd"]) == row["cost_usd"] > 0


async def test_cached_answer_leaves_through_the_same_chain(app_factory, make_tenant):
    tenant = make_tenant()
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0,
            "max_tokens": 4}
    async with app_factory() as gw:
        first = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        gw.state.service.chat.parts = Parts(output=(Upper(),))
        second = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        streamed = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={**body, "stream": True})
    assert second.headers["x-tollway-cache"] == "hit"
    assert second.json()["tollway"]["route"] == "cache_hit"
    text = first.json()["choices"][0]["message"]["content"]
    assert second.json()["choices"][0]["message"]["content"] == text.upper()
    chunks = sse_payloads(streamed.text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text.upper()
    assert chunks[-1]["tollway"]["cost_usd"] == "0.0000000000"


# -- the seams: test doubles for the parts that plug in ------------------------------------------------
class Upper:
    """An output transformer double: upper-cases content, holding each chunk back until the next one."""

    def start(self, view: Any) -> Any:
        return _UpperFilter()


class _UpperFilter:
    def __init__(self) -> None:
        self.held: dict[str, Any] | None = None

    async def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                delta["content"] = delta["content"].upper()
        out, self.held = ([self.held] if self.held else []), chunk
        return out

    async def end(self) -> list[dict[str, Any]]:
        return [self.held] if self.held else []

    def outcomes(self) -> list[GuardOutcome]:
        return []


class Library:
    """A retriever double: a fixed context, and an embedding call recorded as a side row."""

    def __init__(self, embed_model: Any) -> None:
        self.embed_model = embed_model

    def context_budget(self, view: Any, spec: dict[str, Any]) -> int:
        return int(spec.get("context_tokens", 100))

    def screening(self, view: Any) -> None:
        return None

    def search_settings(self) -> str:
        return "search:test"

    async def index_version(self, view: Any, spec: dict[str, Any]) -> str:
        return "v7"

    async def retrieve(self, view: Any, spec: dict[str, Any], calls: list[SideCall]) -> Retrieved:
        from tollway.routing import Usage

        calls.append(SideCall("retrieval", self.embed_model, Usage(input_tokens=1000), 1.5))
        return Retrieved(collection=spec["collection"], index_version="v7",
                         messages=({"role": "system", "content": "Context: [doc-1] spend stays bounded."},),
                         sources=({"document_id": "doc-1", "score": 0.9},), context_tokens=9)


class Tagger:
    """An input guard double."""

    async def check(self, view: Any) -> GuardVerdict:
        return GuardVerdict(outcomes=(GuardOutcome("terms", "log", spans=1, ms=0.2),))


async def test_parts_plug_in_side_rows_and_versions(app_factory, make_tenant, ledger, sim):
    tenant = make_tenant()
    async with app_factory() as gw:
        embed = gw.state.catalog.models["sim-embed"]
        gw.state.service.chat.parts = Parts(input_guards=(Tagger(),), retriever=Library(embed), output=(Upper(),))
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "max_tokens": 5, "retrieval": {"collection": "handbook", "context_tokens": 50},
            "messages": [{"role": "system", "content": "Be brief."}, *MSG]})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    seen = orjson.loads(sim.get("/sim/last-request?model=sim-large"))
    assert [m["content"] for m in seen["messages"]] == ["Be brief.", "Context: [doc-1] spend stays bounded.",
                                                        MSG[0]["content"]]
    assert "retrieval" not in seen  # Tollway's own fields never go upstream
    body = resp.json()
    assert body["choices"][0]["message"]["content"].isupper()
    assert body["tollway"]["retrieval"] == {"collection": "handbook", "index_version": "v7", "context_tokens": 9,
                                            "sources": [{"document_id": "doc-1", "score": 0.9}]}
    assert body["tollway"]["guards"] == [{"validator": "terms", "action": "log", "spans": 1, "ms": 0.2}]
    assert resp.headers["x-tollway-index-version"] == "v7"
    request_id = resp.headers["x-request-id"]
    answer, side = ledger("request_id = %s", request_id), ledger("request_id = %s", request_id + ".r1")
    assert answer[0]["index_version"] == "v7"
    assert answer[0]["guard_outcome"] == body["tollway"]["guards"]
    assert (side[0]["role"], side[0]["model"], side[0]["input_tokens"]) == ("retrieval", "sim-embed", 1000)
    assert side[0]["cost_usd"] == Decimal("0.00002")  # 1,000 tokens at $0.02 per million


async def test_a_part_that_is_not_there_is_a_clear_400(app_factory, make_tenant):
    tenant = make_tenant()
    async with app_factory() as gw:
        gw.state.service.chat.parts.retriever = None  # a gateway without retrieval
        for extra, param in (({"retrieval": {"collection": "c"}}, "retrieval"), ({"prompt": "greet"}, "prompt")):
            resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                        json={"model": "sim-small", "messages": MSG, **extra})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
        unknown = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                       json={"model": "sim-small", "messages": MSG, "prompt": {"name": "greet"}})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "prompt.name"


# -- one 500 row for an unexpected failure in any stage ---------------------------------------------
def _failing(stage: chat_module.Stage) -> chat_module.Stage:
    async def run(chat: Any, ex: Any) -> None:
        await stage.run(chat, ex)  # the stage's own work first: whatever it opened must be given back
        raise RuntimeError(f"planted failure after {stage.name}")

    return chat_module.Stage(stage.name, run, stage.answers)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("index", range(len(chat_module.CHAT_STAGES)))
async def test_an_unexpected_failure_in_any_stage_is_one_500_row(app_factory, make_tenant, ledger, monkeypatch,
                                                                 index, stream):
    tenant = make_tenant()
    stages = list(chat_module.CHAT_STAGES)
    stages[index] = _failing(stages[index])
    monkeypatch.setattr(chat_module, "CHAT_STAGES", tuple(stages))
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-small", "messages": MSG, "max_tokens": 3, "stream": stream})
        await gw.state.ledger.flush()
        outstanding = {name: r.outstanding for name, r in gw.state.routing.health.replicas.items()}
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in resp.text
    rows = ledger("request_id LIKE %s", resp.headers["x-request-id"] + "%")
    assert [(r["status"], r["error_code"], r["role"]) for r in rows] == [(500, "internal_error", "answer")]
    assert set(outstanding.values()) == {0}  # every replica claim handed back


# -- the change channel -------------------------------------------------------------------------------
def _cli(pg: Any, redis_url: str, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url}
    out = subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _last_change(pg: Any) -> tuple[Any, ...]:
    with psycopg.connect(pg.url) as conn:
        row = conn.execute("SELECT id, author, kind, action, before, after, reason FROM changes"
                           " ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None
    return tuple(row)


async def test_a_cli_budget_change_applies_before_the_next_request(app_factory, make_tenant, pg, redis_url):
    tenant = make_tenant()
    # a TTL far longer than the test: only the notification can make the change visible in time
    async with app_factory(policy_cache_ttl_s=3600) as gw:
        ok = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                  json={"model": "sim-small", "messages": MSG, "max_tokens": 3})
        assert ok.status_code == 200  # the tenant's (empty) rules are now cached for an hour
        await asyncio.to_thread(_cli, pg, redis_url, "budgets", "set", "--tenant", tenant.name, "--window", "day",
                                "--usd", "0.0000001", "--author", "ops@desk", "--reason", "runaway spend")
        change_id, author, kind, action, before, after, reason = _last_change(pg)
        assert (author, kind, action, before, reason) == ("ops@desk", "budget", "set", None, "runaway spend")
        assert after["limit_usd"] == "1E-7" or Decimal(after["limit_usd"]) == Decimal("0.0000001")
        await asyncio.wait_for(gw.state.changes.applied(change_id), 10)  # waits on the event, no sleep
        refused = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                       json={"model": "sim-small", "messages": MSG, "max_tokens": 3})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"


async def test_admin_changes_are_audited_with_before_and_after(app_factory, make_tenant, admin):
    tenant = make_tenant()
    async with app_factory() as gw:
        for threshold in (0.3, 0.7):
            resp = await gw.client.put("/v1/admin/policies", headers=admin.headers, json={
                "tenant": tenant.name, "route_threshold": threshold, "reason": f"try {threshold}"})
            assert resp.status_code == 200
        audit = await gw.client.get(f"/v1/admin/changes?tenant={tenant.name}", headers=admin.headers)
        denied = await gw.client.get("/v1/admin/changes", headers=tenant.headers)
    latest = audit.json()["data"][0]
    assert (latest["kind"], latest["action"], latest["reason"]) == ("policy", "set", "try 0.7")
    assert (latest["before"]["route_threshold"], latest["after"]["route_threshold"]) == (0.3, 0.7)
    assert latest["author"] == f"key:{admin.key_id}@{admin.name}"
    assert denied.status_code == 403


async def test_a_revoked_key_is_refused_at_once(app_factory, make_tenant, pg):
    from tollway.gateway.tenancy.keys import revoke_key

    tenant = make_tenant()
    async with app_factory(auth_cache_ttl_s=3600) as gw:
        ok = await gw.client.get("/v1/models", headers=tenant.headers)
        assert ok.status_code == 200
        async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
            assert await revoke_key(conn, tenant.key_id, author="test")
        change_id = _last_change(pg)[0]
        await asyncio.wait_for(gw.state.changes.applied(change_id), 10)
        refused = await gw.client.get("/v1/models", headers=tenant.headers)
    assert refused.status_code == 401


async def test_admin_route_with_the_database_down_is_a_503(app_factory, admin, monkeypatch):
    async with app_factory(auth_cache_ttl_s=3600) as gw:
        assert (await gw.client.get(f"/v1/admin/budgets?tenant={admin.name}", headers=admin.headers)).is_success

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise psycopg.OperationalError("connection refused")

        monkeypatch.setattr(gw.state.pool, "getconn", down)
        resp = await gw.client.get(f"/v1/admin/budgets?tenant={admin.name}", headers=admin.headers)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "store_unavailable"


# -- discovered replicas ------------------------------------------------------------------------------
@pytest.fixture
def two_sims(start_sim: Callable[..., Any]) -> Iterator[list[Any]]:
    sims = [start_sim(), start_sim()]
    yield sims
    for sim in sims:
        sim.stop()


async def test_the_same_model_discovered_on_two_upstreams_is_one_model_with_two_replicas(app_factory, make_tenant,
                                                                                         two_sims):
    tenant = make_tenant()
    first, second = two_sims
    async with app_factory(config=None, upstreams=[first.url, second.url]) as gw:
        entry = gw.state.catalog.models["sim-small"]
        assert entry.replicas == ("upstream-1", "upstream-2")
        first.stop()  # one replica dies: its breaker opens, the other answers everything
        statuses = [(await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                          json={"model": "sim-small", "messages": MSG, "max_tokens": 2})).status_code
                    for _ in range(8)]
    assert statuses == [200] * 8


# -- the spend-velocity ceiling under concurrency -------------------------------------------------------
async def test_velocity_ceiling_counts_requests_in_flight(app_factory, make_tenant, admin, ledger, start_sim,
                                                        tmp_path):
    from tollway.gateway.chat.calls import reserved_input, reserved_output
    from tollway.routing import Usage, count_messages

    slow = start_sim("--ttft-ms", "400")
    tenant = make_tenant()
    path = tmp_path / "slow.yaml"
    path.write_text(json.dumps({"upstreams": [{"name": "slow", "base_url": slow.url, "timeout_s": 10}],
                                "models": [{"name": "sim-large", "upstream": "slow",
                                            "price": {"input_per_mtok": "3", "output_per_mtok": "15"}}]}))
    body = {"model": "sim-large", "messages": MSG, "max_tokens": 20}
    async with app_factory(config=path) as gw:
        worst = gw.state.catalog.models["sim-large"].price.cost(
            Usage(input_tokens=reserved_input(count_messages(MSG)), output_tokens=reserved_output(20)))
        ceiling = worst * 4
        resp = await gw.client.put("/v1/admin/policies", headers=admin.headers, json={
            "tenant": tenant.name, "velocity_hard_usd_per_min": str(ceiling)})
        assert resp.status_code == 200
        results = await asyncio.gather(*(gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                                         json={**body, "user": f"u{i}"}) for i in range(16)))
        await gw.state.ledger.flush()
    admitted = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(admitted) + len(refused) == 16
    assert refused
    assert all(r.json()["error"]["code"] == "spend_velocity_exceeded" for r in refused)
    spent = sum(r["cost_usd"] for r in ledger("tenant_id = %s", tenant.id))
    assert spent <= ceiling + worst  # within one request's cost of the ceiling
    assert len(admitted) <= 5

