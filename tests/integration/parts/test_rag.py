"""Retrieval in use, against the real embedded PostgreSQL + pgvector, the local embedder and the scripted
upstream: packing within the budget, citations that resolve to stored text, RAG inside chat (JSON and
stream) with its side row and index version, the response cache keyed by the index version, and who may
do what."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from support import sse_payloads as sse
from support.config import write_config
from support.pool import checked_out
from support.retrieval import ASK, KB, ingest

from tollway.publicids import load_public_ids
from tollway.retrieval import LOCAL_NAME
from tollway.routing import count_text


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


async def test_a_query_taken_from_a_long_message_is_cut_like_a_given_one(app_factory, make_tenant, ledger):
    """Without ``retrieval.query`` the last user message is the query, cut to the 32,000 characters a given
    query may hold: the embedder is sent (and the ledger charges) that much, never the whole message."""
    from tollway.routing import count_text

    tenant = make_tenant(ingest=True)
    long = " ".join(f"{w} interest rates" for w in range(12_000))  # ~200,000 characters
    async with app_factory() as gw:
        made = await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "remote",
                                                                                     "embedder": "sim-embed"})
        assert made.status_code == 201, made.text
        await gw.client.post("/v1/collections/remote/documents", headers=tenant.headers,
                             json={"documents": [{"source": k, "text": v} for k, v in KB.items()]})
        chat = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": long}],
            "retrieval": {"collection": "remote", "context_tokens": 150}})
        await gw.state.ledger.flush()
    assert chat.status_code == 200, chat.text
    [side] = ledger("request_id = %s", chat.headers["x-request-id"] + ".r1")
    assert 0 < side["input_tokens"] <= count_text(long[:32_000]) < count_text(long) / 5


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


async def test_an_answer_made_without_its_retrieval_is_not_cached(app_factory, make_tenant, tmp_path, sim):
    """A deterministic chat with retrieval is cached under its collection's index version. One answered
    without its context (the search failed and the request says answer anyway), or from the fused order where
    the reranker it asked for failed, is not: once they work again the same request is answered from its
    context, never from an answer the cache kept from the outage."""
    tenant = make_tenant(ingest=True)

    def config(name: str, embed: str) -> Any:
        return write_config(tmp_path / name, sim.url, extra_models=[
            {"name": "flaky-embed", "upstream": "sim", "upstream_model": embed, "kind": "embedding",
             "price": {"input_per_mtok": "0.02"}},
            {"name": "broken-rerank", "upstream": "sim", "upstream_model": "sim-error", "kind": "rerank",
             "price": {"input_per_mtok": "2"}}])

    body = {"model": "sim-small", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": ASK}],
            "retrieval": {"collection": "kb", "context_tokens": 600, "on_failure": "answer"}}
    reranked = {**body, "retrieval": {"collection": "kb", "context_tokens": 600, "rerank": "broken-rerank"}}
    async with app_factory(config=config("good.yaml", "sim-embed")) as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "kb", "embedder": "flaky-embed"})
        written = await gw.client.post("/v1/collections/kb/documents", headers=tenant.headers,
                                       json={"text": KB["fees.md"]})
        assert written.status_code == 200, written.text
        unranked = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=reranked)
                    for _ in range(2)]
    async with app_factory(config=config("bad.yaml", "sim-error")) as gw:  # the embedder fails
        failed = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body) for _ in range(2)]
    async with app_factory(config=config("good.yaml", "sim-embed")) as gw:  # and works again
        grounded = [await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=body)
                    for _ in range(2)]
    assert [r.status_code for r in unranked + failed + grounded] == [200] * 6
    assert all(r.json()["tollway"]["retrieval"].get("rerank_error") for r in unranked)
    assert "x-tollway-cache" not in unranked[1].headers
    assert all(r.json()["tollway"]["retrieval"].get("error") for r in failed)
    assert "x-tollway-cache" not in failed[1].headers
    assert "x-tollway-cache" not in grounded[0].headers  # not the outage's answer
    assert grounded[0].json()["tollway"]["retrieval"]["sources"], str(grounded[0].json()["tollway"]["retrieval"]) + str(unranked[0].json()["tollway"]["retrieval"])
    assert grounded[1].headers.get("x-tollway-cache") == "hit"  # a grounded answer is cached as before


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


async def test_rag_through_the_other_apis_as_an_extra_field(app_factory, make_tenant, sim):
    """``retrieval`` sent as an extra field on the Responses API and on Anthropic's Messages grounds the answer
    the same way, with the sources on the ``tollway`` object (the Responses stream: on its completed event)."""
    import httpx
    from support import event_payloads

    tenant = make_tenant(ingest=True)
    retrieval = {"collection": "kb", "context_tokens": 200}
    async with app_factory() as gw:
        await ingest(gw, tenant.headers)
        answered = {}
        for path, body in (("/v1/responses", {"model": "sim-large", "input": ASK, "max_output_tokens": 5}),
                           ("/v1/messages", {"model": "sim-large", "max_tokens": 5,
                                             "messages": [{"role": "user", "content": ASK}]})):
            resp = await gw.client.post(path, headers=tenant.headers, json={**body, "retrieval": retrieval})
            assert resp.status_code == 200, resp.text
            async with httpx.AsyncClient() as plain:
                sent = (await plain.get(sim.url.removesuffix("/v1") + "/sim/last-request",
                                        params={"model": "sim-large"})).json()
            answered[path] = (resp.json()["tollway"]["retrieval"]["sources"][0]["source"],
                              "35 dollars" in sent["messages"][0]["content"])
        streamed = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-large", "input": ASK, "max_output_tokens": 5, "stream": True, "retrieval": retrieval})
    assert answered == {"/v1/responses": ("fees.md", True), "/v1/messages": ("fees.md", True)}
    completed = event_payloads(streamed.text)[-1]
    assert completed["type"] == "response.completed"
    assert completed["response"]["tollway"]["retrieval"]["sources"][0]["source"] == "fees.md"


async def test_a_reranking_model_orders_the_candidates_and_is_metered(app_factory, make_tenant, ledger, tmp_path, sim):
    """``rerank`` names a catalog model of kind ``rerank`` (an upstream's ``/v1/rerank``): it reorders the best
    candidates before packing, in search and in chat; its call is a ledger row priced like any; a failing
    reranker leaves the fused order and says so; a name that is not a reranker is the caller's 4xx."""
    import httpx

    tenant = make_tenant(ingest=True)
    config = write_config(tmp_path / "c.yaml", sim.url, extra_models=[
        {"name": "sim-rerank", "upstream": "sim", "kind": "rerank", "price": {"input_per_mtok": "2"}},
        {"name": "broken-rerank", "upstream": "sim", "upstream_model": "sim-error", "kind": "rerank",
         "price": {"input_per_mtok": "2"}}])
    question = "what does express shipping of a replacement card cost"
    async with app_factory(config=config) as gw:
        await ingest(gw, tenant.headers, whole_tokens=0)  # a chunk per section: more candidates than it reorders
        search = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": question, "context_tokens": 400, "rerank": "sim-rerank",
            "rerank_candidates": 4})
        async with httpx.AsyncClient() as plain:
            sent = (await plain.get(sim.url.removesuffix("/v1") + "/sim/last-request",
                                    params={"model": "sim-rerank"})).json()
        chat = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": question}],
            "retrieval": {"collection": "kb", "context_tokens": 400, "rerank": "sim-rerank"}})
        broken = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": question, "rerank": "broken-rerank"})
        plain_search = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": question})
        unknown = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": [{"role": "user", "content": question}],
            "retrieval": {"collection": "kb", "rerank": "no-such-reranker"}})
        not_a_reranker = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": question, "rerank": "sim-small"})
        await gw.state.ledger.flush()
    assert search.status_code == 200, search.text
    assert sent["query"] == question
    assert len(sent["documents"]) == 4  # the best four candidates, as asked
    words = set(re.findall(r"\w+", question.lower()))
    best = max(sent["documents"], key=lambda d: (len(words & set(re.findall(r"\w+", d.lower()))), -len(d)))
    assert best in search.json()["sources"][0]["text"]  # the reranker's first is packed first
    [side] = ledger("request_id = %s", search.headers["x-request-id"] + ".r1")
    assert (side["model"], side["role"], side["status"]) == ("sim-rerank", "retrieval", 200)
    assert side["cost_usd"] == Decimal(side["input_tokens"]) * 2 / 10**6 > 0
    assert chat.status_code == 200, chat.text
    roles = {r["model"]: r for r in ledger("request_id LIKE %s", chat.headers["x-request-id"] + ".r%")}
    assert roles["sim-rerank"]["cost_usd"] > 0
    assert LOCAL_NAME in roles  # the query's embedding, beside it
    assert broken.status_code == 200, broken.text
    assert "rerank_error" in broken.json()
    assert [s["text"] for s in broken.json()["sources"]] == [s["text"] for s in plain_search.json()["sources"]]
    [failed] = ledger("request_id = %s", broken.headers["x-request-id"] + ".r1")
    assert (failed["status"], failed["cost_usd"]) == (502, 0)  # the upstream's 500, as the gateway reports it
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (404, "retrieval.rerank")
    assert (not_a_reranker.status_code, not_a_reranker.json()["error"]["code"]) == (400, "model_not_supported")


