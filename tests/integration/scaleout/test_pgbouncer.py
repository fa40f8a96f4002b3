"""PostgreSQL behind Debian's PgBouncer in transaction mode, as many operators run it: with
`TOLLWAY_DATABASE_POOLER=transaction` the gateway's pool prepares no statement, and LISTEN, the advisory
locks and the migrations go to `TOLLWAY_DATABASE_DIRECT_URL`; a change made on one gateway reaches another
at once."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from support.pgbouncer import start_pgbouncer
from support.retrieval import ASK as QUESTION
from support.retrieval import ingest

from tollway.settings import Settings

ASK = {"model": "sim-small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@pytest.fixture
def bouncer(pg, tmp_path):
    server = start_pgbouncer(pg.url, tmp_path / "pgbouncer", pool_size=4)
    yield server
    server.stop()


async def test_prepared_statements_break_behind_a_transaction_pooler_unless_the_setting_says_so(bouncer, pg):
    """Why the setting exists: psycopg prepares a query run five times on a connection, and the pooler hands
    the server session holding it to other clients (here four sessions for eight connections)."""

    async def run(kwargs: dict[str, object]) -> list[BaseException | None]:
        async with AsyncConnectionPool(bouncer.url, min_size=8, max_size=8, open=False, kwargs=kwargs) as pool:
            async def one(i: int) -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT count(*) FROM tenants WHERE id > %s", (i,))

            return await asyncio.gather(*(one(i) for i in range(400)), return_exceptions=True)

    plain = await run({})
    pooled = await run(Settings(database_url=bouncer.url, database_pooler="transaction",
                                database_direct_url=pg.url).pool_kwargs)
    assert any(isinstance(e, psycopg.errors.DuplicatePreparedStatement | psycopg.errors.InvalidSqlStatementName)
               for e in plain)
    assert pooled == [None] * 400


def test_the_pooler_setting_needs_a_direct_url():
    with pytest.raises(ValueError, match="TOLLWAY_DATABASE_DIRECT_URL"):
        Settings(database_url="postgresql://x@127.0.0.1:6432/db", database_pooler="transaction")


async def test_the_gateway_behind_pgbouncer_serves_repeated_queries_and_hears_changes_at_once(
        app_factory, bouncer, pg, make_tenant, admin, ledger):
    tenant = make_tenant(ingest=True)
    behind = {"database_url": bouncer.url, "database_pooler": "transaction", "database_direct_url": pg.url,
              "policy_cache_ttl_s": 600.0}
    async with app_factory(**behind) as one, app_factory(**behind) as other:
        # searches one after another (each the process's only one: its sections read on a second pooled
        # connection, a transaction of its own through the pooler) and at once, the same statements again
        assert (await ingest(one, tenant.headers)).status_code == 200
        search = {"collection": "kb", "query": QUESTION}
        alone = [await one.client.post("/v1/retrieval/search", headers=tenant.headers, json=search) for _ in range(8)]
        together = await asyncio.gather(*(one.client.post("/v1/retrieval/search", headers=tenant.headers,
                                                          json=search) for _ in range(8)))
        chats = await asyncio.gather(*(one.client.post("/v1/chat/completions", headers=tenant.headers, json={
            **ASK, "messages": [{"role": "user", "content": f"hello {i}"}]}) for i in range(40)))
        # the report's queries, the same statements over and over on every pooled connection
        reports = await asyncio.gather(*(one.client.get("/v1/reports/costs", headers=admin.headers,
                                                        params={"tenant": tenant.name}) for _ in range(60)))
        assert (await other.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)).status_code == 200
        # a budget set on one gateway: the other hears it through LISTEN on the direct URL (its rules are
        # cached for 10 minutes, so only the change channel can tell it)
        made = await one.client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": tenant.name, "window": "day", "limit_tokens": 1})
        assert made.status_code == 200, made.text
        refused = None
        for _ in range(40):
            resp = await other.client.post("/v1/chat/completions", headers=tenant.headers, json={
                **ASK, "messages": [{"role": "user", "content": f"after {_}"}]})
            if resp.status_code == 429:
                refused = resp
                break
            await asyncio.sleep(0.05)
        await one.state.ledger.flush()
    assert [r.status_code for r in alone + together] == [200] * 16, [r.text for r in alone + together][:1]
    assert all(r.json()["sources"] == alone[0].json()["sources"] != [] for r in alone + together)
    assert [r.status_code for r in chats] == [200] * 40
    assert [r.status_code for r in reports] == [200] * 60, [r.text for r in reports if r.status_code != 200][:1]
    assert refused is not None and refused.json()["error"]["code"] == "insufficient_quota"
    assert len(ledger("tenant_id = %s AND role = 'answer' AND status = 200", tenant.id)) >= 41
