"""Plain SQL migrations, applied in file order and recorded in ``schema_migrations``."""

from __future__ import annotations

from importlib import resources

import psycopg

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
