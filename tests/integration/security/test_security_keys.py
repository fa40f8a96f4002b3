"""API keys under a keyed hash: legacy digests re-keyed, a rotation that keeps keys working, and a replica
started with the wrong secret refusing to start rather than refusing every key."""

from __future__ import annotations

import hashlib
import os

import psycopg
import pytest


async def _setup(url: str, secret: bytes) -> tuple[str, int]:
    from tollway.gateway.tenancy.keys import KeyHasher, create_key, create_tenant
    from tollway.infra.db import migrate

    await migrate(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await create_tenant(conn, "keyed")
        key = await create_key(conn, "keyed", hasher=KeyHasher(secret))
    return key.secret, key.id


def _row(url: str, key_id: int) -> tuple[bytes, str | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT key_hash, key_secret_id FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    assert row is not None
    return bytes(row[0]), row[1]


async def test_a_stored_key_is_not_its_sha256_and_a_legacy_digest_is_rekeyed(app_factory, own_pg):
    from tollway.gateway.tenancy.keys import KeyHasher

    here = os.environ["TOLLWAY_KEY_SECRET"].encode()
    secret, key_id = await _setup(own_pg.url, here)
    stored, secret_id = _row(own_pg.url, key_id)
    assert stored != hashlib.sha256(secret.encode()).digest()
    assert stored == KeyHasher(here).digest(secret)
    with psycopg.connect(own_pg.url, autocommit=True) as conn:  # as a row written before the keyed hash
        conn.execute("UPDATE api_keys SET key_hash = %s, key_secret_id = NULL WHERE id = %s",
                     (hashlib.sha256(secret.encode()).digest(), key_id))
    async with app_factory(database_url=own_pg.url) as gw:
        resp = await gw.client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert resp.status_code == 200
    assert _row(own_pg.url, key_id) == (stored, secret_id)


async def test_a_rotation_keeps_keys_working_and_rekeys_them_on_use(app_factory, own_pg):
    from tollway.gateway.tenancy.keys import KeyHasher

    secret, key_id = await _setup(own_pg.url, b"old-secret")
    async with app_factory(database_url=own_pg.url, key_secret="new-secret",
                           key_secret_previous="old-secret") as gw:
        resp = await gw.client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert resp.status_code == 200
    assert _row(own_pg.url, key_id)[0] == KeyHasher(b"new-secret").digest(secret)
    async with app_factory(database_url=own_pg.url, key_secret="new-secret") as gw:  # previous dropped
        again = await gw.client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert again.status_code == 200


async def test_a_replica_with_another_secret_refuses_to_start(app_factory, own_pg):
    from tollway.app import StartupError

    await _setup(own_pg.url, b"the-fleet-secret")
    with pytest.raises(StartupError, match="another key secret"):
        async with app_factory(database_url=own_pg.url, key_secret="a-different-secret"):
            pass
