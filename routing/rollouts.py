"""Model canaries and shadows, changeable at run time.

The config file's ``routing.rollouts`` are the starting point: at start-up each one not yet in the
``rollouts`` table is copied there; from then on the table is the truth. ``tollway rollouts set`` and
``PUT /v1/admin/rollouts`` change it, each change a row in the change channel, whose notification makes
every replica reload the table into its catalog before its next request (``Catalog.set_rollouts``).

A rollout may have steps (canary percentages, e.g. 5, 20, 50, 100) and a minimum of scored samples per
step: the quality monitor (``tollway.gateway.quality.watch``) moves it to the next step only while its
sequential test shows no regression against the model it stands in for, and rolls it back (canary 0%)
at any step on a breach, where ``auto_rollback`` is on. Every step and rollback is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from tollway.config import RawRollout, parse_steps
from tollway.errors import InvalidRequest, NotFound
from tollway.infra import changes
from tollway.jsontypes import JSON
from tollway.routing import Catalog

ROLLOUT_KIND = "rollout"
_COLUMNS = ("model, candidate, canary_percent, shadow_percent, steps, step, min_samples, auto_rollback, state,"
            " step_started_at, first_sample, source, updated_at")


@dataclass(frozen=True, slots=True)
class Rollout:
    model: str
    candidate: str
    canary_percent: float
    shadow_percent: float
    steps: tuple[float, ...]
    step: int
    min_samples: int
    auto_rollback: bool
    state: str  # 'active', 'complete', 'rolled_back'
    step_started_at: datetime
    first_sample: int  # the first quality sample of the current step
    source: str
    updated_at: datetime

    @classmethod
    def of(cls, row: Sequence[Any]) -> Rollout:
        values = list(row)
        values[4] = tuple(float(s) for s in values[4] or ())
        return cls(*values)

    @property
    def progressive(self) -> bool:
        return bool(self.steps)

    def raw(self) -> RawRollout:
        return RawRollout(model=self.model, candidate=self.candidate, canary_percent=self.canary_percent,
                          shadow_percent=self.shadow_percent)

    def as_json(self) -> JSON:
        return {"object": "rollout", "model": self.model, "candidate": self.candidate,
                "canary_percent": self.canary_percent, "shadow_percent": self.shadow_percent,
                "steps": list(self.steps), "step": self.step if self.steps else None, "min_samples": self.min_samples,
                "auto_rollback": self.auto_rollback, "state": self.state, "source": self.source,
                "step_started_at": self.step_started_at.isoformat(), "updated_at": self.updated_at.isoformat()}


async def list_rollouts(conn: psycopg.AsyncConnection[Any]) -> list[Rollout]:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM rollouts ORDER BY model")
    return [Rollout.of(r) for r in await cur.fetchall()]


async def get_rollout(conn: psycopg.AsyncConnection[Any], model: str, *, lock: bool = False) -> Rollout | None:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE model = %s{' FOR UPDATE' if lock else ''}",
                             (model,))
    row = await cur.fetchone()
    return None if row is None else Rollout.of(row)


async def next_sample_id(conn: psycopg.AsyncConnection[Any]) -> int:
    """Samples from here on belong to a step that starts now."""
    cur = await conn.execute("SELECT coalesce(max(id), 0) + 1 FROM quality_samples")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def seed_rollouts(conn: psycopg.AsyncConnection[Any], catalog: Catalog) -> None:
    """Copy the config file's rollouts that the table does not hold yet (the table wins afterwards)."""
    for r in catalog.routing.rollouts:
        await conn.execute(
            "INSERT INTO rollouts (model, candidate, canary_percent, shadow_percent, source) VALUES"
            " (%s, %s, %s, %s, 'config') ON CONFLICT (model) DO NOTHING",
            (r.model, r.candidate, r.canary_percent, r.shadow_percent))


async def load_rollouts(conn: psycopg.AsyncConnection[Any], catalog: Catalog) -> list[Rollout]:
    """The table, applied to this process's catalog."""
    rollouts = await list_rollouts(conn)
    catalog.set_rollouts(r.raw() for r in rollouts)
    return rollouts


