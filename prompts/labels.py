"""Labels (``production``, ``staging``, ``canary``, any name) point at versions; a label may split traffic
between two versions by percentage. Every move is a row in the change channel (who, from, to, when,
why), which is also how ``rollback`` finds the version a label held before. A move of ``production``
calls the gate first (``tollway.prompts.gate``)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.errors import Conflict, InvalidRequest, NotFound, TollwayError
from tollway.infra import changes
from tollway.prompts.gate import Gate, GateResult
from tollway.prompts.store import version

PRODUCTION = "production"
GATE_TIMEOUT_S = 600.0


class GateRefused(TollwayError):
    status = 409
    type = "invalid_request_error"
    code = "gate_failed"

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"]["report"] = self.report
        return out


@dataclass(frozen=True, slots=True)
class Label:
    name: str
    label: str
    version: str
    split_version: str | None = None
    split_percent: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"prompt": self.name, "label": self.label, "version": self.version,
                "split_version": self.split_version, "split_percent": self.split_percent}

    def pick(self, subject: str) -> str:
        """The version this end user (or key) gets: stable per user, salted per prompt, so prompt splits
        and model canaries do not pick the same users."""
        if not self.split_version or self.split_percent <= 0:
            return self.version
        return self.split_version if bucket(self.name, subject) * 100 < self.split_percent else self.version


def bucket(prompt: str, subject: str) -> float:
    digest = hashlib.blake2b(subject.encode(), digest_size=8, key=prompt.encode()[:64], person=b"tw-prompt").digest()
    return int.from_bytes(digest, "big") / 2**64


async def labels_of(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str | None = None) -> list[Label]:
    cur = await conn.execute(
        "SELECT name, label, version, split_version, split_percent FROM prompt_labels WHERE tenant_id = %s"
        " AND (%s::text IS NULL OR name = %s) ORDER BY name, label", (tenant_id, name, name))
    return [Label(*r) for r in await cur.fetchall()]


def may_override(label: str, override: bool, admin: bool) -> None:
    """Only an admin overrides production's gate."""
    if label == PRODUCTION and override and not admin:
        raise InvalidRequest("Only an admin may override the gate.", param="override")


@dataclass(frozen=True, slots=True)
class Gated:
    """The gate's verdict on moving production from ``current`` to ``candidate`` (versions), reached before the
    move with no connection held (``gate_move``): the move holds the label's row while it writes, and checks
    that the label still holds ``current``."""

    candidate: str
    current: str | None
    result: GateResult


async def gate_move(pool: AsyncConnectionPool, tenant_id: int, tenant: str, name: str, label: str, target: str,
                    gate: Gate | None, actor: Any = None,
                    check: Callable[[str, str | None], None] | None = None) -> Gated | None:
    """For a move of ``production``, the gate's verdict; None for any other label. A gate runs a golden set
    through the gateway (seconds to minutes, requests that need the pool themselves): no pooled connection
    waits for it, and no lock. ``check(candidate, current)`` may refuse the move before the gate runs."""
    if label != PRODUCTION:
        return None
    async with pool.connection() as conn:
        candidate = (await version(conn, tenant_id, name, target)).version
        cur = await conn.execute("SELECT version FROM prompt_labels WHERE tenant_id = %s AND name = %s AND label = %s",
                                 (tenant_id, name, label))
        row = await cur.fetchone()
    current = None if row is None else str(row[0])
    if check is not None:
        check(candidate, current)
    return Gated(candidate, current, await run_gate(gate, tenant, name, candidate, current, actor))


def still_gated(gated: Gated, candidate: str, current: str | None) -> GateResult:
    """``gated``'s result, if the move it judged is still the one being made."""
    if (gated.candidate, gated.current) != (candidate, current):
        raise Conflict("Production moved (or the version named moved) while the gate ran; move it again.",
                       param="version", code="label_moved")
    return gated.result


