"""Admin routes of the live quality loop: model rollouts (canaries, shadows, steps), prompt rollouts, what
the monitor watches, and the content policy's erasure. Every change is a row in the change channel and
reaches every replica through its notification before their next request."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import admin, app_state
from tollway.gateway.quality.sampling import erase, list_rates
from tollway.gateway.tenancy.keys import tenant_id
from tollway.prompts import gate_move, list_prompt_rollouts, rollout_check, start_prompt_rollout
from tollway.routing import delete_rollout, list_rollouts, load_rollouts, set_rollout

router = APIRouter()


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolloutBody(Body):
    candidate: str
    percent: float | None = Field(default=None, ge=0, le=100)  # canary share (default: the first step, or 0)
    shadow_percent: float | None = Field(default=None, ge=0, le=100)
    steps: list[float] | None = None  # progressive: e.g. [5, 20, 50, 100]
    min_samples: int | None = Field(default=None, ge=1)
    auto_rollback: bool | None = None
    reason: str | None = None


class PromptRolloutBody(Body):
    tenant: str
    prompt: str
    label: str = "production"
    version: str
    steps: list[float] = Field(min_length=1)
    min_samples: int = Field(default=200, ge=1)
    reason: str | None = None


class EraseBody(Body):
    tenant: str
    user: str | None = None  # one end user's content; absent: the whole tenant's
    reason: str | None = None


@router.get("/v1/admin/rollouts", summary="Model rollouts (canary and shadow shares, steps, state)")
async def get_rollouts(request: Request) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        rows = await list_rollouts(conn)
    return json_response({"object": "list", "data": [r.as_json() for r in rows]})


@router.put("/v1/admin/rollouts/{model}", summary="Create or change a model rollout (every replica, at once)")
async def put_rollout(request: Request, model: str, body: RolloutBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        rollout = await set_rollout(conn, state.catalog, model, candidate=body.candidate, percent=body.percent,
                                    shadow_percent=body.shadow_percent, steps=body.steps or (),
                                    min_samples=body.min_samples, auto_rollback=body.auto_rollback,
                                    author=principal.author, reason=body.reason)
        await load_rollouts(conn, state.catalog)  # this replica at once; the others on the notification
    return json_response(rollout.as_json())


@router.delete("/v1/admin/rollouts/{model}", summary="End a model rollout")
async def remove_rollout(request: Request, model: str, reason: str | None = None) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        rollout = await delete_rollout(conn, model, author=principal.author, reason=reason)
        await load_rollouts(conn, state.catalog)
    return json_response({**rollout.as_json(), "deleted": True})


@router.get("/v1/admin/prompt-rollouts", summary="A tenant's prompt rollouts")
async def get_prompt_rollouts(request: Request, tenant: str) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        rows = await list_prompt_rollouts(conn, await tenant_id(conn, tenant))
    return json_response({"object": "list", "data": rows})


@router.post("/v1/admin/prompt-rollouts", summary="Roll a prompt version out to a label in steps")
async def post_prompt_rollout(request: Request, body: PromptRolloutBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        tid = await tenant_id(conn, body.tenant)
    # production's gate runs first, holding no connection of the pool: it may take minutes
    gated = await gate_move(state.pool, tid, body.tenant, body.prompt, body.label, body.version, state.prompt_gate,
                            principal, check=rollout_check(body.prompt, body.label, body.steps, body.min_samples))
    async with state.pool.connection() as conn:
        out = await start_prompt_rollout(conn, tid, body.tenant, body.prompt, body.label, body.version, body.steps,
                                         min_samples=body.min_samples, author=principal.author, reason=body.reason,
                                         gate=state.prompt_gate, actor=principal, gated=gated)
    await state.prompts.load(tid)
    return json_response(out)


@router.get("/v1/admin/quality", summary="What the quality monitor watches, and the sampling rates it asks for")
async def get_quality(request: Request) -> Response:
    admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        rates = await list_rates(conn)
    quality = state.quality
    return json_response({"object": "quality", "base_rate": quality.settings.policy.base,
                          "max_rate": quality.settings.policy.ceiling, "rates": rates,
                          "leader": state.monitor.leading, "watches": state.monitor.describe(),
                          "incidents": state.monitor.incidents(), "queue": quality.queue_state()})


@router.post("/v1/admin/content/erase", summary="Erase a tenant's or an end user's stored prompts and answers")
async def erase_content(request: Request, body: EraseBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        tid = await tenant_id(conn, body.tenant)
        erased = await erase(conn, tid, body.user, author=principal.author, subject=body.user or body.tenant,
                             reason=body.reason)
    return json_response({"object": "content.erasure", "tenant": body.tenant, "user": body.user, "erased": erased})