STUCK_QUESTION = "what does express shipping of a replacement card cost"


def _stuck_rerank_config(path: Any, sim: Any) -> Any:
    """A config whose reranker ``stuck-rerank`` never answers (the sim's ``timeout``; the upstream gives up at
    3 s), on an upstream of its own (the same server): its breaker, not the chat models', opens."""
    return write_config(path, sim.url, extra_models=[
        {"name": "stuck-rerank", "upstream": "stuck", "upstream_model": "sim-timeout", "kind": "rerank",
         "price": {"input_per_mtok": "2"}}], extra_upstreams=[{"name": "stuck", "base_url": sim.url, "timeout_s": 3}])


async def _sim_calls(sim: Any, *models: str) -> int:
    """The calls the scripted upstream has received for these models."""
    import httpx

    async with httpx.AsyncClient() as plain:
        counts = (await plain.get(sim.url.removesuffix("/v1") + "/sim/stats")).json()["requests"]
    return sum(counts.get(model, 0) for model in models)


async def _answered_meanwhile(gw: Any, headers: dict[str, str]) -> tuple[list[Any], float]:
    """A search and a chat with retrieval of another tenant (its collection ``kb``), and the seconds they took."""
    import time

    began = time.perf_counter()
    answers = [await gw.client.post("/v1/retrieval/search", headers=headers,
                                    json={"collection": "kb", "query": STUCK_QUESTION}),
               await gw.client.post("/v1/chat/completions", headers=headers, json={
                   "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": STUCK_QUESTION}],
                   "retrieval": {"collection": "kb"}})]
    return answers, time.perf_counter() - began


