"""Retrieval against the real embedded PostgreSQL + pgvector, the local embedder and the scripted upstream:
tenant isolation enforced by PostgreSQL, ingestion (idempotent, replaced in one transaction, bad input),
packing within the budget, citations that resolve to stored text, RAG inside chat (JSON and stream) with its
side row and index version, the response cache keyed by the index version, and who may do what."""

from __future__ import annotations

import asyncio
import io
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from support import sse_payloads as sse
from support.config import write_config

from tollway.publicids import load_public_ids
from tollway.retrieval import LOCAL_NAME
from tollway.routing import count_text

KB = {
    "fees.md": "# Fees\n\n## Overdraft\n\nAn overdraft costs 35 dollars per item, at most three items a day. "
               "The fee is waived when the balance is restored within 24 hours.\n\n## Wire transfers\n\n"
               "Outgoing domestic wires cost 25 dollars; international wires cost 45 dollars.",
    "cards.md": "# Cards\n\n## Lost or stolen cards\n\nFreeze the card in the app at once, then order a "
                "replacement; it arrives in five business days, or two with express shipping for 15 dollars.\n\n"
                "## Travel notice\n\nTell the bank before travelling abroad so that card payments are not declined.",
    "loans.html": "<html><head><title>Loans</title><script>var x = 1;</script></head><body><h1>Loans</h1>"
                  "<h2>Mortgage rates</h2><p>A 30-year fixed mortgage is offered at 6.1 percent APR.</p>"
                  "<h2>Car loans</h2><p>Car loans run for up to 72 months at 7.4 percent APR.</p></body></html>",
}
ASK = "How much does an overdraft cost?"


async def ingest(gw: Any, headers: dict[str, str], collection: str = "kb", docs: dict[str, str] | None = None,
                 **extra: Any) -> Any:
    await gw.client.post("/v1/collections", headers=headers, json={"name": collection, **extra})
    body = {"documents": [{"source": k, "text": v} for k, v in (docs or KB).items()]}
    return await gw.client.post(f"/v1/collections/{collection}/documents", headers=headers, json=body)




# -- isolation: PostgreSQL's, not a WHERE clause's ---------------------------------------------------
async def test_row_level_security_hides_other_tenants_from_queries_without_a_tenant_filter(app_factory, make_tenant,
                                                                                            pg):
    a, b = make_tenant(ingest=True), make_tenant(ingest=True)
    async with app_factory() as gw:
        assert (await ingest(gw, a.headers)).status_code == 200
        assert (await ingest(gw, b.headers, docs={"other.md": "# Other\n\nSomething else entirely."})).status_code == 200
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        cur = await conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'tollway_rag'")
        assert await cur.fetchone() == (False, False)
        counts = {}
        for tenant in (a, b, None):
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE tollway_rag")
                if tenant is not None:
                    await conn.execute("SELECT set_config('tollway.tenant_id', %s, true)", (str(tenant.id),))
                # no tenant in any WHERE clause: row-level security alone decides
                cur = await conn.execute("SELECT DISTINCT tenant_id FROM rag_chunks UNION "
                                         "SELECT tenant_id FROM rag_documents UNION SELECT tenant_id FROM rag_collections")
                counts[tenant.name if tenant else None] = sorted(r[0] for r in await cur.fetchall())
        assert counts == {a.name: [a.id], b.name: [b.id], None: []}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor can it write into another tenant
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE tollway_rag")
                await conn.execute("SELECT set_config('tollway.tenant_id', %s, true)", (str(a.id),))
                await conn.execute("UPDATE rag_collections SET revision = 0 WHERE tenant_id = %s", (b.id,))
                await conn.execute("INSERT INTO rag_collections (tenant_id, name, embedder, dims, chunk_tokens,"
                                   " chunk_overlap, section_tokens) VALUES (%s, 'x', 'e', 3, 100, 0, 100)", (b.id,))


