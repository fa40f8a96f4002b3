"""What operators look at: alerts (budget thresholds, drift) with their evidence, the change channel (the
audit log), and the upstream replicas' breaker state, in-flight calls, latency and saturation. Admin keys."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import admin, app_state
from tollway.gateway.tenancy.keys import tenant_id
from tollway.infra.alerts import list_alerts
from tollway.infra.changes import history

router = APIRouter()


@router.get("/v1/admin/alerts", summary="Alerts (budget thresholds, drift), newest first, with their evidence")
async def get_alerts(request: Request, tenant: str | None = None, limit: int = 100) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        tid = None if tenant is None else await tenant_id(conn, tenant)
        return json_response({"object": "list", "data": await list_alerts(conn, tid, limit)})


@router.get("/v1/admin/changes", summary="The change channel (audit log): who changed what, before and after")
async def get_changes(request: Request, tenant: str | None = None, limit: int = 100) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        tid = None if tenant is None else await tenant_id(conn, tenant)
        rows = await history(conn, tenant_id=tid, limit=max(1, min(limit, 1000)))
    return json_response({"object": "list", "data": rows})


@router.get("/v1/admin/routing", summary="Upstream replicas: breaker state, in-flight calls, latency, saturation")
async def get_routing(request: Request) -> Response:
    admin(request)
    state = app_state(request)
    routing, shadows = state.routing, state.shadows
    return json_response({
        "replicas": {name: replica.describe() for name, replica in routing.health.replicas.items()},
        "retry_budget": {"tokens": round(routing.caller.retry_budget.tokens, 2),
                         "refused": routing.caller.retry_budget.refused},
        "shadows_skipped": shadows.skipped if shadows is not None else 0})
