"""The Responses API's stored responses: ``GET`` and ``DELETE /v1/responses/{id}`` for the keys that may call
models, within their own tenant (another tenant's id is a 404). Creating one is a hot endpoint
(``tollway.gateway.http.endpoints``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.errors import NotFound
from tollway.gateway.apis.stored import ResponseStore
from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import app_state, caller
from tollway.gateway.tenancy.roles import Can, require

router = APIRouter()


def _store(request: Request) -> tuple[int, ResponseStore]:
    principal = caller(request)
    require(principal.role, Can.CALL_MODELS, "Reading stored responses needs a key that may call models.")
    store = app_state(request).service.stored
    if store is None:
        raise NotFound("This gateway stores no responses.", code="response_not_found")
    return principal.tenant_id, store


@router.get("/v1/responses/{response_id}", summary="A stored response (Responses API)")
async def get_response(request: Request, response_id: str) -> Response:
    tenant_id, store = _store(request)
    return json_response(await store.get(tenant_id, response_id))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response (Responses API)")
async def delete_response(request: Request, response_id: str) -> Response:
    tenant_id, store = _store(request)
    await store.delete(tenant_id, response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