async def test_a_tenant_cannot_reach_another_tenants_collection(app_factory, make_tenant, admin):
    a, b = make_tenant(ingest=True), make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, a.headers)
        search = {"collection": "kb", "query": ASK}
        theirs = await gw.client.post("/v1/retrieval/search", headers=b.headers, json=search)
        named = await gw.client.post("/v1/retrieval/search", headers=b.headers, json={**search, "tenant": a.name})
        as_admin = await gw.client.post("/v1/retrieval/search", headers=admin.headers, json={**search, "tenant": a.name})
        chat = await gw.client.post("/v1/chat/completions", headers=b.headers, json={
            "model": "sim-large", "messages": [{"role": "user", "content": ASK}], "retrieval": {"collection": "kb"}})
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "collection_not_found"
    assert named.status_code == 403
    assert named.json()["error"]["code"] == "tenant_not_allowed"
    assert as_admin.status_code == 200
    assert as_admin.json()["sources"]
    assert chat.status_code == 404
    assert chat.json()["error"]["code"] == "collection_not_found"
    assert chat.json()["error"]["param"] == "retrieval.collection"


# -- ingestion -----------------------------------------------------------------------------------
async def test_reingesting_is_a_noop_and_a_change_replaces_the_document(app_factory, make_tenant, ledger):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        first = await ingest(gw, tenant.headers)
        again = await ingest(gw, tenant.headers)
        changed = dict(KB, **{"fees.md": KB["fees.md"].replace("35 dollars", "29 dollars")})
        third = await ingest(gw, tenant.headers, docs=changed)
        listing = await gw.client.get("/v1/collections/kb/documents", headers=tenant.headers)
        await gw.state.ledger.flush()
    assert first.status_code == 200, first.text
    assert [d["status"] for d in first.json()["data"]] == ["created"] * 3
    assert [d["status"] for d in again.json()["data"]] == ["unchanged"] * 3
    assert again.json()["index_version"] == first.json()["index_version"]  # nothing changed, nothing moved
    assert again.json()["usage"]["prompt_tokens"] == 0  # nothing embedded
    assert [d["status"] for d in third.json()["data"]] == ["replaced", "unchanged", "unchanged"]
    assert third.json()["index_version"] != first.json()["index_version"]
    assert third.json()["index_version"].endswith("+" + LOCAL_NAME)
    old_id, new_id = first.json()["data"][0]["id"], third.json()["data"][0]["id"]
    docs = listing.json()["data"]
    assert len(docs) == 3
    assert old_id not in {d["id"] for d in docs}
    assert new_id in {d["id"] for d in docs}
    rows = ledger("tenant_id = %s AND endpoint = 'ingest'", tenant.id)
    assert [r["input_tokens"] > 0 for r in rows] == [True, False, True]
    assert {(r["model"], r["cost_usd"], r["status"]) for r in rows} == {(LOCAL_NAME, 0, 200)}