async def test_a_search_waiting_on_an_upstream_holds_no_pooled_connection(app_factory, make_tenant, tmp_path, sim):
    """A reranker or a remote embedder that does not answer (the sim's ``timeout``: the upstream's 3 s timeout
    ends each call) keeps its own searches waiting, never a connection of the pool every tenant shares: with
    more of them in flight than the pool holds, none is checked out for them, and another tenant's search
    and chat are answered at once. The stuck searches still answer (the fused order, ``rerank_error``; the
    remote embedder's failure as the failure policy says)."""
    import asyncio

    import yaml

    slow, other = make_tenant(ingest=True), make_tenant(ingest=True)
    question = STUCK_QUESTION
    config = _stuck_rerank_config(tmp_path / "c.yaml", sim)
    stuck_embedder = yaml.safe_load(config.read_text())
    for model in stuck_embedder["models"]:
        if model["name"] == "sim-embed":  # the same catalog name, its upstream now never answers
            model.update(upstream="stuck", upstream_model="sim-embed-timeout")
    stuck_config = tmp_path / "stuck.yaml"
    stuck_config.write_text(yaml.safe_dump(stuck_embedder))

    async def stuck_calls() -> int:
        return await _sim_calls(sim, "sim-timeout", "sim-embed-timeout")

    async def while_stuck(gw, requests: list[tuple[dict[str, str], str, dict]]) -> tuple[list, int, list, float]:
        pool = gw.state.pool
        before = await stuck_calls()
        tasks = [asyncio.create_task(gw.client.post(path, headers=headers, json=body))
                 for headers, path, body in requests]
        for _ in range(50):  # until all of them wait on the upstream (2.5 s at most: it gives up at 3)
            if await stuck_calls() >= before + len(requests):
                break
            await asyncio.sleep(0.05)
        waiting = await stuck_calls() - before
        held = await checked_out(pool)
        fine, took = await _answered_meanwhile(gw, other.headers)
        return await asyncio.gather(*tasks), waiting, [held, fine], took

    # searches at once above what this test sends (the per-tenant turns have a test of their own, below)
    async with app_factory(config=config, search_concurrency=64) as gw:
        await ingest(gw, slow.headers)
        await ingest(gw, other.headers)
        await ingest(gw, slow.headers, collection="remote", embedder="sim-embed")
        n = gw.state.pool.max_size + 4  # more than the pool could lend them
        search = {"collection": "kb", "query": question, "rerank": "stuck-rerank"}
        chat = {"model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": question}],
                "retrieval": {"collection": "kb", "rerank": "stuck-rerank"}}
        reranked, waiting, (held, fine), took = await while_stuck(gw, [
            (slow.headers, "/v1/retrieval/search", search) if i % 2 else (slow.headers, "/v1/chat/completions", chat)
            for i in range(n)])
    assert waiting == n  # every one of them was waiting on the reranker
    assert held <= 2, held  # (the ledger's writer, a connection on its way back to the pool)
    assert [r.status_code for r in fine] == [200, 200], [r.text for r in fine]
    assert took < 2.0, took  # not queued behind the stuck searches for a connection
    assert all(r.status_code == 200 for r in reranked), [r.text for r in reranked if r.status_code != 200]
    assert all("rerank_error" in r.json() for r in reranked if "object" in r.json()
               and r.json()["object"] == "retrieval.result")

    async with app_factory(config=stuck_config, search_concurrency=64) as gw:
        n = gw.state.pool.max_size + 4
        embedded, waiting, (held, fine), took = await while_stuck(gw, [
            (slow.headers, "/v1/retrieval/search", {"collection": "remote", "query": question})
            for _ in range(n)])
    assert waiting == n, (waiting, held, took, [r.status_code for r in fine], [r.text[:200] for r in embedded][:3])
    assert held <= 2, held
    assert [r.status_code for r in fine] == [200, 200], [r.text for r in fine]
    assert took < 2.0, took
    assert {r.status_code for r in embedded} == {502} or {r.status_code for r in embedded} == {504}, \
        {r.status_code for r in embedded}  # the embedding upstream's timeout, the caller's error to see


