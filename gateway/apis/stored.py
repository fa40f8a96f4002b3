"""The Responses API's stored responses, per tenant in PostgreSQL (migration 0017): what
``previous_response_id`` continues and ``GET``/``DELETE /v1/responses/{id}`` read. Each row holds one turn
(its input and its output as chat messages) and the response object as it was returned; a conversation is
the chain of turns back through ``previous_id``. Stored only under a content policy that keeps content
(``store_content``), deleted whole at its retention or by an erasure (``tollway.gateway.quality.sampling``).
Every read names the tenant: another tenant's id is not found."""

from __future__ import annotations

from typing import Any

import orjson
from psycopg_pool import AsyncConnectionPool

from tollway.errors import InvalidRequest, NotFound
from tollway.infra.db import storable, storable_json
from tollway.jsontypes import JSON

MAX_TURNS = 1000  # a conversation longer than this is refused by the chat path's message limit long before


class ResponseStore:
    def __init__(self, pool: AsyncConnectionPool, max_bytes: int) -> None:
        self.pool = pool
        self.max_bytes = max_bytes  # a conversation's turns, as JSON, at most this (the request body cap)

    async def save(self, tenant_id: int, response: JSON, turn: list[JSON], *, previous_id: str | None,
                   end_user: str | None, request_id: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO stored_responses (tenant_id, id, previous_id, end_user, request_id, turn, response)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (tenant_id, response["id"], previous_id, storable(end_user), request_id, storable_json(turn),
                 storable_json(response)))

    async def conversation(self, tenant_id: int, response_id: str) -> list[JSON]:
        """The chat messages of every turn up to and including ``response_id``'s, oldest first; NotFound
        when it, or a response earlier in its conversation, is not stored (never stored, another tenant's,
        deleted, erased or past retention)."""
        async with self.pool.connection() as conn:
            # The chain is walked on ids and sizes first; its turns are read only when their sum fits, so a
            # long conversation of large turns never reaches this process whole.
            cur = await conn.execute(
                "WITH RECURSIVE chain (id, previous_id, depth, size) AS ("
                " SELECT id, previous_id, 1, octet_length(turn::text)::bigint FROM stored_responses"
                " WHERE tenant_id = %(t)s AND id = %(id)s"
                " UNION ALL SELECT s.id, s.previous_id, c.depth + 1, c.size + octet_length(s.turn::text)"
                " FROM chain c JOIN stored_responses s ON s.tenant_id = %(t)s AND s.id = c.previous_id"
                " WHERE c.depth < %(turns)s AND c.size <= %(bytes)s),"
                " whole AS (SELECT max(size) <= %(bytes)s AS fits FROM chain)"
                " SELECT c.id, c.previous_id, CASE WHEN whole.fits THEN s.turn END, c.size"
                " FROM chain c CROSS JOIN whole JOIN stored_responses s ON s.tenant_id = %(t)s AND s.id = c.id"
                " ORDER BY c.depth DESC",
                {"t": tenant_id, "id": response_id, "turns": MAX_TURNS, "bytes": self.max_bytes})
            rows = await cur.fetchall()
        if not rows:
            raise NotFound(f"No stored response '{response_id}' (responses are stored when the request sets "
                           "store and the tenant's content policy keeps content).", param="previous_response_id",
                           code="response_not_found")
        if rows[0][3] > self.max_bytes:
            raise InvalidRequest(f"The conversation up to '{response_id}' is over {self.max_bytes:,} bytes, the "
                                 "most a request may carry; start a new conversation with what it needs.",
                                 param="previous_response_id", code="conversation_too_large")
        first_previous = rows[0][1]
        if first_previous is not None and len(rows) < MAX_TURNS:
            raise NotFound(f"Response '{first_previous}', earlier in this conversation, is no longer stored.",
                           param="previous_response_id", code="response_not_found")
        return [message for row in rows for message in _json(row[2])]

    async def get(self, tenant_id: int, response_id: str) -> JSON:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT response FROM stored_responses WHERE tenant_id = %s AND id = %s",
                                     (tenant_id, response_id))
            row = await cur.fetchone()
        if row is None:
            raise _not_found(response_id)
        out: JSON = _json(row[0])
        return out

    async def delete(self, tenant_id: int, response_id: str) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM stored_responses WHERE tenant_id = %s AND id = %s",
                                     (tenant_id, response_id))
            if cur.rowcount == 0:
                raise _not_found(response_id)


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No stored response '{response_id}'.", param="response_id", code="response_not_found")