async def move_label(conn: psycopg.AsyncConnection[Any], tenant_id: int, tenant: str, name: str, label: str,
                     target: str, *, author: str, reason: str | None = None, split_version: str | None = None,
                     split_percent: float = 0.0, gate: Gate | None = None, admin: bool = False,
                     override: bool = False, actor: Any = None, note: Any = None,
                     gated: Gated | None = None) -> tuple[Label, GateResult | None]:
    """Point ``label`` at ``target`` (a version or another label), optionally splitting ``split_percent``
    of users to ``split_version``. Moving ``production`` runs the gate (admins may override it, recorded);
    ``gated``: its verdict reached beforehand (``gate_move``), for this very move."""
    if not 0 <= split_percent <= 100:
        raise InvalidRequest("split_percent must be between 0 and 100", param="split_percent")
    to = (await version(conn, tenant_id, name, target)).version
    split = None if split_version is None else (await version(conn, tenant_id, name, split_version)).version
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT name, label, version, split_version, split_percent FROM prompt_labels"
            " WHERE tenant_id = %s AND name = %s AND label = %s FOR UPDATE", (tenant_id, name, label))
        row = await cur.fetchone()
        before = None if row is None else Label(*row)
        result = None
        if label == PRODUCTION:
            may_override(label, override, admin)
            current = None if before is None else before.version
            result = (still_gated(gated, to, current) if gated is not None
                      else await run_gate(gate, tenant, name, to, current, actor))
            if not result.passed and not override:
                raise GateRefused(f"The gate refused {name}@{to[:12]} for production: {result.summary}",
                                  result.report)
        await conn.execute(
            "INSERT INTO prompt_labels (tenant_id, name, label, version, split_version, split_percent)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, name, label) DO UPDATE SET"
            " version = EXCLUDED.version, split_version = EXCLUDED.split_version,"
            " split_percent = EXCLUDED.split_percent, updated_at = now()",
            (tenant_id, name, label, to, split, split_percent if split else 0.0))
        after = Label(name, label, to, split, split_percent if split else 0.0)
        gate_note = None if result is None else {"passed": result.passed, "summary": result.summary,
                                                 "overridden": override and not result.passed}
        await changes.record(conn, author=author, kind="prompt_label", subject=f"{name}:{label}", action="move",
                             tenant_id=tenant_id, before=None if before is None else before.as_json(),
                             after={**after.as_json(), "gate": gate_note, **({"evidence": note} if note else {})},
                             reason=reason)
    return after, result


async def rollback(conn: psycopg.AsyncConnection[Any], tenant_id: int, tenant: str, name: str, label: str, *,
                   author: str, reason: str | None = None, note: Any = None) -> Label:
    """Move ``label`` back to the version it held before its last move (no gate: going back is the remedy)."""
    cur = await conn.execute(
        "SELECT before FROM changes WHERE tenant_id = %s AND kind = 'prompt_label' AND subject = %s"
        " ORDER BY id DESC LIMIT 1", (tenant_id, f"{name}:{label}"))
    row = await cur.fetchone()
    if row is None or row[0] is None:
        raise NotFound(f"Label '{label}' of prompt '{name}' has no earlier version to roll back to.",
                       param="label", code="no_previous_version")
    before = row[0]
    after, _ = await move_label(conn, tenant_id, tenant, name, label, before["version"], author=author,
                                reason=reason or "rollback", split_version=before.get("split_version"),
                                split_percent=float(before.get("split_percent") or 0), gate=None,
                                admin=True, override=True, note=note)
    return after


async def run_gate(gate: Gate | None, tenant: str, name: str, candidate: str, current: str | None,
                   actor: Any = None) -> GateResult:
    if gate is None:
        return GateResult(True, "no gate (always passes)", {"gate": "none"})
    try:
        return await asyncio.wait_for(gate.check(tenant, name, candidate, current, actor), GATE_TIMEOUT_S)
    except TimeoutError:
        return GateResult(False, f"the gate did not answer within {GATE_TIMEOUT_S:g}s", {"gate": "timeout"})