async def test_readers_never_see_half_a_document_while_writers_replace_it(app_factory, make_tenant, pg):
    tenant = make_tenant(ingest=True)
    versions = {n: "# Policy\n\n" + "\n\n".join(f"## Part {i}\n\nVersion {n} says rule {i} holds for everyone."
                                                 for i in range(n)) for n in (3, 7)}
    seen: list[frozenset[str]] = []
    stop = asyncio.Event()

    async def read() -> None:
        async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
            while not stop.is_set():
                async with conn.transaction():
                    await conn.execute("SET LOCAL ROLE tollway_rag")
                    await conn.execute("SELECT set_config('tollway.tenant_id', %s, true)", (str(tenant.id),))
                    cur = await conn.execute("SELECT k.text FROM rag_chunks k JOIN rag_documents d ON d.id = k.document_id"
                                             " WHERE d.source = 'policy.md'")
                    seen.append(frozenset(r[0] for r in await cur.fetchall()))
                await asyncio.sleep(0)

    async with app_factory() as gw:
        await ingest(gw, tenant.headers, docs={"policy.md": versions[3]})
        reader = asyncio.create_task(read())
        for n in (7, 3, 7, 3, 7):
            writes = [ingest(gw, tenant.headers, docs={"policy.md": versions[m]}) for m in (n, 10 - n)]
            assert all(r.status_code == 200 for r in await asyncio.gather(*writes))
        stop.set()
        await reader
    whole = {n: frozenset(t for t in seen if f"Version {n} " in next(iter(t), "")) for n in (3, 7)}
    assert seen and all(len(s) in (3, 7) for s in seen)  # every snapshot is one whole version
    assert all(all(f"Version {len(s)} " in t for t in s) for s in seen)
    assert whole[3]
    assert whole[7]


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"documents": [{"source": "empty.md", "text": "   \n "}]}, 400, "invalid_document"),
    ({"documents": [{"source": "bin.txt", "text": "abc\u0000def"}]}, 400, "invalid_document"),
    ({"documents": [{"source": "ok.md", "text": "# fine"}, {"source": "empty.md", "text": ""}]}, 400,
     "invalid_document"),
    ({"documents": [{"source": "a.md", "text": "x"}, {"source": "a.md", "text": "y"}]}, 400, "invalid_document"),
    ({"documents": []}, 400, "invalid_request"),
    ({"documents": [{"text": "x", "format": "pdf"}]}, 400, "invalid_request"),
    ({"documents": [{"text": "x", "colour": "blue"}]}, 400, "invalid_request"),
])
async def test_bad_documents_are_refused_and_write_nothing(app_factory, make_tenant, ledger, body, status, code):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb"})
        resp = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers, json=body)
        listing = await gw.client.get("/v1/collections/kb/documents", headers=tenant.headers)
        await gw.state.ledger.flush()
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert listing.json()["data"] == []
    assert all(r["cost_usd"] == 0 for r in ledger("tenant_id = %s", tenant.id))


async def test_oversized_binary_and_unknown_targets_get_clear_errors(app_factory, make_tenant):
    tenant = make_tenant(ingest=True)
    async with app_factory(max_document_tokens=50, max_body_bytes=64 * 1024) as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb"})
        long = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers,
                                    json={"source": "long.txt", "text": "word " * 500})
        huge = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers,
                                    json={"source": "huge.txt", "text": "word " * 20_000})
        binary = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers,
                                      files={"file": ("blob.txt", io.BytesIO(b"\x89PNG\r\n\x1a\n\x00\x00"))})
        unknown = await gw.client.post("/v1/collections/nope/documents", headers=tenant.headers,
                                       json={"source": "a.md", "text": "# hi"})
        dup = await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb"})
        bad_name = await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "no spaces"})
        gone = await gw.client.delete("/v1/collections/kb/documents/999999999", headers=tenant.headers)
        not_json = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers, content=b"{nope")
        listing = await gw.client.get("/v1/collections/kb/documents", headers=tenant.headers)
    assert (long.status_code, long.json()["error"]["code"]) == (413, "payload_too_large")
    assert (huge.status_code, huge.json()["error"]["code"]) == (413, "payload_too_large")
    assert (binary.status_code, binary.json()["error"]["code"]) == (400, "invalid_document")
    assert "binary" in binary.json()["error"]["message"]
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "collection_not_found")
    assert (dup.status_code, dup.json()["error"]["code"]) == (409, "collection_exists")
    assert bad_name.status_code == 400
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "document_not_found")
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_json")
    assert listing.json()["data"] == []


