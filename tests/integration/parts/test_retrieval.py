"""Retrieval's store against the real embedded PostgreSQL + pgvector and the local embedder: tenant isolation
enforced by PostgreSQL, ingestion (idempotent, replaced in one transaction, bad input, multipart, delete)."""

from __future__ import annotations

import asyncio
import io

import psycopg
import pytest
from support.retrieval import ASK, KB, ingest

from tollway.retrieval import LOCAL_NAME


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
                                         "SELECT tenant_id FROM rag_documents UNION SELECT tenant_id FROM rag_collections"
                                         " UNION SELECT tenant_id FROM rag_terms")
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
    assert third.json()["index_version"].endswith("+" + LOCAL_NAME + "+c200o32s1024w240")
    old_id, new_id = first.json()["data"][0]["id"], third.json()["data"][0]["id"]
    docs = listing.json()["data"]
    assert len(docs) == 3
    assert old_id not in {d["id"] for d in docs}
    assert new_id in {d["id"] for d in docs}
    rows = ledger("tenant_id = %s AND endpoint = 'ingest'", tenant.id)
    assert [r["input_tokens"] > 0 for r in rows] == [True, False, True]
    assert {(r["model"], r["cost_usd"], r["status"]) for r in rows} == {(LOCAL_NAME, 0, 200)}


async def test_short_documents_are_one_chunk_and_new_settings_apply_to_what_is_reingested(app_factory, make_tenant,
                                                                                           pg):
    """Every document of the knowledge base is short: one chunk each under the default settings, split by its
    headings with ``whole_tokens: 0``. A settings change (here written as a later migration would) applies to
    the documents re-ingested after it: the same text is split anew, and the index version names it."""
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        whole = await ingest(gw, tenant.headers)
        split = await ingest(gw, tenant.headers, collection="split", whole_tokens=0)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("UPDATE rag_collections SET whole_tokens = 0 WHERE tenant_id = %s AND name = 'kb'",
                         (tenant.id,))
        again = await ingest(gw, tenant.headers)
        hit = await gw.client.post("/v1/retrieval/search", headers=tenant.headers,
                                   json={"collection": "kb", "query": "wire transfers international"})
    assert [d["chunks"] for d in whole.json()["data"]] == [1, 1, 1]
    assert all(d["chunks"] > 1 for d in split.json()["data"])
    assert whole.json()["index_version"].endswith("w240")
    assert [d["status"] for d in again.json()["data"]] == ["replaced"] * 3  # the same text, split anew
    assert [d["chunks"] for d in again.json()["data"]] == [d["chunks"] for d in split.json()["data"]]
    assert again.json()["index_version"].endswith("w0")
    assert hit.json()["sources"][0]["heading"].endswith("Wire transfers")  # BM25 reads the new chunks


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
        await ingest(gw, tenant.headers, docs={"policy.md": versions[3]}, whole_tokens=0)  # a chunk per part
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
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb", "whole_tokens": 0})
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