async def set_rollout(conn: psycopg.AsyncConnection[Any], catalog: Catalog | None, model: str, *, candidate: str,
                      percent: float | None = None, shadow_percent: float | None = None,
                      steps: Sequence[float] = (), min_samples: int | None = None, auto_rollback: bool | None = None,
                      author: str, reason: str | None = None) -> Rollout:
    """Create or change the rollout of ``model``. With steps, the canary starts at the first step (unless
    ``percent`` says otherwise) and the monitor moves it on. ``catalog``: checks the model names."""
    if catalog is not None:
        for name, param in ((model, "model"), (candidate, "candidate")):
            if catalog.get(name) is None:
                raise NotFound(f"The model '{name}' does not exist.", param=param, code="model_not_found")
    if model == candidate:
        raise InvalidRequest("A rollout's candidate must differ from its model.", param="candidate")
    for value, param in ((percent, "percent"), (shadow_percent, "shadow_percent")):
        if value is not None and not 0 <= value <= 100:
            raise InvalidRequest(f"{param} must be between 0 and 100", param=param)
    if min_samples is not None and min_samples < 1:
        raise InvalidRequest("min_samples must be at least 1", param="min_samples")
    steps = parse_steps(steps)
    async with conn.transaction():
        before = await get_rollout(conn, model, lock=True)
        same = before is not None and before.candidate == candidate
        canary = percent if percent is not None else steps[0] if steps else (
            before.canary_percent if same and before is not None else 0.0)
        shadow = shadow_percent if shadow_percent is not None else (
            before.shadow_percent if same and before is not None else 0.0)
        first = await next_sample_id(conn)
        cur = await conn.execute(
            "INSERT INTO rollouts (model, candidate, canary_percent, shadow_percent, steps, step, min_samples,"
            " auto_rollback, state, step_started_at, first_sample, source) VALUES (%s, %s, %s, %s, %s, 0,"
            " coalesce(%s, 200), coalesce(%s, true), 'active', now(), %s, 'api') ON CONFLICT (model) DO UPDATE SET"
            " candidate = EXCLUDED.candidate, canary_percent = EXCLUDED.canary_percent, shadow_percent ="
            " EXCLUDED.shadow_percent, steps = EXCLUDED.steps, step = 0, min_samples = coalesce(%s,"
            " rollouts.min_samples), auto_rollback = coalesce(%s, rollouts.auto_rollback), state = 'active',"
            " step_started_at = now(), first_sample = EXCLUDED.first_sample, source = 'api', updated_at = now()"
            f" RETURNING {_COLUMNS}",
            (model, candidate, canary, shadow, list(steps), min_samples, auto_rollback, first, min_samples,
             auto_rollback))
        row = await cur.fetchone()
        assert row is not None
        after = Rollout.of(row)
        await changes.record(conn, author=author, kind=ROLLOUT_KIND, subject=model, action="set",
                             before=None if before is None else before.as_json(), after=after.as_json(), reason=reason)
    return after


async def move_rollout(conn: psycopg.AsyncConnection[Any], current: Rollout, *, action: str, author: str,
                       reason: str, evidence: JSON | None = None) -> Rollout:
    """The monitor's moves: ``advance`` (the next step, or ``complete`` after the last) or ``rollback``
    (canary 0%); recorded with their evidence. Refused (NotFound) when the rollout changed meanwhile."""
    async with conn.transaction():
        now = await get_rollout(conn, current.model, lock=True)
        if now is None or now.updated_at != current.updated_at:
            raise NotFound(f"the rollout of {current.model} changed meanwhile", param="model")
        first = await next_sample_id(conn)
        args: tuple[float, ...] = ()
        if action == "rollback":
            sets = "canary_percent = 0, state = 'rolled_back'"
        elif now.step + 1 < len(now.steps):
            sets, args = "step = step + 1, canary_percent = %s", (now.steps[now.step + 1],)
        else:
            sets = "state = 'complete'"
        cur = await conn.execute(
            f"UPDATE rollouts SET {sets}, step_started_at = now(), first_sample = %s, updated_at = now()"
            f" WHERE model = %s RETURNING {_COLUMNS}", (*args, first, current.model))
        row = await cur.fetchone()
        assert row is not None
        after = Rollout.of(row)
        await changes.record(conn, author=author, kind=ROLLOUT_KIND, subject=current.model, action=action,
                             before=now.as_json(), after={**after.as_json(), "evidence": evidence}, reason=reason)
    return after


async def delete_rollout(conn: psycopg.AsyncConnection[Any], model: str, *, author: str,
                         reason: str | None = None) -> Rollout:
    async with conn.transaction():
        before = await get_rollout(conn, model, lock=True)
        if before is None:
            raise NotFound(f"Model '{model}' has no rollout.", param="model", code="rollout_not_found")
        await conn.execute("DELETE FROM rollouts WHERE model = %s", (model,))
        await changes.record(conn, author=author, kind=ROLLOUT_KIND, subject=model, action="delete",
                             before=before.as_json(), reason=reason)
    return before
