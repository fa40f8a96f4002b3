"""The pool's check on checkout (``tollway.infra.db.Freshness``): a connection given back a moment ago goes out
again without the round trip that tests it; one idle longer is tested, so a server that cut it meanwhile costs
no caller a failed statement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tollway.infra.db import Freshness


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the empty statements the check sends (psycopg_pool's own test, which ``Freshness`` calls)."""
    sent = [0]
    original = AsyncConnectionPool.check_connection

    async def counted(conn: psycopg.AsyncConnection) -> None:
        sent[0] += 1
        await original(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counted))
    return sent


@asynccontextmanager
async def _pool(url: str, fresh_s: float) -> AsyncIterator[AsyncConnectionPool]:
    """One connection, checked and noted by a ``Freshness`` of this window, as the gateway's pool is."""
    fresh = Freshness(fresh_s=fresh_s)
    async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False, check=fresh.check,
                                   reset=fresh.returned) as pool:
        await pool.open(wait=True)
        yield pool


async def _cut_after_use(pool: AsyncConnectionPool, url: str) -> int:
    """The pool's connection used and given back, then ended by the server; its backend's pid."""
    async with pool.connection() as conn:
        cut = conn.info.backend_pid
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (cut,))
    return cut


async def test_a_connection_given_back_a_moment_ago_is_not_tested_again(pg, monkeypatch):
    sent = _counting(monkeypatch)
    async with _pool(pg.url, fresh_s=5.0) as pool:
        async with pool.connection() as conn:  # never given back yet: tested
            await conn.execute("SELECT 1")
        assert sent[0] == 1
        for _ in range(5):  # given back just now: handed out as it is, and it works
            async with pool.connection() as conn:
                assert (await (await conn.execute("SELECT 2")).fetchone()) == (2,)
        assert sent[0] == 1


async def test_a_connection_idle_past_the_window_is_tested_and_a_cut_one_replaced(pg, monkeypatch):
    sent = _counting(monkeypatch)
    async with _pool(pg.url, fresh_s=0.2) as pool:
        cut = await _cut_after_use(pool, pg.url)
        await asyncio.sleep(0.3)  # idle past the window: the check finds the cut connection and replaces it
        before = sent[0]
        async with pool.connection(timeout=10) as conn:
            assert (await (await conn.execute("SELECT 3")).fetchone()) == (3,)
            assert conn.info.backend_pid != cut
        assert sent[0] > before


async def test_a_connection_the_server_ended_inside_the_window_is_tested_and_replaced(pg, monkeypatch):
    """Ended by the server a moment after it was given back (a restart, ``pg_terminate_backend``): the server
    says so on the socket, so the check runs after all and the caller gets a working connection."""
    sent = _counting(monkeypatch)
    async with _pool(pg.url, fresh_s=60.0) as pool:
        cut = await _cut_after_use(pool, pg.url)
        await asyncio.sleep(0.1)
        before = sent[0]
        async with pool.connection(timeout=10) as conn:
            assert (await (await conn.execute("SELECT 4")).fetchone()) == (4,)
            assert conn.info.backend_pid != cut
        assert sent[0] > before