async def test_multipart_upload_and_delete(app_factory, make_tenant):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb"})
        resp = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers,
                                    data={"metadata": '{"team": "support"}'},
                                    files=[("file", ("cards.md", KB["cards.md"].encode())),
                                           ("file", ("loans.html", KB["loans.html"].encode()))])
        assert resp.status_code == 200, resp.text
        [cards, loans] = resp.json()["data"]
        filtered = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": "mortgage rate", "filters": {"team": "support"}})
        excluded = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": "mortgage rate", "filters": {"team": ["sales", "legal"]}})
        deleted = await gw.client.delete(f"/v1/collections/kb/documents/{loans['id']}", headers=tenant.headers)
        after = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": "mortgage rate", "k": 20, "context_tokens": 4000})
        listing = await gw.client.get("/v1/collections", headers=tenant.headers)
    assert (cards["sections"], cards["status"]) == (2, "created")  # its two subsections (the title has no text)
    assert filtered.json()["sources"][0]["source"] == "loans.html"
    assert "6.1 percent" in filtered.json()["sources"][0]["text"]
    assert "var x" not in filtered.json()["context"]
    assert excluded.json()["sources"] == []
    assert excluded.json()["context"] == ""
    assert deleted.json()["index_version"] != resp.json()["index_version"]
    assert {s["source"] for s in after.json()["sources"]} == {"cards.md"}
    [kb] = listing.json()["data"]
    assert (kb["documents"], kb["embedder"]) == (1, LOCAL_NAME)


# -- search and packing --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hierarchical", "flat"])
@pytest.mark.parametrize("hybrid", [False, True])
async def test_packing_never_exceeds_the_budget_and_citations_resolve(app_factory, make_tenant, pg, mode, hybrid):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, tenant.headers, chunk_tokens=24, chunk_overlap=6)
        results = {}
        for budget in (1, 30, 60, 120, 250, 600):
            resp = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
                "collection": "kb", "query": ASK, "context_tokens": budget, "k": 10, "mode": mode, "hybrid": hybrid})
            assert resp.status_code == 200, resp.text
            results[budget] = resp.json()
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        cur = await conn.execute("SELECT id, text, document_id, section_id FROM rag_chunks WHERE tenant_id = %s",
                                 (tenant.id,))
        ids = await load_public_ids(conn)  # the API's ids are the rows' numbers through a keyed permutation
        stored = {ids.encode("chk", r[0]): (r[1], ids.encode("doc", r[2]), ids.encode("sec", r[3]))
                  for r in await cur.fetchall()}
    assert results[1]["sources"] == []
    assert results[1]["context_tokens_used"] == 0
    for budget, found in results.items():
        used = found["context_tokens_used"]
        assert used <= budget
        if found["context"]:
            assert used == count_text(found["context"]) + 4  # the system message, framing included
        for s in found["sources"]:
            texts = [stored[c][0] for c in s["chunk_ids"]]
            assert all(stored[c][1:] == (s["document_id"], s["section_id"]) for c in s["chunk_ids"])
            if s.get("truncated"):  # the budget's remainder: the leading sentences of one chunk
                assert len(texts) == 1
                assert texts[0].startswith(s["text"].removesuffix(" …"))
            else:
                assert all(t in s["text"] for t in (texts[0][:40], texts[-1][-40:]))  # merged, overlap once
            # in the context under its citation (the header names the section, so its heading line goes)
            assert f"[{s['n']}]" in found["context"]
            assert s["text"][-30:] in found["context"]
    best = results[600]["sources"][0]
    assert best["source"] == "fees.md"
    assert "35 dollars" in best["text"]
    assert len(results[600]["sources"]) > len(results[60]["sources"]) or mode == "hierarchical"


