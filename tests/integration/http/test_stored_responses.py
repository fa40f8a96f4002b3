"""The Responses API's stored responses under the content policy: an end user's erasure deletes theirs and
nothing else, retention deletes the old ones whole, a tenant's erasure deletes the rest; a conversation whose
earlier turn is gone cannot be continued."""

from __future__ import annotations

import psycopg

from tollway.gateway.quality.sampling import apply_retention


async def respond(gw, tenant, user: str, previous: str | None = None) -> dict:
    resp = await gw.client.post("/v1/responses", headers=tenant.headers, json={
        "model": "sim-small", "input": f"hello from {user}", "safety_identifier": user, "max_output_tokens": 3,
        **({"previous_response_id": previous} if previous else {})})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_erasure_and_retention_delete_stored_responses(app_factory, make_tenant, admin, pg):
    tenant = make_tenant()
    async with app_factory() as gw:
        policy = await gw.client.put("/v1/admin/policies", headers=admin.headers,
                                     json={"tenant": tenant.name, "store_content": True, "content_retention_days": 1})
        assert policy.status_code == 200, policy.text
        ada = await respond(gw, tenant, "ada")
        ada_2 = await respond(gw, tenant, "ada", previous=ada["id"])
        bob = await respond(gw, tenant, "bob")
        bob_2 = await respond(gw, tenant, "bob", previous=bob["id"])
        old = await respond(gw, tenant, "cy")
        assert all(r["store"] for r in (ada, ada_2, bob, bob_2, old))

        async def stored(response: dict) -> int:
            return (await gw.client.get(f"/v1/responses/{response['id']}", headers=tenant.headers)).status_code

        assert [await stored(r) for r in (ada, ada_2, bob, bob_2, old)] == [200] * 5
        erased = await gw.client.post("/v1/admin/content/erase", headers=admin.headers,
                                      json={"tenant": tenant.name, "user": "ada"})
        assert erased.json()["erased"]["stored_responses"] == 2
        assert [await stored(r) for r in (ada, ada_2, bob, bob_2)] == [404, 404, 200, 200]
        with psycopg.connect(pg.url, autocommit=True) as conn:  # two days old: past the retention of one day
            conn.execute("UPDATE stored_responses SET created_at = now() - interval '2 days' WHERE id = %s",
                         (old["id"],))
        async with gw.state.pool.connection() as conn:
            removed = await apply_retention(conn)
        assert removed["stored_responses"] >= 1
        assert await stored(old) == 404
        assert await stored(bob_2) == 200
        whole = await gw.client.post("/v1/admin/content/erase", headers=admin.headers, json={"tenant": tenant.name})
        assert whole.json()["erased"]["stored_responses"] == 2
        gone = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-small", "input": "more", "previous_response_id": bob_2["id"]})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "response_not_found"


async def test_a_nul_in_the_input_or_the_end_user_is_stored_and_erased_like_any_text(app_factory, make_tenant, admin):
    """PostgreSQL refuses a NUL in text and jsonb: a response asked to be stored whose input held one was
    answered with `store: true` and an id that was never stored."""
    tenant = make_tenant()
    async with app_factory() as gw:
        await gw.client.put("/v1/admin/policies", headers=admin.headers,
                            json={"tenant": tenant.name, "store_content": True})
        first = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-small", "input": "hello\u0000there", "instructions": "be\u0000brief",
            "safety_identifier": "eve\u0000", "max_output_tokens": 3, "metadata": {"k\u0000": "v\u0000"}})
        assert first.status_code == 200, first.text
        stored = await gw.client.get(f"/v1/responses/{first.json()['id']}", headers=tenant.headers)
        follow = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-small", "input": "and then?", "previous_response_id": first.json()["id"],
            "max_output_tokens": 3})
        erased = await gw.client.post("/v1/admin/content/erase", headers=admin.headers,
                                      json={"tenant": tenant.name, "user": "eve\u0000"})
    assert stored.status_code == 200, stored.text
    assert stored.json()["instructions"] == "be\ufffdbrief"
    assert follow.status_code == 200, follow.text
    assert erased.status_code == 200, erased.text
    assert erased.json()["erased"]["stored_responses"] == 1


async def test_a_conversation_past_the_request_body_cap_is_refused_before_its_turns_are_read(app_factory,
                                                                                             make_tenant, admin):
    """The chain of turns behind previous_response_id was read whole (up to 1,000 turns of up to a request body
    each) before anything bounded it. Now its size is summed in the database first, and a conversation over
    the request body cap is a 400 that reads no turn."""
    tenant = make_tenant()
    async with app_factory(max_body_bytes=4096) as gw:
        await gw.client.put("/v1/admin/policies", headers=admin.headers,
                            json={"tenant": tenant.name, "store_content": True})
        previous, answers = None, []
        for _ in range(4):
            resp = await gw.client.post("/v1/responses", headers=tenant.headers, json={
                "model": "sim-small", "input": "x" * 1500, "max_output_tokens": 3,
                **({"previous_response_id": previous} if previous else {})})
            answers.append(resp)
            if resp.status_code != 200:
                break
            previous = resp.json()["id"]
    assert [r.status_code for r in answers] == [200, 200, 200, 400], answers[-1].text  # 3 turns: ~4.7 kB
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "conversation_too_large"
    assert refused.json()["error"]["param"] == "previous_response_id"
