"""One change channel, which is also the audit log.

Every administrative change (budget, policy, key, and later guard policy, prompt label, rollout) is a
row in ``changes`` (who, what, before, after, when, why), written in the same transaction as the
change itself, with a ``NOTIFY`` on ``tollway_changes`` that PostgreSQL delivers at commit. Every
gateway process ``LISTEN``s on a connection of its own and drops what it cached about that tenant or
key at once, so a change made by the CLI (which writes PostgreSQL directly) or by any replica's admin
API applies before the next request. While the listener is disconnected (it reconnects by itself),
the caches' short TTLs are the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from tollway.infra.db import storable, storable_json
from tollway.jsontypes import JSON

log = logging.getLogger("tollway.infra.changes")
CHANNEL = "tollway_changes"


def default_author() -> str:
    """Who runs a CLI command: the OS user and host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class Note:
    """What a NOTIFY says: enough for a listener to know what to forget."""

    id: int
    kind: str
    tenant_id: int | None
    subject: str

    @classmethod
    def parse(cls, payload: str) -> Note:
        data = orjson.loads(payload)
        return cls(int(data["id"]), str(data["kind"]), data.get("tenant_id"), str(data["subject"]))


async def record(conn: psycopg.AsyncConnection[Any], *, author: str, kind: str, subject: str | int, action: str,
                 tenant_id: int | None = None, before: Any = None, after: Any = None,
                 reason: str | None = None) -> int:
    """Write the audit row and queue its NOTIFY: both take effect when the caller's transaction commits."""
    stored_subject = storable(str(subject)) or ""  # as stored, and as the notification names it
    cur = await conn.execute(
        "INSERT INTO changes (author, tenant_id, kind, subject, action, before, after, reason)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (storable(author), tenant_id, kind, stored_subject, action,
         None if before is None else storable_json(_plain(before)),
         None if after is None else storable_json(_plain(after)), storable(reason)))
    row = await cur.fetchone()
    assert row is not None
    note = {"id": row[0], "kind": kind, "tenant_id": tenant_id, "subject": stored_subject}
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, orjson.dumps(note).decode()))
    return int(row[0])


async def history(conn: psycopg.AsyncConnection[Any], *, tenant_id: int | None = None, limit: int = 100) -> list[JSON]:
    cur = await conn.execute(
        "SELECT id, at, author, tenant_id, kind, subject, action, before, after, reason FROM changes"
        " WHERE %s::bigint IS NULL OR tenant_id = %s ORDER BY id DESC LIMIT %s", (tenant_id, tenant_id, limit))
    cols = [c.name for c in cur.description or []]
    return [{k: (v.isoformat() if k == "at" else v) for k, v in zip(cols, r, strict=True)} for r in await cur.fetchall()]


class ChangeListener:
    """LISTENs on its own connection and hands every change to the handlers; reconnects with backoff."""

    def __init__(self, database_url: str, handlers: list[Callable[[Note], Awaitable[None] | None]], *,
                 retry_s: float = 1.0) -> None:
        self.url = database_url
        self.handlers = handlers
        self.retry_s = retry_s
        self.connected = asyncio.Event()
        self.last_id = 0  # the newest change this process has applied
        self._seen = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def applied(self, change_id: int) -> None:
        """Wait until this process has applied change ``change_id`` (or a later one)."""
        async with self._seen:
            await self._seen.wait_for(lambda: self.last_id >= change_id)

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    async for notify in conn.notifies():
                        await self._apply(notify.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("change listener disconnected (%s); caches fall back to their TTLs", exc)
            self.connected.clear()
            await asyncio.sleep(self.retry_s)

    async def _apply(self, payload: str) -> None:
        try:
            note = Note.parse(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable change notification: %r", payload[:200])
            return
        for handler in self.handlers:
            try:
                result = handler(note)
                if result is not None:
                    await result  # e.g. reloading a tenant's prompts: applied before ``applied`` returns
            except Exception:
                log.exception("change handler failed for change %s", note.id)
        async with self._seen:
            self.last_id = max(self.last_id, note.id)
            self._seen.notify_all()
