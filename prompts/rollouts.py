"""Prompt rollouts: a label's traffic split moved to a candidate version in steps (5, 20, 50, 100 percent).
The live quality monitor (``tollway.gateway.quality.watch``) moves each step on while the candidate shows
no regression, or moves everyone back; a rollout of ``production`` passes the gate first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from tollway.config import parse_steps
from tollway.errors import InvalidRequest, NotFound
from tollway.jsontypes import JSON
from tollway.prompts.labels import (
    PRODUCTION,
    Gated,
    GateRefused,
    labels_of,
    move_label,
    run_gate,
    still_gated,
)
from tollway.prompts.store import version


def rollout_settings(steps: Sequence[float], min_samples: int) -> tuple[float, ...]:
    """A rollout's steps, checked (increasing percentages), or the 400 that says what is wrong."""
    parsed = parse_steps(steps)
    if not parsed:
        raise InvalidRequest("A prompt rollout needs steps, such as 5,20,50,100.", param="steps")
    if min_samples < 1:
        raise InvalidRequest("min_samples must be at least 1", param="min_samples")
    return parsed


def rollout_check(name: str, label: str, steps: Sequence[float],
                  min_samples: int) -> Callable[[str, str | None], None]:
    """What refuses a rollout of ``label`` to a version, before any gate runs: its settings (checked here), a
    label that does not exist, or one that already holds the version (checked by what this returns)."""
    rollout_settings(steps, min_samples)
    return _target_check(name, label)


def _target_check(name: str, label: str) -> Callable[[str, str | None], None]:
    def check(target: str, current: str | None) -> None:
        if current is None:
            raise NotFound(f"Prompt '{name}' has no label '{label}' to roll out from.", param="label",
                           code="prompt_not_found")
        if target == current:
            raise InvalidRequest(f"Label '{label}' already holds that version.", param="version")
    return check


async def start_prompt_rollout(conn: psycopg.AsyncConnection[Any], tenant_id: int, tenant: str, name: str, label: str,
                               candidate: str, steps: Sequence[float], *, min_samples: int = 200, author: str,
                               reason: str | None = None, gate: Any = None, actor: Any = None,
                               gated: Gated | None = None) -> JSON:
    """Split ``steps[0]`` percent of the label's users to ``candidate``; the monitor moves the split on
    (and finally the label) while the candidate shows no regression, or moves everyone back. A rollout of
    ``production`` passes the gate first, as a move of production would (``gated``: its verdict reached
    beforehand with ``gate_move``, its ``check`` being ``rollout_check``)."""
    steps = rollout_settings(steps, min_samples)
    current = next((lb for lb in await labels_of(conn, tenant_id, name) if lb.label == label), None)
    target = (await version(conn, tenant_id, name, candidate)).version
    _target_check(name, label)(target, None if current is None else current.version)
    assert current is not None
    if label == PRODUCTION:
        result = (still_gated(gated, target, current.version) if gated is not None
                  else await run_gate(gate, tenant, name, target, current.version, actor))
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
