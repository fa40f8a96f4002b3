"""Budgets and tenant policies: list, set, delete and reset budgets; a tenant's policy (failure mode,
limits, breakers); reconciliation of the Redis counters with the ledger. Admin keys, any tenant named in
the request. Every change is a row in the change channel and reaches every replica through its
notification (within the policy cache TTL if a replica's listener is down); no restart."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from tollway.errors import NotFound
from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import Body, admin, app_state
from tollway.gateway.metering.quota import clear_counters
from tollway.gateway.metering.reconcile import reconcile
from tollway.gateway.tenancy.keys import tenant_id
from tollway.gateway.tenancy.policy import (
    USD_BOUND,
    USD_PLACES,
    delete_budget,
    list_budgets,
    load_rules,
    mark_reset,
    policy_json,
    set_budget,
    set_policy,
    unpriced_models,
    unpriced_warning,
)
from tollway.keep import KEEP

router = APIRouter()


class BudgetBody(Body):
    tenant: str
    reason: str | None = None
    scope: Literal["tenant", "key", "user", "session"] = "tenant"
    subject: str | None = None
    window: Literal["minute", "hour", "day", "month", "lifetime"]
    limit_usd: Decimal | None = Field(default=None, ge=0, lt=USD_BOUND, decimal_places=USD_PLACES)
    limit_tokens: int | None = Field(default=None, ge=0)
    # alerts once per window at these shares of the limit, and/or "forecast"; absent: the gateway's defaults
    alerts: list[str] | None = None


class ResetBody(Body):
    tenant: str
    reason: str | None = None
    budget_id: int | None = None


class PolicyBody(Body):
    tenant: str
    reason: str | None = None
    redis_failure: Literal["closed", "open"] | None = None
    default_max_tokens: int | None = Field(default=None, gt=0)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_parallel_requests: int | None = Field(default=None, gt=0, le=1_000_000)
    velocity_soft_usd_per_min: Decimal | None = Field(default=None, gt=0, lt=USD_BOUND, decimal_places=USD_PLACES)
    velocity_hard_usd_per_min: Decimal | None = Field(default=None, gt=0, lt=USD_BOUND, decimal_places=USD_PLACES)
    retry_storm_limit: int | None = Field(default=None, ge=0)
    retry_storm_window_s: int | None = Field(default=None, gt=0)
    route_threshold: float | None = Field(default=None, ge=0, le=1)
    allowed_models: list[str] | None = None
    quality_floor: str | None = None
    degraded_answers: bool | None = None
    response_cache: bool | None = None
    store_content: bool | None = None
    content_retention_days: int | None = Field(default=None, gt=0)


class ReconcileBody(Body):
    tenant: str | None = None
    allow_decrease: bool = False


@router.get("/v1/admin/budgets", summary="List a tenant's budgets")
async def get_budgets(request: Request, tenant: str) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        budgets = await list_budgets(conn, tenant)
    return json_response({"object": "list", "data": [b.as_json() for b in budgets]})


@router.put("/v1/admin/budgets", summary="Create a budget, or change only the fields given (null clears a limit)")
async def put_budget(request: Request, body: BudgetBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    given = body.model_fields_set  # an absent field keeps its value; an explicit null clears it
    async with state.pool.connection() as conn:
        budget = await set_budget(
            conn, body.tenant, scope=body.scope, subject=body.subject, period=body.window,
            limit_usd=body.limit_usd if "limit_usd" in given else KEEP,
            limit_tokens=body.limit_tokens if "limit_tokens" in given else KEEP,
            alerts=body.alerts if "alerts" in given else KEEP, author=principal.author, reason=body.reason)
        out = budget.as_json()
        if budget.limit_usd is not None:
            allowed = (await load_rules(conn, budget.tenant_id)).policy.allowed_models
            serving = [name for name in state.catalog.unpriced() if allowed is None or name in allowed]
            if models := await unpriced_models(conn, budget.tenant_id, serving):
                out["warnings"] = [unpriced_warning(models)]
    # Its counters start from what its window has already spent before this answers (each gateway seeds them
    # again when the change reaches it, raising only): a request sent after the answer, to any gateway, is
    # judged against the window's spend, not against zero.
    if state.seed_budget is not None:
        await state.seed_budget(budget.tenant_id, budget.id)
    state.policies.forget(budget.tenant_id)
    return json_response(out)


@router.delete("/v1/admin/budgets/{budget_id}", summary="Delete a budget")
async def remove_budget(request: Request, budget_id: int, tenant: str) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        if not await delete_budget(conn, tenant, budget_id, author=principal.author):
            raise NotFound(f"budget {budget_id} does not exist for tenant {tenant!r}", code="budget_not_found")
        state.policies.forget(await tenant_id(conn, tenant))
    return json_response({"deleted": budget_id})


@router.post("/v1/admin/budgets/reset", summary="Give a fresh allowance for the rest of the current window")
async def reset_budgets(request: Request, body: ResetBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn, conn.transaction():  # recorded only once the counters are cleared
        budgets = await mark_reset(conn, body.tenant, body.budget_id, author=principal.author, reason=body.reason)
        cleared = await clear_counters(state.redis, budgets)
    for budget in budgets:
        state.policies.forget(budget.tenant_id)
    return json_response({"reset": [b.id for b in budgets], "counters_cleared": cleared})


@router.get("/v1/admin/policies", summary="A tenant's policy, and what the gateway applies where it sets nothing")
async def get_policy(request: Request, tenant: str) -> Response:
    admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        policy = (await load_rules(conn, await tenant_id(conn, tenant))).policy
    return json_response(policy_json(policy, state.policies.default_parallel))


@router.put("/v1/admin/policies", summary="Change a tenant's policy (Redis failure mode, limits, breakers)")
async def put_policy(request: Request, body: PolicyBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    fields = body.model_dump(exclude={"tenant", "reason"}, exclude_unset=True)
    async with state.pool.connection() as conn:
        policy = await set_policy(conn, body.tenant, tiers=[t.name for t in state.catalog.tiers],
                                  author=principal.author, reason=body.reason, **fields)
    state.policies.forget(policy.tenant_id)
    return json_response(policy_json(policy, state.policies.default_parallel))


@router.post("/v1/admin/reconcile", summary="Compare Redis counters with the ledger; correct and report drift")
async def post_reconcile(request: Request, body: ReconcileBody) -> Response:
    admin(request)
    state = app_state(request)
    await state.ledger.flush()
    ids = None
    if body.tenant is not None:
        async with state.pool.connection() as conn:
            ids = [await tenant_id(conn, body.tenant)]
    report = await reconcile(state.pool, state.redis, tenant_ids=ids, allow_decrease=body.allow_decrease)
    return json_response(report.as_json())
