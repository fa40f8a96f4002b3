"""Plain SQL migrations, applied in file order and recorded in ``schema_migrations``."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

_LOCK_ID = 0x70_11_3A_7E  # advisory lock: one migrator at a time across replicas


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
