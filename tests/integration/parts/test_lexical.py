"""BM25 inside PostgreSQL (migration 0016): the term statistics kept at ingest always equal a recount from
the chunks themselves, through creates, replacements, deletes and a dropped collection; the ranking is Okapi
BM25 over them (filters included); the statistics are a tenant's own under row-level security."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from support.retrieval import KB, ingest

from tollway.retrieval import store

STATS = "SELECT term, df FROM rag_terms WHERE collection_id = %s ORDER BY term"
RECOUNT = ("SELECT u.lexeme, count(*) FROM rag_chunks c, unnest(c.tsv) u WHERE c.collection_id = %s"
           " GROUP BY 1 ORDER BY 1")
POSTINGS = "SELECT term, chunk_id, tf, len FROM rag_postings WHERE collection_id = %s ORDER BY 1, 2"
REPOSTED = ("SELECT u.lexeme, c.id, coalesce(array_length(u.positions, 1), 1), c.lex_len FROM rag_chunks c,"
            " unnest(c.tsv) u WHERE c.collection_id = %s ORDER BY 1, 2")


async def _as_tenant(conn: psycopg.AsyncConnection[Any], tenant_id: int, sql: str, *args: Any) -> list[Any]:
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE tollway_rag")
        await conn.execute("SELECT set_config('tollway.tenant_id', %s, true)", (str(tenant_id),))
        return await (await conn.execute(sql, args)).fetchall()


async def _collection_id(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str = "kb") -> int:
    rows = await _as_tenant(conn, tenant_id, "SELECT id FROM rag_collections WHERE name = %s", name)
    return int(rows[0][0])


async def _consistent(conn: psycopg.AsyncConnection[Any], tenant_id: int, cid: int) -> list[tuple[str, int]]:
    stats = await _as_tenant(conn, tenant_id, STATS, cid)
    assert stats == await _as_tenant(conn, tenant_id, RECOUNT, cid)
    assert await _as_tenant(conn, tenant_id, POSTINGS, cid) == await _as_tenant(conn, tenant_id, REPOSTED, cid)
    counters = await _as_tenant(conn, tenant_id, "SELECT lex_chunks, lex_length FROM rag_collections WHERE id = %s",
                                cid)
    recount = await _as_tenant(conn, tenant_id, "SELECT count(*), coalesce(sum(lex_len), 0) FROM rag_chunks"
                               " WHERE collection_id = %s", cid)
    assert [tuple(r) for r in counters] == [tuple(r) for r in recount]
    return [(str(t), int(d)) for t, d in stats]


async def test_term_statistics_follow_every_create_replace_and_delete(app_factory, make_tenant, pg):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw, await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        assert (await ingest(gw, tenant.headers)).status_code == 200
        cid = await _collection_id(conn, tenant.id)
        first = dict(await _consistent(conn, tenant.id, cid))
        assert first["overdraft"] >= 1 and "29" not in first
        assert first["fee"] >= 1  # the heading path is indexed with the text ("Fees > Overdraft")
        changed = dict(KB, **{"fees.md": KB["fees.md"].replace("35 dollars", "29 dollars")})
        assert (await ingest(gw, tenant.headers, docs=changed)).status_code == 200
        second = dict(await _consistent(conn, tenant.id, cid))
        assert second["29"] == 1 and "35" not in second  # the replaced document's terms left with it
        deleted = await gw.client.delete("/v1/collections/kb/documents/fees.md", headers=tenant.headers)
        assert deleted.status_code == 200, deleted.text
        third = dict(await _consistent(conn, tenant.id, cid))
        assert "overdraft" not in third and "29" not in third and third["card"] >= 1
        dropped = await gw.client.delete("/v1/collections/kb", headers=tenant.headers)
        assert dropped.status_code == 200, dropped.text
        for table in ("rag_terms", "rag_postings"):
            assert await _as_tenant(conn, tenant.id, f"SELECT count(*) FROM {table} WHERE collection_id = %s",
                                    cid) == [(0,)]


async def test_the_ranking_is_okapi_bm25_over_the_statistics(app_factory, make_tenant, pg):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw, await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        await ingest(gw, tenant.headers)
        query = "international wire fees for a car loan"
        async with store.tenant_tx(conn, tenant.id):
            coll = await store.get_collection(conn, tenant.id, "kb")
            lexical = await store.lexical_chunks(conn, coll, query, 10, None)
            # the same ranking with its chunks' rows, in one statement (a search's, while its query is embedded)
            with_rows, candidates = await store.lexical_candidates(conn, coll, query, 10, None)
            by_id = {c.chunk_id: c for c in await store.chunks_by_id(conn, [i for i, _ in lexical.scores])}
        ranked = lexical.scores
        assert with_rows == lexical and len(ranked) > 1
        assert [c.chunk_id for c in candidates] == [i for i, _ in ranked]
        assert all((c.text, c.section_id, c.heading, c.source) == (by_id[c.chunk_id].text, by_id[c.chunk_id].section_id,
                   by_id[c.chunk_id].heading, by_id[c.chunk_id].source) and (c.vector == by_id[c.chunk_id].vector).all()
                   for c in candidates)
        rows = await _as_tenant(conn, tenant.id, "SELECT c.id, c.lex_len, (SELECT array_agg(u.lexeme || ':' ||"
                                " coalesce(array_length(u.positions, 1), 1)) FROM unnest(c.tsv) u) FROM rag_chunks c"
                                " WHERE c.collection_id = %s", coll.id)
        terms = await _as_tenant(conn, tenant.id, "SELECT lexeme FROM unnest(to_tsvector('english', %s))", query)
        df = dict(await _consistent(conn, tenant.id, coll.id))
    n, avgdl = len(rows), sum(r[1] for r in rows) / len(rows)
    expected = {}
    for chunk_id, length, pairs in rows:
        tf = {p.rsplit(":", 1)[0]: int(p.rsplit(":", 1)[1]) for p in pairs}
        score = sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] * 2.2
                    / (tf[t] + 1.2 * (1 - 0.75 + 0.75 * length / avgdl)) for (t,) in terms if t in tf)
        if score:
            expected[chunk_id] = score
    assert [i for i, _ in ranked] == sorted(expected, key=lambda i: (-expected[i], i))
    assert lexical.query_terms == len(terms) and lexical.ranked_terms == len([t for (t,) in terms if t in df])
    for chunk_id, score in ranked:
        assert math.isclose(score, expected[chunk_id], rel_tol=1e-9)


async def test_a_tenant_reads_only_its_own_term_statistics(app_factory, make_tenant, pg):
    a, b = make_tenant(ingest=True), make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, a.headers)
        await ingest(gw, b.headers, docs={"other.md": "# Other\n\nZanzibar quokkas everywhere."})
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        mine = await _as_tenant(conn, b.id, "SELECT DISTINCT tenant_id FROM rag_terms UNION"
                                " SELECT DISTINCT tenant_id FROM rag_postings")
        nobody = await _as_tenant(conn, 0, "SELECT (SELECT count(*) FROM rag_terms) + (SELECT count(*) FROM rag_postings)")
        terms_of_b = {r[0] for r in await _as_tenant(conn, b.id, "SELECT term FROM rag_terms")}
    assert mine == [(b.id,)]
    assert nobody == [(0,)]
    assert "overdraft" not in terms_of_b and "quokka" in terms_of_b


async def test_the_default_search_finds_a_rare_term_that_only_bm25_can_see(app_factory, make_tenant):
    tenant = make_tenant(ingest=True)
    docs = dict(KB, **{"codes.md": "# Archive codes\n\nReference QX7731 marks the quarterly archive of branch "
                                   "statements; it is kept for seven years."})
    async with app_factory() as gw:
        await ingest(gw, tenant.headers, docs=docs)
        found = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": "QX7731", "k": 1})
        dense = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": "QX7731", "k": 1, "hybrid": False})
    assert found.status_code == 200, found.text
    assert [s["source"] for s in found.json()["sources"]] == ["codes.md"]  # fused by default
    assert dense.status_code == 200 and len(dense.json()["sources"]) == 1  # dense only: still answers


async def test_the_postings_are_read_from_the_index_alone_under_row_level_security(app_factory, make_tenant, pg):
    """Migration 0019: row-level security's tenant check reads tenant_id, so the postings' key carries it and
    BM25 reads postings by an index-only scan; without it every posting is a heap fetch (at 100k chunks a short
    query's BM25 went from p95 53 to 8 ms, bench/RESULTS.md). Scans other than the index are switched off here:
    at a test's size the planner would rightly read the small table whole."""
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw, await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        await ingest(gw, tenant.headers)
        await conn.execute("VACUUM rag_postings")  # what autovacuum does after inserts: pages all-visible
        async with store.tenant_tx(conn, tenant.id):
            coll = await store.get_collection(conn, tenant.id, "kb")
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            sql = "EXPLAIN (ANALYZE, COSTS OFF) " + store._BM25.format(join="")
            plan = [r[0] for r in await (await conn.execute(sql, {
                "text": "international wire fees for a car loan", "coll": coll.id, "terms": store.QUERY_TERMS,
                "postings": store.QUERY_POSTINGS, "k1": store.BM25_K1, "b": store.BM25_B,
                "n": 10})).fetchall()]
            found = await store.lexical_chunks(conn, coll, "international wire fees for a car loan", 10, None)
    postings = [line for line in plan if "rag_postings" in line]
    assert postings and all("Index Only Scan using rag_postings_pkey" in line for line in postings), "\n".join(plan)
    # migration 0020: the tenant is read once per statement (an InitPlan), not parsed again for every row read
    checks = [line for line in plan if "Filter: (tenant_id" in line]
    assert checks and all("InitPlan" in line and "current_setting" not in line for line in checks), "\n".join(plan)
    assert found.scores  # the same query ranks through the store's function


async def test_a_common_term_past_the_postings_budget_scores_the_rarer_terms_chunks_and_recruits_none(
        app_factory, make_tenant, pg):
    """The last term read may carry the postings past the budget: where its own postings are more than the
    budget, it adds its score to the chunks the rarer terms found, exactly as scoring every posting would, but a
    chunk holding it alone is no candidate. Where its postings fit the budget, it recruits as every term does."""
    tenant = make_tenant(ingest=True)
    docs = {f"z{i}.txt": f"zebra {'alpha ' * (i % 10 == 0)}{'filler ' * (i % 7)}note {i}" for i in range(60)}
    docs |= {f"a{i}.txt": f"{'alpha ' * (1 + i % 5)}{'filler ' * (i % 4)}other {i}" for i in range(80)}
    docs |= {f"n{i}.txt": f"neither word here, only filler {i}" for i in range(300)}  # idf: zebra 2.0, alpha 1.6
    async with app_factory() as gw, await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        items = list(docs.items())
        for part in (dict(items[:220]), dict(items[220:])):  # at most 256 documents a request
            assert (await ingest(gw, tenant.headers, "zk", docs=part)).status_code == 200
        async with store.tenant_tx(conn, tenant.id):
            coll = await store.get_collection(conn, tenant.id, "zk")
            zebra = {int(r[0]) for r in await (await conn.execute(
                "SELECT chunk_id FROM rag_postings WHERE collection_id = %s AND term = 'zebra'", (coll.id,))).fetchall()}
            exact = (await store.lexical_chunks(conn, coll, "zebra alpha", 1000, None, postings=10**9)).scores
            # zebra's 60 postings fit a budget of 70; alpha's 86 come after them and alone are more than 70
            budgeted = await store.lexical_chunks(conn, coll, "zebra alpha", 10, None, postings=70)
            # a budget of 90: alpha's 86 alone fit it, so alpha recruits (60 + 86 read, past the budget as before)
            fits = await store.lexical_chunks(conn, coll, "zebra alpha", 20, None, postings=90)
    assert len(zebra) == 60 and budgeted.ranked_terms == 2
    among_zebra = [(c, s) for c, s in exact if c in zebra][:10]
    assert [c for c, _ in budgeted.scores] == [c for c, _ in among_zebra]
    assert all(math.isclose(s, e, rel_tol=1e-9) for (_, s), (_, e) in zip(budgeted.scores, among_zebra, strict=True))
    assert any(c not in zebra for c, _ in exact[:10])  # unbudgeted, alpha-only chunks would have ranked
    assert any(c not in zebra for c, _ in fits.scores)
    assert [c for c, _ in fits.scores] == [c for c, _ in exact[:20]]
