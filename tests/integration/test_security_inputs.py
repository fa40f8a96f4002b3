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
