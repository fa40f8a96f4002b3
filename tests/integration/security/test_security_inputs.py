"""Hostile input gets a 400 in the OpenAI shape, never a 500: NUL characters in names and queries, empty
metadata filter lists, in every route that reaches the store."""

from __future__ import annotations

from typing import Any

import pytest

DOC = {"documents": [{"source": "a.md", "text": "# Fees\n\nAn overdraft costs 25 dollars per item."}]}


async def _collection(gw: Any, headers: dict[str, str]) -> None:
    assert (await gw.client.post("/v1/collections", headers=headers, json={"name": "kb"})).status_code == 201
    assert (await gw.client.post("/v1/collections/kb/documents", headers=headers, json=DOC)).status_code == 200


@pytest.mark.parametrize("path", ["/v1/collections/secrets%00", "/v1/collections/kb%00/documents",
                                  "/v1/prompts/a%00b", "/v1/collections?tenant=%00"])
async def test_a_nul_in_the_url_is_a_400(app_factory, make_tenant, path):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        resp = await gw.client.get(path, headers=tenant.headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_url"


@pytest.mark.parametrize("body", [
    {"collection": "kb", "query": "fees\x00", "hybrid": True},
    {"collection": "kb\x00", "query": "fees"},
    {"collection": "kb", "query": "fees", "filters": {"team": []}},
    {"collection": "kb", "query": "fees", "filters": {"team": ["a\x00"]}},
    {"collection": "kb", "query": "fees", "filters": {"team": {"$ne": 1}}},
    {"collection": "kb", "query": "fees", "filters": {"": "x"}},
])
async def test_hostile_searches_are_400s(app_factory, make_tenant, body):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await _collection(gw, tenant.headers)
        resp = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("retrieval", [
    {"collection": "kb", "filters": {"team": []}},
    {"collection": "kb", "query": "fees\x00", "hybrid": True},
    {"collection": "kb\x00"},
])
async def test_hostile_retrieval_in_chat_is_a_400_that_costs_nothing(app_factory, make_tenant, ledger, retrieval):
    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await _collection(gw, tenant.headers)
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": [{"role": "user", "content": "fees?"}], "retrieval": retrieval})
        await gw.state.ledger.flush()
    assert resp.status_code == 400, resp.text
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["cost_usd"] == 0


async def test_ids_are_opaque_and_another_tenants_are_unknown(app_factory, make_tenant):
    import re

    a, b = make_tenant(ingest=True), make_tenant(ingest=True)
    async with app_factory() as gw:
        await _collection(gw, a.headers)
        await _collection(gw, b.headers)
        mine = (await gw.client.get("/v1/collections/kb/documents", headers=a.headers)).json()["data"][0]["id"]
        theirs = (await gw.client.get("/v1/collections/kb/documents", headers=b.headers)).json()["data"][0]["id"]
        found = (await gw.client.post("/v1/retrieval/search", headers=a.headers,
                                      json={"collection": "kb", "query": "overdraft"})).json()["sources"][0]
        cross = await gw.client.delete(f"/v1/collections/kb/documents/{theirs}", headers=a.headers)
        wrong_kind = await gw.client.delete(f"/v1/collections/kb/documents/{found['chunk_id']}", headers=a.headers)
        by_source = await gw.client.delete("/v1/collections/kb/documents/a.md", headers=a.headers)
    assert re.fullmatch(r"doc_[0-9a-f]{16}", mine)
    assert found["document_id"] == mine
    assert re.fullmatch(r"sec_[0-9a-f]{16}", found["section_id"])
    assert re.fullmatch(r"chk_[0-9a-f]{16}", found["chunk_id"])
    assert cross.status_code == 404
    assert wrong_kind.status_code == 404  # a chunk's id names no document
    assert by_source.status_code == 200
    assert by_source.json()["id"] == mine


def test_consecutive_rows_get_unrelated_ids():
    from tollway.publicids import PublicIds

    ids = PublicIds(b"s" * 32)
    encoded = [ids.encode("doc", n) for n in range(1000, 1010)]
    assert [ids.decode("doc", e) for e in encoded] == list(range(1000, 1010))
    assert len({e[4:8] for e in encoded}) > 5  # no shared prefix that would order them
    assert ids.decode("run", encoded[0]) is None
