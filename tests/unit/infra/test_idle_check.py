"""The pool's connection check pings a connection unless it was handed out moments ago."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool

from tollway.infra.db import IdleCheck


class _Conn:
    """What the check needs of a connection: to be hashable and weakly referenced."""


def test_a_connection_handed_out_moments_ago_is_not_pinged_and_one_idle_longer_is(monkeypatch):
    pinged: list[_Conn] = []

    async def ping(conn: _Conn) -> None:
        pinged.append(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(ping))
    idle = IdleCheck(idle_s=0.05)
    busy, other = _Conn(), _Conn()

    async def run() -> None:
        await idle.check(busy)  # never handed out before: pinged
        await idle.check(busy)  # handed out moments ago: not pinged
        await idle.check(other)  # another connection: its own first time, pinged
        await asyncio.sleep(0.06)
        await idle.check(busy)  # idle past idle_s: pinged
        await idle.check(busy)  # and then not again at once

    asyncio.run(run())
    assert pinged == [busy, other, busy]


def test_a_failed_ping_reaches_the_pool(monkeypatch):
    async def dead(conn: _Conn) -> None:
        raise OSError("server closed the connection")

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(dead))
    with pytest.raises(OSError):
        asyncio.run(IdleCheck().check(_Conn()))
