"""Tenants and keys over HTTP: list tenants and keys (never a key's secret), create a key (its secret in
that answer only), set a key's rate limits. Admin keys."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import Body, admin, app_state
from tollway.gateway.tenancy.keys import create_key, list_keys, list_tenants
from tollway.gateway.tenancy.policy import (
    set_key_limits,
)

router = APIRouter()


class KeyBody(Body):
    tenant: str
    role: str = "app"  # one of keys.ROLES (create_key says so otherwise)
    models: list[str] | None = None
    name: str | None = Field(default=None, max_length=200)
    ingest: bool = False


class KeyLimitsBody(Body):
    reason: str | None = None
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_parallel_requests: int | None = Field(default=None, gt=0, le=1_000_000)


@router.get("/v1/admin/tenants", summary="Tenants, with their active keys")
async def get_tenants(request: Request) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        return json_response({"object": "list", "data": await list_tenants(conn)})


@router.get("/v1/admin/keys", summary="Keys (never their secrets): role, models, created, last used, revoked")
async def get_keys(request: Request, tenant: str | None = None) -> Response:
    admin(request)
    async with app_state(request).pool.connection() as conn:
        return json_response({"object": "list", "data": await list_keys(conn, tenant)})


@router.post("/v1/admin/keys", status_code=201, summary="Create a key (its secret is in this answer only)")
async def post_key(request: Request, body: KeyBody) -> Response:
    principal = admin(request)
    async with app_state(request).pool.connection() as conn:
        key = await create_key(conn, body.tenant, hasher=app_state(request).keys.hasher, role=body.role,
                               allowed_models=body.models, name=body.name, author=principal.author,
                               ingest=body.ingest)
    return json_response({"object": "key", "id": key.id, "tenant": key.tenant, "role": key.role,
                          "ingest": key.ingest, "key": key.secret}, status=201)


@router.put("/v1/admin/keys/{key_id}/limits",
            summary="Set a key's requests and tokens per minute and its requests in flight at once")
async def put_key_limits(request: Request, key_id: int, body: KeyLimitsBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        limits = await set_key_limits(conn, key_id, rpm=body.rpm, tpm=body.tpm,
                                      max_parallel_requests=body.max_parallel_requests, author=principal.author,
                                      reason=body.reason)
    state.keys.forget(key_id)
    return json_response(limits)
