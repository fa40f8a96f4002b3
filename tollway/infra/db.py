"""Plain SQL migrations, applied in file order and recorded in ``schema_migrations``."""

from __future__ import annotations

import time
import weakref
from importlib import resources
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

_LOCK_ID = 0x70_11_3A_7E  # advisory lock: one migrator at a time across replicas


def _migrations() -> list[tuple[str, str]]:
    folder = resources.files("tollway") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


async def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now. Also makes sure the ledger has
    partitions for this month and the next."""
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
            await conn.execute(
                "SELECT ledger_ensure_month(date_trunc('month', now())::date),"
                " ledger_ensure_month((date_trunc('month', now()) + interval '1 month')::date)")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now


class IdleCheck:
    """The pool's ``check``: a connection is pinged before it is handed out unless it was handed out less than
    ``idle_s`` ago (then it was working moments ago); that saves a round trip on nearly every checkout of a
    busy gateway, and a server restart or a dropped socket is still found at checkout for every connection
    that sat in the pool. A connection that breaks within those moments fails the query that uses it, and
    the pool drops it. (Not the pool's ``reset`` hook: with one, psycopg_pool hands every returned
    connection to a worker task instead of taking it back at once.)"""

    def __init__(self, idle_s: float = 1.0) -> None:
        self.idle_s = idle_s
        self._out: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        last = self._out.get(conn)
        if last is None or now - last > self.idle_s:
            await AsyncConnectionPool.check_connection(conn)
        self._out[conn] = now