# -- RAG inside chat -------------------------------------------------------------------------------
async def test_rag_chat_injects_context_and_returns_sources(app_factory, make_tenant, ledger, sim):
    import httpx

    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, tenant.headers)
        body = {"model": "sim-large", "max_tokens": 5, "temperature": 0.7,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}],
                "retrieval": {"collection": "kb", "context_tokens": 200}}
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        async with httpx.AsyncClient() as plain:
            sent = (await plain.get(sim.url.removesuffix("/v1") + "/sim/last-request",
                                    params={"model": "sim-large"})).json()
        streamed = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={**body, "stream": True})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    info = resp.json()["tollway"]["retrieval"]
    assert info["collection"] == "kb"
    assert info["index_version"] == resp.headers["x-tollway-index-version"]
    assert info["sources"][0]["source"] == "fees.md"
    assert 0 < info["context_tokens"] <= 200
    # the system prompt first, then the context, then the question; Tollway's field never goes upstream
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert "35 dollars" in sent["messages"][1]["content"]
    assert "[1]" in sent["messages"][1]["content"]
    assert "retrieval" not in sent
    final = sse(streamed.text)[-1]
    assert final["tollway"]["retrieval"]["sources"] == info["sources"]
    rows = ledger("request_id IN (%s, %s)", resp.headers["x-request-id"],
                  resp.headers["x-request-id"] + ".r1")
    answer, side = rows if rows[0]["role"] == "answer" else rows[::-1]
    assert (answer["index_version"], answer["role"]) == (info["index_version"], "answer")
    assert (side["role"], side["model"], side["cost_usd"], side["status"]) == ("retrieval", LOCAL_NAME, 0, 200)
    assert side["input_tokens"] > 0
    # the reservation counted the budget: the prompt as sent stayed within what was planned
    assert answer["input_tokens"] <= 200 + 40


async def test_rag_answers_from_a_catalog_embedder_and_meter_it(app_factory, make_tenant, ledger):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        made = await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "remote",
                                                                                     "embedder": "sim-embed"})
        assert made.status_code == 201, made.text
        assert (made.json()["embedder"], made.json()["dims"]) == ("sim-embed", 16)
        docs = await gw.client.post("/v1/collections/remote/documents", headers=tenant.headers,
                                    json={"documents": [{"source": k, "text": v} for k, v in KB.items()]})
        chat = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": ASK}],
            "retrieval": {"collection": "remote", "context_tokens": 150}})
        await gw.state.ledger.flush()
    assert docs.status_code == 200
    assert float(docs.json()["usage"]["cost_usd"]) > 0
    assert chat.status_code == 200
    assert chat.json()["tollway"]["retrieval"]["sources"]
    [side] = ledger("request_id = %s", chat.headers["x-request-id"] + ".r1")
    assert (side["model"], side["role"]) == ("sim-embed", "retrieval")
    assert side["cost_usd"] > 0
    [ingested] = ledger("request_id = %s", docs.headers["x-request-id"])
    assert ingested["cost_usd"] == Decimal(docs.json()["usage"]["cost_usd"])


@pytest.mark.parametrize("on_failure", ["fail", "answer"])
async def test_a_failing_retrieval_follows_the_request_policy(app_factory, make_tenant, ledger, tmp_path,
                                                             sim, on_failure):
    tenant = make_tenant(ingest=True)
    config = write_config(tmp_path / "c.yaml", sim.url, extra_models=[
        {"name": "flaky-embed", "upstream": "sim", "upstream_model": "sim-embed", "kind": "embedding",
         "price": {"input_per_mtok": "0.02"}}])
    async with app_factory(config=config) as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb", "embedder": "flaky-embed"})
        await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers, json={"text": KB["fees.md"]})
    config = write_config(tmp_path / "c2.yaml", sim.url, extra_models=[
        {"name": "flaky-embed", "upstream": "sim", "upstream_model": "sim-error", "kind": "embedding",
         "price": {"input_per_mtok": "0.02"}}])
    async with app_factory(config=config) as gw:  # the same model now fails
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": ASK}],
            "retrieval": {"collection": "kb", "on_failure": on_failure}})
        await gw.state.ledger.flush()
    rows = {r["role"]: r for r in ledger("request_id LIKE %s", resp.headers["x-request-id"] + "%")}
    assert rows["retrieval"]["status"] >= 500
    assert rows["retrieval"]["cost_usd"] == 0
    if on_failure == "fail":
        assert resp.status_code >= 500
        assert resp.json()["error"]["type"] == "api_error"
        assert rows["answer"]["status"] == resp.status_code
        assert rows["answer"]["cost_usd"] == 0
    else:
        assert resp.status_code == 200
        info = resp.json()["tollway"]["retrieval"]
        assert info["sources"] == []
        assert info["error"] == rows["retrieval"]["error_code"]
        assert rows["answer"]["status"] == 200