async def test_a_tenants_searches_take_turns_with_another_tenants(app_factory, make_tenant, tmp_path, sim):
    """One tenant's searches at once in a process are capped (``search_concurrency``, 3 here): a tenant that
    sends six searches whose reranker never answers has three of them running (at the reranker) and three
    waiting for one to end, holding no connection; another tenant's search and chat with retrieval start at
    once. The waiting three run as the first ones end (the reranker's 3 s timeout: the fused order,
    ``rerank_error``)."""
    import asyncio

    slow, other = make_tenant(ingest=True), make_tenant(ingest=True)
    config = _stuck_rerank_config(tmp_path / "c.yaml", sim)

    async def stuck_calls() -> int:
        return await _sim_calls(sim, "sim-timeout")

    async with app_factory(config=config, search_concurrency=3) as gw:
        await ingest(gw, slow.headers)
        await ingest(gw, other.headers)
        before = await stuck_calls()
        search = {"collection": "kb", "query": STUCK_QUESTION, "rerank": "stuck-rerank"}
        flood = [asyncio.create_task(gw.client.post("/v1/retrieval/search", headers=slow.headers, json=search))
                 for _ in range(6)]
        for _ in range(40):
            if await stuck_calls() >= before + 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time for a fourth to reach the reranker, if it could
        running = await stuck_calls() - before
        held = await checked_out(gw.state.pool)
        fine, took = await _answered_meanwhile(gw, other.headers)
        flooded = await asyncio.gather(*flood)
        total = await stuck_calls() - before
    assert running == 3, running  # the tenant's cap: the other three wait for one to end
    assert held <= 2, held  # waiting for a slot holds no connection
    assert [r.status_code for r in fine] == [200, 200], [r.text for r in fine]
    assert took < 2.0, took  # a slot was free for the other tenant
    assert [r.status_code for r in flooded] == [200] * 6 and all("rerank_error" in r.json() for r in flooded)
    assert total == 6  # the waiting ones ran once slots were free


