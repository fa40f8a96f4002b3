"""Plain SQL migrations, applied in file order and recorded in ``schema_migrations``."""

from __future__ import annotations

import select
import time
import weakref
from importlib import resources
from typing import Any

import orjson
import psycopg
from psycopg.pq import ConnStatus
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

_LOCK_ID = 0x70_11_3A_7E  # advisory lock: one migrator at a time across replicas


FRESH_S = 1.0  # a pooled connection given back this recently is handed out again without a round trip


class Freshness:
    """The pool's check on checkout (``check``) and its note on return (``reset``): a connection given back to the
    pool less than ``FRESH_S`` ago, in a clean state, with nothing waiting on its socket, is handed out without
    the empty statement that tests it (a round trip and ~0.5 ms of this process's CPU: two per search, where a
    search is ~10 ms of it). A server that ends a connection (a restart, a shutdown, ``pg_terminate_backend``)
    says so on its socket, which this polls without waiting; such a connection, and any idle longer, is tested
    as before and replaced before a caller gets it. Left to a caller: a connection whose network path died
    silently within the window, whose statement then fails as it would mid-use (a 503 that can be retried)."""

    def __init__(self, fresh_s: float = FRESH_S) -> None:
        self.fresh_s = fresh_s
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def returned(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        at = self._returned.pop(conn, None)
        if (at is not None and time.monotonic() - at < self.fresh_s and not conn.closed
                and conn.pgconn.status == ConnStatus.OK and _quiet(conn)):
            return
        await AsyncConnectionPool.check_connection(conn)


def _quiet(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Nothing to read on an idle connection's socket: a server that ended it has sent its reason, or closed it."""
    try:
        waiting = select.poll()
        waiting.register(conn.pgconn.socket, select.POLLIN)
        return not waiting.poll(0)
    except (OSError, ValueError, psycopg.OperationalError):
        return False


def storable(text: str | None) -> str | None:
    """``text`` as PostgreSQL can store it: it refuses a NUL character in text (and in jsonb), which any
    client field or model output may hold; stored with U+FFFD in its place."""
    return text.replace("\x00", "\ufffd") if text is not None and "\x00" in text else text


def storable_json(value: Any) -> Jsonb:
    """``value`` for a jsonb column, a NUL in any of its strings (keys too) stored as U+FFFD (jsonb refuses
    ``\\u0000``); walked only when its JSON holds one."""
    return Jsonb(_without_nul(value) if b"\\u0000" in orjson.dumps(value) else value)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {storable(k) if isinstance(k, str) else k: _without_nul(v) for k, v in value.items()}
    return value


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
