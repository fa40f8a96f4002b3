"""Tenants and their keys as tests hold them, and the ledger's rows as tests read them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psycopg


def key_hasher() -> Any:
    """The keyed hash under the test run's key secret (conftest sets TOLLWAY_KEY_SECRET for every process)."""
    from tollway.gateway.tenancy.keys import KeyHasher

    return KeyHasher(os.environ["TOLLWAY_KEY_SECRET"].encode())


@dataclass
class Tenant:
    name: str
    id: int
    key: str
    key_id: int

    @property
    def headers(self) -> dict[str, str]:
        """This tenant's key as request headers."""
        return {"authorization": f"Bearer {self.key}"}


def ledger_rows(database_url: str, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(f"SELECT * FROM ledger WHERE {where} ORDER BY created_at", params)
        cols = [c.name for c in cur.description or []]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