async def test_a_search_waiting_on_its_admission_holds_no_pooled_connection(app_factory, make_tenant, redis_url):
    """A search's admission (its budgets, a script in Redis) waits while Redis is stalled (paused here for
    1.8 s, under the scripts' 2 s timeout: a failover, a long command): the search's transaction, opened to look its collection up, does not
    wait with it. With more searches in flight than the pool holds, none of its connections is checked out for
    them, another tenant's request that needs only PostgreSQL is answered at once, and the searches answer
    once Redis does."""
    import asyncio
    import time

    import redis.asyncio as aioredis

    slow, other = make_tenant(ingest=True), make_tenant(ingest=True)
    question = "what does express shipping of a replacement card cost"
    async with app_factory() as gw:
        await ingest(gw, slow.headers)
        await ingest(gw, other.headers)
        pool = gw.state.pool
        n = pool.max_size + 4  # more than the pool could lend them
        warm = await gw.client.post("/v1/retrieval/search", headers=slow.headers,
                                    json={"collection": "kb", "query": question})
        assert warm.status_code == 200, warm.text
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", "1800", "ALL")
            paused = time.perf_counter()
            tasks = [asyncio.create_task(gw.client.post("/v1/retrieval/search", headers=slow.headers,
                                                        json={"collection": "kb", "query": f"{question} {i}"}))
                     for i in range(n)]
            await asyncio.sleep(0.5)  # every one of them past its collection's lookup, waiting on Redis
            held = await checked_out(pool)
            began = time.perf_counter()
            listed = await gw.client.get("/v1/collections", headers=other.headers)  # PostgreSQL only
            took = time.perf_counter() - began
            still_paused = time.perf_counter() - paused < 1.7
            answered = await asyncio.gather(*tasks)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
    assert still_paused  # the looks above were taken while Redis was stalled
    assert held <= 2, held  # (the ledger's writer, a connection on its way back to the pool)
    assert listed.status_code == 200, listed.text
    assert took < 0.8, took  # not queued behind the waiting searches for a connection
    assert [r.status_code for r in answered] == [200] * n, [r.text[:200] for r in answered if r.status_code != 200]
    assert all(r.json()["sources"] for r in answered)


