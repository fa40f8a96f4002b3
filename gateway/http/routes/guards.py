"""Guard policies over HTTP: a tenant's own policy and the policy its requests run under (config
defaults, tenant, prompt). Admin keys. A change applies to the tenant's next request on every replica.
The guards themselves run in the chat path (``tollway.gateway.parts.guarding``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import Body, admin, app_state
from tollway.gateway.tenancy.keys import tenant_id
from tollway.gateway.tenancy.policy import get_guards as get_tenant_guards
from tollway.gateway.tenancy.policy import (
    set_guards,
)
from tollway.guardrails import BUILTIN, GuardPolicy, resolve

router = APIRouter()


class GuardsBody(Body):
    tenant: str
    reason: str | None = None
    policy: dict[str, Any]  # tollway.guardrails.policy.GuardPolicy: input, output, terms, topics, limits


@router.get("/v1/admin/guards", summary="A tenant's guard policy, and the policy its requests run under")
async def get_guards(request: Request, tenant: str) -> Response:
    admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        policy = await get_tenant_guards(conn, tenant)
    return json_response(_guards_view(state, tenant, policy))


@router.put("/v1/admin/guards", summary="Replace a tenant's guard policy (applies to the next request)")
async def put_guards(request: Request, body: GuardsBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        policy = await set_guards(conn, body.tenant, body.policy, extra=state.guarding.names,
                                  author=principal.author, reason=body.reason)
        tid = await tenant_id(conn, body.tenant)
    state.policies.forget(tid)
    return json_response(_guards_view(state, body.tenant, policy))


@router.delete("/v1/admin/guards", summary="Remove a tenant's guard policy (the config's defaults apply)")
async def delete_guards(request: Request, tenant: str, reason: str | None = None) -> Response:
    principal = admin(request)
    state = app_state(request)
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
