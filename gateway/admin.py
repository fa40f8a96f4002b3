"""Admin and finance routes: budgets, tenant policies, guard policies, key limits, reconciliation, cost
reports.

Admin keys manage any tenant (named in the request); finance keys read their own tenant's reports.
Every change is a row in the change channel (``GET /v1/admin/changes``) and applies to every replica at
once through its notification (within the policy cache TTL if a replica's listener is down); no restart.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tollway.alerts import list_alerts
from tollway.changes import history
from tollway.errors import NotFound, PermissionDenied
from tollway.gateway.api import json_response
from tollway.gateway.keys import Principal, create_key, list_keys, list_tenants, tenant_id
from tollway.gateway.quota import clear_counters
from tollway.gateway.reconcile import reconcile
from tollway.gateway.reports import build_query, cost_report, to_csv, top_tier
from tollway.gateway.tenant_policy import (
    delete_budget,
    list_budgets,
    mark_reset,
    set_budget,
    set_guards,
    set_key_limits,
    set_policy,
)
from tollway.gateway.tenant_policy import get_guards as get_tenant_guards
from tollway.guardrails.policy import BUILTIN, GuardPolicy, resolve

router = APIRouter()


def _admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    if principal.role != "admin":
        raise PermissionDenied("This needs an admin key.", code="role_not_allowed")
    return principal


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetBody(_Body):
    tenant: str
    reason: str | None = None
    scope: Literal["tenant", "key", "user", "session"] = "tenant"
    subject: str | None = None
    window: Literal["minute", "hour", "day", "month", "lifetime"]
    limit_usd: Decimal | None = Field(default=None, ge=0)
    limit_tokens: int | None = Field(default=None, ge=0)
    # alerts once per window at these shares of the limit, and/or "forecast"; absent: the gateway's defaults
    alerts: list[str] | None = None


class ResetBody(_Body):
    tenant: str
    reason: str | None = None
    budget_id: int | None = None


class PolicyBody(_Body):
    tenant: str
    reason: str | None = None
    redis_failure: Literal["closed", "open"] | None = None
    default_max_tokens: int | None = Field(default=None, gt=0)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    velocity_soft_usd_per_min: Decimal | None = Field(default=None, gt=0)
    velocity_hard_usd_per_min: Decimal | None = Field(default=None, gt=0)
    retry_storm_limit: int | None = Field(default=None, ge=0)
    retry_storm_window_s: int | None = Field(default=None, gt=0)
    route_threshold: float | None = Field(default=None, ge=0, le=1)
    allowed_models: list[str] | None = None
    quality_floor: str | None = None
    degraded_answers: bool | None = None
    response_cache: bool | None = None
    store_content: bool | None = None
    content_retention_days: int | None = Field(default=None, gt=0)


class KeyBody(_Body):
    tenant: str
    role: str = "app"  # one of keys.ROLES (create_key says so otherwise)
    models: list[str] | None = None
    name: str | None = Field(default=None, max_length=200)
    ingest: bool = False


class KeyLimitsBody(_Body):
    reason: str | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)


class ReconcileBody(_Body):
    tenant: str | None = None
    allow_decrease: bool = False


@router.get("/v1/admin/budgets", summary="List a tenant's budgets")
async def get_budgets(request: Request, tenant: str) -> Response:
    _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        budgets = await list_budgets(conn, tenant)
    return json_response({"object": "list", "data": [b.as_json() for b in budgets]})


@router.put("/v1/admin/budgets", summary="Create or change a budget (applies within seconds)")
async def put_budget(request: Request, body: BudgetBody) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        budget = await set_budget(conn, body.tenant, scope=body.scope, subject=body.subject, period=body.window,
                                  limit_usd=body.limit_usd, limit_tokens=body.limit_tokens,
                                  author=principal.author, reason=body.reason, alerts=body.alerts)
    state.policies.forget(budget.tenant_id)
    return json_response(budget.as_json())


@router.delete("/v1/admin/budgets/{budget_id}", summary="Delete a budget")
async def remove_budget(request: Request, budget_id: int, tenant: str) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        if not await delete_budget(conn, tenant, budget_id, author=principal.author):
            raise NotFound(f"budget {budget_id} does not exist for tenant {tenant!r}", code="budget_not_found")
        state.policies.forget(await tenant_id(conn, tenant))
    return json_response({"deleted": budget_id})


@router.post("/v1/admin/budgets/reset", summary="Give a fresh allowance for the rest of the current window")
async def reset_budgets(request: Request, body: ResetBody) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        budgets = await mark_reset(conn, body.tenant, body.budget_id, author=principal.author, reason=body.reason)
    cleared = await clear_counters(state.redis, budgets)
    for budget in budgets:
        state.policies.forget(budget.tenant_id)
    return json_response({"reset": [b.id for b in budgets], "counters_cleared": cleared})


@router.put("/v1/admin/policies", summary="Change a tenant's policy (Redis failure mode, limits, breakers)")
async def put_policy(request: Request, body: PolicyBody) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    fields = body.model_dump(exclude={"tenant", "reason"}, exclude_unset=True)
    async with state.pool.connection() as conn:
        policy = await set_policy(conn, body.tenant, tiers=[t.name for t in state.catalog.tiers],
                                  author=principal.author, reason=body.reason, **fields)
    state.policies.forget(policy.tenant_id)
    return json_response(policy.as_json())


class GuardsBody(_Body):
    tenant: str
    reason: str | None = None
    policy: dict[str, Any]  # tollway.guardrails.policy.GuardPolicy: input, output, terms, topics, limits


@router.get("/v1/admin/guards", summary="A tenant's guard policy, and the policy its requests run under")
async def get_guards(request: Request, tenant: str) -> Response:
    _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        policy = await get_tenant_guards(conn, tenant)
    return json_response(_guards_view(state, tenant, policy))


@router.put("/v1/admin/guards", summary="Replace a tenant's guard policy (applies to the next request)")
async def put_guards(request: Request, body: GuardsBody) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        policy = await set_guards(conn, body.tenant, body.policy, extra=state.guarding.names,
                                  author=principal.author, reason=body.reason)
        tid = await tenant_id(conn, body.tenant)
    state.policies.forget(tid)
    return json_response(_guards_view(state, body.tenant, policy))


@router.delete("/v1/admin/guards", summary="Remove a tenant's guard policy (the config's defaults apply)")
async def delete_guards(request: Request, tenant: str, reason: str | None = None) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        await set_guards(conn, tenant, None, author=principal.author, reason=reason)
        tid = await tenant_id(conn, tenant)
    state.policies.forget(tid)
    return json_response(_guards_view(state, tenant, None))


def _guards_view(state: Any, tenant: str, policy: GuardPolicy | None) -> dict[str, Any]:
    effective = resolve(state.guarding.config, policy)
    return {"tenant": tenant, "policy": None if policy is None else policy.model_dump(exclude_none=True),
            "effective": {"input": effective.input, "output": effective.output},
            "validators": sorted({*BUILTIN, *state.guarding.names})}


@router.get("/v1/admin/alerts", summary="Alerts (budget thresholds, drift), newest first, with their evidence")
async def get_alerts(request: Request, tenant: str | None = None, limit: int = 100) -> Response:
    _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        tid = None if tenant is None else await tenant_id(conn, tenant)
        return json_response({"object": "list", "data": await list_alerts(conn, tid, limit)})


@router.get("/v1/admin/tenants", summary="Tenants, with their active keys")
async def get_tenants(request: Request) -> Response:
    _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        return json_response({"object": "list", "data": await list_tenants(conn)})


@router.get("/v1/admin/keys", summary="Keys (never their secrets): role, models, created, last used, revoked")
async def get_keys(request: Request, tenant: str | None = None) -> Response:
    _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        return json_response({"object": "list", "data": await list_keys(conn, tenant)})


@router.post("/v1/admin/keys", status_code=201, summary="Create a key (its secret is in this answer only)")
async def post_key(request: Request, body: KeyBody) -> Response:
    principal = _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        key = await create_key(conn, body.tenant, hasher=request.app.state.tollway.keys.hasher, role=body.role,
                               allowed_models=body.models, name=body.name, author=principal.author,
                               ingest=body.ingest)
    return json_response({"object": "key", "id": key.id, "tenant": key.tenant, "role": key.role,
                          "ingest": key.ingest, "key": key.secret}, status=201)


@router.put("/v1/admin/keys/{key_id}/limits", summary="Set a key's requests and tokens per minute")
async def put_key_limits(request: Request, key_id: int, body: KeyLimitsBody) -> Response:
    principal = _admin(request)
    state = request.app.state.tollway
    async with state.pool.connection() as conn:
        await set_key_limits(conn, key_id, rpm=body.rpm, tpm=body.tpm, author=principal.author,
                             reason=body.reason)
    state.keys.forget(key_id)
    return json_response({"key_id": key_id, "rpm": body.rpm, "tpm": body.tpm})


@router.post("/v1/admin/reconcile", summary="Compare Redis counters with the ledger; correct and report drift")
async def post_reconcile(request: Request, body: ReconcileBody) -> Response:
    _admin(request)
    state = request.app.state.tollway
    await state.ledger.flush()
    ids = None
    if body.tenant is not None:
        async with state.pool.connection() as conn:
            ids = [await tenant_id(conn, body.tenant)]
    report = await reconcile(state.pool, state.redis, tenant_ids=ids, allow_decrease=body.allow_decrease)
    return json_response(report.as_json())


@router.get("/v1/admin/changes", summary="The change channel (audit log): who changed what, before and after")
async def get_changes(request: Request, tenant: str | None = None, limit: int = 100) -> Response:
    _admin(request)
    async with request.app.state.tollway.pool.connection() as conn:
        tid = None if tenant is None else await tenant_id(conn, tenant)
        rows = await history(conn, tenant_id=tid, limit=max(1, min(limit, 1000)))
    return json_response({"object": "list", "data": rows})


@router.get("/v1/admin/routing", summary="Upstream replicas: breaker state, in-flight calls, latency, saturation")
async def get_routing(request: Request) -> Response:
    _admin(request)
    state = request.app.state.tollway
    routing, shadows = state.routing, state.shadows
    return json_response({
        "replicas": {name: replica.describe() for name, replica in routing.health.replicas.items()},
        "retry_budget": {"tokens": round(routing.caller.retry_budget.tokens, 2),
                         "refused": routing.caller.retry_budget.refused},
        "shadows_skipped": shadows.skipped if shadows is not None else 0})


@router.get("/v1/reports/costs", summary="Cost report: spend, tokens, requests and budget use per group")
async def get_cost_report(request: Request, group_by: str = "day", format: str = "json",
                          tenant: str | None = None) -> Response:
    params = request.query_params
    state = request.app.state.tollway
    query = await build_query(state.pool, request.state.principal, start=params.get("from"), end=params.get("to"),
                              group_by=group_by, tenant=tenant, top_tier=top_tier(state.catalog))
    if format not in ("json", "csv"):
        from tollway.errors import InvalidRequest

        raise InvalidRequest("'format' must be json or csv", param="format")
    report = await cost_report(state.pool, query)
    if format == "csv":
        name = f"tollway-costs-{query.group_by}-{query.start.date()}-{query.end.date()}.csv"
        return Response(to_csv(report), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}"'})
    return json_response(report)