async def test_a_large_document_is_parsed_off_the_event_loop(app_factory, make_tenant):
    """Parsing and splitting a few megabytes of markdown (blocks, sentences, every piece's tokens) is
    seconds of CPU. It runs in a thread, one at a time per process, with no pooled connection held: the
    event loop keeps answering other tenants meanwhile (its longest pause, sampled every 10 ms, stays well
    under the parse's length; on the event loop the pause was the whole parse). The document is over the
    per-document token limit, which only the parse can tell (under twice the limit before parsing, which is
    refused before it: the test below): a 413 at the end, nothing written."""
    import asyncio
    import time

    tenant, other = make_tenant(ingest=True), make_tenant()
    section = ("## Heading {i}\n\n" + "An overdraft costs 35 dollars per item, at most three items a day, and the fee"
               " is waived when the balance is restored within a day. " * 16 + "\n\n")
    text = "".join(section.format(i=i) for i in range(1400))  # ~3.5 MB, ~700k tokens
    gaps: list[float] = []
    beating = True

    async def beat() -> None:
        last = time.perf_counter()
        while beating:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with app_factory(max_document_tokens=400_000) as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "big"})
        heart = asyncio.create_task(beat())
        began = time.perf_counter()
        ingest = asyncio.create_task(gw.client.post("/v1/collections/big/documents", headers=tenant.headers,
                                                    json={"source": "big.md", "text": text}))
        await asyncio.sleep(0.3)  # the parse is under way
        chat = await gw.client.post("/v1/chat/completions", headers=other.headers, json={
            "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        answered = time.perf_counter() - began
        resp = await ingest
        took = time.perf_counter() - began
        beating = False
        await heart
        listed = (await gw.client.get("/v1/collections/big/documents", headers=tenant.headers)).json()
    assert resp.status_code == 413, resp.text
    assert listed["data"] == []
    assert chat.status_code == 200, chat.text
    assert took > 1.0, took  # the parse was long enough to matter
    assert answered < took  # the other tenant was answered while it ran
    assert max(gaps) < min(0.5, took / 2), (max(gaps), took)


async def test_a_document_whose_words_alone_are_over_twice_the_limit_is_refused_before_its_parse(
        app_factory, make_tenant, monkeypatch):
    """Parsing costs seconds a megabyte (a megabyte of list items, about ten); counting its tokens, a fraction
    of one. Two megabytes of list items were parsed for 31 s before their 413, the other tenants' chats at
    p95 100 ms instead of 4 meanwhile. Markdown and text keep their words when parsed, so twice the limit
    before parsing is over it after: the 413 comes without a parse. HTML, which loses its markup, is still
    parsed first."""
    from tollway.retrieval import ParsePool

    parsed: list[str] = []
    real = ParsePool._parse

    async def parse(self: ParsePool, splitting: Any, docs: Any, max_tokens: int) -> Any:
        parsed.extend(doc.source for doc in docs)  # sent to a worker to parse
        return await real(self, splitting, docs, max_tokens)

    monkeypatch.setattr(ParsePool, "_parse", parse)
    tenant = make_tenant(ingest=True)
    async with app_factory(max_document_tokens=1_000) as gw:
        await gw.client.post("/v1/collections", headers=tenant.headers, json={"name": "lists"})

        async def send(source: str, text: str) -> Any:
            return await gw.client.post("/v1/collections/lists/documents", headers=tenant.headers,
                                        json={"source": source, "text": text})

        lists = await send("lists.md", "# T\n" + "- x\n" * 2_000)  # about 6,000 tokens
        just_over = await send("over.md", "# T\n\n" + "word " * 1_500)  # over the limit, under twice it
        html = await send("page.html", "<html><body>" + "<p>word</p>" * 400 + "</body></html>")
    assert (lists.status_code, lists.json()["error"]["code"]) == (413, "payload_too_large")
    assert just_over.status_code == 413, just_over.text
    assert html.status_code == 200, html.text  # 400 words once its markup is gone, 2,000 tokens before
    assert parsed == ["over.md", "page.html"]


@pytest.mark.parametrize("where", ["search", "chat"])
async def test_a_search_reads_its_sections_beside_its_nearest_chunks_when_the_pool_has_a_connection_to_spare(
        app_factory, make_tenant, where):
    """A hierarchical search reads its sections (their centroids, then their chunks) on a second connection, in
    the same tenant's transaction, while its own reads the nearest chunks: only where the pool has idle
    connections to spare, never waiting for one, and while it is the process's only search in flight. The
    passages are the same either way; with the pool's idle connections all but one taken, or another search in
    flight, the search reads everything on its one connection."""
    from tollway.gateway.parts.rag import SIDE_WAIT_S

    tenant = make_tenant(ingest=True)
    async with app_factory() as gw:
        await ingest(gw, tenant.headers, chunk_tokens=24, chunk_overlap=6)
        pool = gw.state.pool
        asked: list[float | None] = []
        getconn = pool.getconn

        async def counted(**kwargs: Any):  # the side's checkouts are the ones that never wait
            asked.append(kwargs.get("timeout"))
            return await getconn(**kwargs)

        pool.getconn = counted

        async def ask() -> dict[str, Any]:
            asked.clear()
            if where == "search":
                resp = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
                    "collection": "kb", "query": ASK, "context_tokens": 250})
                assert resp.status_code == 200, resp.text
                return {"sources": resp.json()["sources"], "context": resp.json()["context"],
                        "sides": asked.count(SIDE_WAIT_S)}
            resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
                "model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": ASK}],
                "retrieval": {"collection": "kb", "context_tokens": 250}})  # no temperature 0: never cached
            assert resp.status_code == 200, resp.text
            return {"sources": resp.json()["tollway"]["retrieval"]["sources"], "sides": asked.count(SIDE_WAIT_S)}

        await ask()  # the embedder loaded, the pool grown to what a search takes
        beside = await ask()
        taken = []
        try:
            while pool.get_stats()["pool_available"] > 1:  # every idle connection but one
                taken.append(await getconn())
            alone = await ask()
        finally:
            for conn in taken:
                await pool.putconn(conn)
        flat = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json={
            "collection": "kb", "query": ASK, "context_tokens": 250, "mode": "flat"})
        flat_sides = asked.count(SIDE_WAIT_S)
        # another search in flight in the process (another tenant's slot held): this one reads on its one
        async with gw.state.rag.searching.slot("someone"):
            busy = await ask()
    assert beside["sides"] == 1 and alone["sides"] == 0 and busy["sides"] == 0, \
        (beside["sides"], alone["sides"], busy["sides"])
    assert busy["sources"] == beside["sources"]
    assert beside["sources"] and beside["sources"] == alone["sources"]
    assert beside.get("context") == alone.get("context")
    assert flat.status_code == 200 and flat_sides == 0  # a flat search reads no sections


