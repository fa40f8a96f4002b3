"""The pool's connection check pings only a connection that has sat idle in the pool past ``idle_s``."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool

from tollway.infra.db import IdleCheck


class _Conn:
    """What the check needs of a connection: to be hashable and weakly referenced."""


def test_a_connection_handed_back_moments_ago_is_not_pinged_and_one_idle_longer_is(monkeypatch):
    pinged: list[_Conn] = []

    async def ping(conn: _Conn) -> None:
        pinged.append(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(ping))
    idle = IdleCheck(idle_s=0.05)
    fresh, other = _Conn(), _Conn()

    async def run() -> None:
        await idle.check(fresh)  # never handed back through this pool: pinged
        await idle.reset(fresh)
        await idle.check(fresh)  # back moments ago: not pinged
        await idle.reset(fresh)
        await idle.reset(other)
        await asyncio.sleep(0.06)
        await idle.check(fresh)  # idle past idle_s: pinged
        await idle.check(fresh)  # its return was used up by the check before: pinged

    asyncio.run(run())
    assert pinged == [fresh, fresh, fresh]


def test_a_failed_ping_reaches_the_pool(monkeypatch):
    async def dead(conn: _Conn) -> None:
        raise OSError("server closed the connection")

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(dead))
    with pytest.raises(OSError):
        asyncio.run(IdleCheck().check(_Conn()))
