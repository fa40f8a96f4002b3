"""Model canaries and shadows, changeable at run time.

The config file's ``routing.rollouts`` are the starting point: at start-up each one not yet in the
``rollouts`` table is copied there; from then on the table is the truth. ``tollway rollouts set`` and
``PUT /v1/admin/rollouts`` change it, each change a row in the change channel, whose notification makes
every replica reload the table into its catalog before its next request (``Catalog.set_rollouts``).

A rollout may have steps (canary percentages, e.g. 5, 20, 50, 100) and a minimum of scored samples per
step: the quality monitor (``tollway.gateway.watch``) moves it to the next step only while its
sequential test shows no regression against the model it stands in for, and rolls it back (canary 0%)
at any step on a breach, where ``auto_rollback`` is on. Every step and rollback is recorded.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from tollway import changes
from tollway.errors import InvalidRequest, NotFound
from tollway.jsontypes import JSON
from tollway.routing import Catalog
from tollway.routing.config import RawRollout

KIND = "rollout"
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


def parse_steps(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """"5,20,50,100" -> (5.0, 20.0, 50.0, 100.0): increasing canary percentages in (0, 100]."""
    if text is None or text == "":
        return ()
    try:
        steps = tuple(float(s) for s in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise InvalidRequest(f"steps are canary percentages such as 5,20,50,100 (got {text!r})",
                             param="steps") from None
    if any(not 0 < s <= 100 for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidRequest("steps must increase, each above 0 and at most 100", param="steps")
    return steps


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


async def seed(conn: psycopg.AsyncConnection[Any], catalog: Catalog) -> None:
    """Copy the config file's rollouts that the table does not hold yet (the table wins afterwards)."""
    for r in catalog.routing.rollouts:
        await conn.execute(
            "INSERT INTO rollouts (model, candidate, canary_percent, shadow_percent, source) VALUES"
            " (%s, %s, %s, %s, 'config') ON CONFLICT (model) DO NOTHING",
            (r.model, r.candidate, r.canary_percent, r.shadow_percent))


async def load_into(conn: psycopg.AsyncConnection[Any], catalog: Catalog) -> list[Rollout]:
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
        await changes.record(conn, author=author, kind=KIND, subject=model, action="set",
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
        await changes.record(conn, author=author, kind=KIND, subject=current.model, action=action,
                             before=now.as_json(), after={**after.as_json(), "evidence": evidence}, reason=reason)
    return after


async def delete_rollout(conn: psycopg.AsyncConnection[Any], model: str, *, author: str,
                         reason: str | None = None) -> Rollout:
    async with conn.transaction():
        before = await get_rollout(conn, model, lock=True)
        if before is None:
            raise NotFound(f"Model '{model}' has no rollout.", param="model", code="rollout_not_found")
        await conn.execute("DELETE FROM rollouts WHERE model = %s", (model,))
        await changes.record(conn, author=author, kind=KIND, subject=model, action="delete",
                             before=before.as_json(), reason=reason)
    return before


# -- prompt rollouts: a label split moved in steps -------------------------------------------------
async def start_prompt_rollout(conn: psycopg.AsyncConnection[Any], tenant_id: int, tenant: str, name: str, label: str,
                               candidate: str, steps: Sequence[float], *, min_samples: int = 200, author: str,
                               reason: str | None = None, gate: Any = None, actor: Any = None) -> JSON:
    """Split ``steps[0]`` percent of the label's users to ``candidate``; the monitor moves the split on
    (and finally the label) while the candidate shows no regression, or moves everyone back. A rollout of
    ``production`` passes the gate first, as a move of production would."""
    from tollway.prompts.labels import PRODUCTION, GateRefused, labels_of, move_label, run_gate
    from tollway.prompts.store import version

    steps = parse_steps(steps)
    if not steps:
        raise InvalidRequest("A prompt rollout needs steps, such as 5,20,50,100.", param="steps")
    if min_samples < 1:
        raise InvalidRequest("min_samples must be at least 1", param="min_samples")
    current = next((lb for lb in await labels_of(conn, tenant_id, name) if lb.label == label), None)
    if current is None:
        raise NotFound(f"Prompt '{name}' has no label '{label}' to roll out from.", param="label",
                       code="prompt_not_found")
    target = (await version(conn, tenant_id, name, candidate)).version
    if target == current.version:
        raise InvalidRequest(f"Label '{label}' already holds that version.", param="version")
    if label == PRODUCTION:
        result = await run_gate(gate, tenant, name, target, current.version, actor)
        if not result.passed:
            raise GateRefused(f"The gate refused {name}@{target[:12]} for production: {result.summary}",
                              result.report)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO prompt_rollouts (tenant_id, name, label, candidate, previous, steps, min_samples)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, name, label) DO UPDATE SET"
            " candidate = EXCLUDED.candidate, previous = EXCLUDED.previous, steps = EXCLUDED.steps, step = 0,"
            " min_samples = EXCLUDED.min_samples, state = 'active', updated_at = now()",
            (tenant_id, name, label, target, current.version, list(steps), min_samples))
        after, _ = await move_label(conn, tenant_id, tenant, name, label, current.version, author=author,
                                    reason=reason or f"rollout of {target[:12]} in steps {list(steps)}",
                                    split_version=target, split_percent=steps[0], admin=True, override=True)
    return {"object": "prompt.rollout", "prompt": name, "label": label, "candidate": target,
            "previous": current.version, "steps": list(steps), "step": 0, "min_samples": min_samples,
            "state": "active", "split": after.as_json()}


async def list_prompt_rollouts(conn: psycopg.AsyncConnection[Any], tenant_id: int | None = None) -> list[JSON]:
    """A tenant's prompt rollouts (None: every tenant's)."""
    cur = await conn.execute(
        "SELECT r.name, r.label, r.candidate, r.previous, r.steps, r.step, r.min_samples, r.state, r.updated_at,"
        " t.name FROM prompt_rollouts r JOIN tenants t ON t.id = r.tenant_id WHERE %s::bigint IS NULL"
        " OR r.tenant_id = %s ORDER BY t.name, r.name, r.label", (tenant_id, tenant_id))
    return [{"object": "prompt.rollout", "tenant": r[9], "prompt": r[0], "label": r[1], "candidate": r[2],
             "previous": r[3], "steps": list(r[4]), "step": r[5], "min_samples": r[6], "state": r[7],
             "updated_at": r[8].isoformat()} for r in await cur.fetchall()]