async def test_the_response_cache_never_serves_an_answer_grounded_in_old_text(app_factory, make_tenant):
    tenant = make_tenant(ingest=True)
    body = {"model": "sim-small", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": ASK}],
            "retrieval": {"collection": "kb", "context_tokens": 200}}
    async with app_factory() as gw:
        await ingest(gw, tenant.headers)
        first = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        second = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        await ingest(gw, tenant.headers, docs={"fees.md": KB["fees.md"].replace("35", "29")})
        third = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
        fourth = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
    assert "x-tollway-cache" not in first.headers
    assert second.headers.get("x-tollway-cache") == "hit"
    assert "x-tollway-cache" not in third.headers
    assert fourth.headers.get("x-tollway-cache") == "hit"
    assert third.headers["x-tollway-index-version"] != first.headers["x-tollway-index-version"]
    # a hit still says which index version grounded it (its sources are not kept with the answer)
    assert fourth.headers["x-tollway-index-version"] == third.headers["x-tollway-index-version"]
    assert fourth.json()["tollway"]["retrieval"]["cached"] is True


@pytest.mark.parametrize(("retrieval", "param"), [
    ("kb", "retrieval"),
    ({"collection": "kb", "context_tokens": 0}, "retrieval.context_tokens"),
    ({"collection": "kb", "context_tokens": 10 ** 6}, "retrieval.context_tokens"),
    ({"collection": "kb", "mode": "sideways"}, "retrieval.mode"),
    ({"collection": "kb", "colour": "red"}, "retrieval.colour"),
    ({}, "retrieval.collection"),
])
async def test_a_bad_retrieval_object_is_a_400_that_costs_nothing(app_factory, make_tenant, ledger, retrieval, param):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": [{"role": "user", "content": ASK}], "retrieval": retrieval})
        await gw.state.ledger.flush()
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert [(r["status"], r["cost_usd"]) for r in ledger("tenant_id = %s", tenant.id)] == [(400, 0)]


# -- who may do what -------------------------------------------------------------------------------
async def test_roles(app_factory, make_tenant, admin):
    owner = make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, owner.headers)
        keys = {}
        for role, ingest_flag in (("app", False), ("finance", False), ("prompt_engineer", False)):
            made = await gw.client.post("/v1/admin/keys", headers=admin.headers,
                                        json={"tenant": owner.name, "role": role, "ingest": ingest_flag})
            assert made.status_code == 201, made.text
            keys[role] = {"authorization": f"Bearer {made.json()['key']}"}
        refused = await gw.client.post("/v1/admin/keys", headers=admin.headers,
                                       json={"tenant": owner.name, "role": "finance", "ingest": True})
        by_app = await gw.client.post("/v1/admin/keys", headers=owner.headers, json={"tenant": owner.name})
        search = {"collection": "kb", "query": ASK}
        out = {role: (await gw.client.post("/v1/retrieval/search", headers=h, json=search)).status_code
               for role, h in keys.items()}
        writes = {role: (await gw.client.post("/v1/collections/kb/documents", headers=h,
                                              json={"source": "n.md", "text": "# New"})).status_code
                  for role, h in keys.items()}
        finance_list = await gw.client.get("/v1/collections/kb/documents", headers=keys["finance"])
        admin_write = await gw.client.post("/v1/collections/kb/documents", headers=admin.headers,
                                           json={"source": "n.md", "text": "# New", "tenant": owner.name})
    assert out == {"app": 200, "finance": 403, "prompt_engineer": 200}
    assert writes == {"app": 403, "finance": 403, "prompt_engineer": 403}
    assert finance_list.status_code == 403
    assert refused.status_code == 400
    assert by_app.status_code == 403
    assert admin_write.status_code == 200
    assert admin_write.json()["data"][0]["status"] == "created"
