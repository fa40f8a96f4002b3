"""Ids a client sees for rows numbered by global sequences (documents, sections, chunks, collections, eval
runs, feedback): the row number through a keyed 64-bit permutation, so an id says nothing about how many
rows other tenants made in between, yet maps back to its row without a lookup table.

``doc_3f9a0c71d2e4b856`` is ``encode("doc", 42)``: a four-round Feistel network over the number's two
32-bit halves, each round HMAC-SHA256 of the installation's secret (one row of ``install_secrets``, made by
migration 0014) with the kind and the round. The kind is part of the key, so a document's id is not also a
chunk's. An id that does not decode, or decodes to another tenant's row, is a 404 like any unknown id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

_MASK = (1 << 32) - 1
_ID = re.compile(r"^([a-z]+)_([0-9a-f]{16})$")
KINDS = frozenset({"doc", "sec", "chk", "col", "run", "fb"})


class PublicIds:
    def __init__(self, secret: bytes) -> None:
        self._keys = {kind: [hmac.new(secret, f"{kind}:{r}".encode(), hashlib.sha256).digest() for r in range(4)]
                      for kind in KINDS}

    def _round(self, key: bytes, half: int) -> int:
        return int.from_bytes(hmac.new(key, half.to_bytes(4, "big"), hashlib.sha256).digest()[:4], "big")

    def encode(self, kind: str, number: int) -> str:
        left, right = (number >> 32) & _MASK, number & _MASK
        for key in self._keys[kind]:
            left, right = right, left ^ self._round(key, right)
        return f"{kind}_{(left << 32 | right):016x}"

    def decode(self, kind: str, text: Any) -> int | None:
        """The row number of ``kind``'s public id, or None when ``text`` is not one."""
        match = _ID.match(text) if isinstance(text, str) else None
        if match is None or match.group(1) != kind:
            return None
        value = int(match.group(2), 16)
        left, right = value >> 32, value & _MASK
        for key in reversed(self._keys[kind]):
            left, right = right ^ self._round(key, left), left
        return left << 32 | right


async def load_public_ids(conn: Any) -> PublicIds:
    cur = await conn.execute("SELECT secret FROM install_secrets WHERE name = 'public_ids'")
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("install_secrets has no 'public_ids' row: run `tollway migrate`")
    return PublicIds(bytes(row[0]))