async def test_searches_cancelled_midway_leave_no_connection_checked_out(app_factory, make_tenant):
    """A search whose caller goes away (its task cancelled at any point: the collection's lookup, BM25, the
    embedding, the reads on both connections, the packing) gives back every connection it took, the side's
    included (its statement finishes rather than being cut off), and the next search is answered."""
    import asyncio
    from contextlib import suppress

    tenant = make_tenant(ingest=True)
    body = {"collection": "kb", "query": ASK, "context_tokens": 250}
    async with app_factory() as gw:
        await ingest(gw, tenant.headers, chunk_tokens=24, chunk_overlap=6)
        assert (await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)).status_code == 200
        idle = await checked_out(gw.state.pool)
        for delay in (0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012, 0.02, 0.03):
            task = asyncio.create_task(gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body))
            await asyncio.sleep(delay)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.2)  # a side's last statement, finishing on its own
        held = await checked_out(gw.state.pool)
        after = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)
    assert held <= idle, (held, idle)
    assert after.status_code == 200 and after.json()["sources"]


async def test_a_search_statement_that_outlasts_its_limit_is_a_503_and_holds_no_connection(app_factory, make_tenant,
                                                                                          pg, monkeypatch):
    """A search's statements are bounded in time (``store.SEARCH_STATEMENT_TIMEOUT``, 10 s; 300 ms here): one
    stuck behind a lock a migration holds ends with a 503 in the OpenAI shape, on the search's connection and on
    its side one alike, and both go back to the pool; the next search, the lock gone, answers."""
    import asyncio
    import time

    from tollway.retrieval import store

    tenant = make_tenant(ingest=True)
    body = {"collection": "kb", "query": ASK, "context_tokens": 250}
    async with app_factory() as gw, await psycopg.AsyncConnection.connect(pg.url) as locker:
        await ingest(gw, tenant.headers)
        assert (await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)).status_code == 200
        idle = await checked_out(gw.state.pool)
        monkeypatch.setattr(store, "SEARCH_STATEMENT_TIMEOUT", "300ms")
        await locker.execute("LOCK TABLE rag_chunks IN ACCESS EXCLUSIVE MODE")  # held until the rollback
        began = time.perf_counter()
        stuck = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)
        took = time.perf_counter() - began
        await locker.rollback()
        await asyncio.sleep(0.1)
        held = await checked_out(gw.state.pool)
        after = await gw.client.post("/v1/retrieval/search", headers=tenant.headers, json=body)
    assert stuck.status_code == 503, stuck.text
    assert stuck.json()["error"]["code"] == "store_unavailable"
    assert "time limit" in stuck.json()["error"]["message"]
    assert took < 3, took
    assert held <= idle, (held, idle)
    assert after.status_code == 200 and after.json()["sources"]
