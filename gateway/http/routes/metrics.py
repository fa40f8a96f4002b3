"""``GET /metrics``: Prometheus text format. It shows every tenant's spend, so on the main port it needs an
admin key (``Authorization: Bearer``); ``TOLLWAY_METRICS_PORT`` serves the same without auth on a port
of its own, for a scraper inside the cluster."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.errors import AuthenticationFailed
from tollway.gateway.http.deps import app_state
from tollway.gateway.http.middleware import credential
from tollway.gateway.observability.prometheus import CONTENT_TYPE
from tollway.gateway.tenancy.roles import Can, require

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics (admin key; or TOLLWAY_METRICS_PORT without auth)")
async def metrics(request: Request) -> Response:
    state = app_state(request)
    secret = credential(request.scope["headers"])
    if secret is None:
        raise AuthenticationFailed("/metrics needs an admin key: send 'Authorization: Bearer <key>' "
                                   "(or scrape TOLLWAY_METRICS_PORT inside the cluster).")
    principal = await state.keys.authenticate(secret)
    require(principal.role, Can.ADMINISTER, "/metrics shows every tenant's spend: it needs an admin key.")
    prom = state.telemetry.prometheus
    prom.observe(state.routing.health.replicas, state.ledger)
    return Response(prom.exposition(), media_type=CONTENT_TYPE)
