"""Model prices over HTTP: every model with its price and where the price comes from (the config, a
default, one set here, or none: ``unpriced``), and setting or removing a price without a config file.
Admin keys. A change reaches every replica before its next request (the change channel)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import Body, admin, app_state
from tollway.routing import delete_price, model_prices, parse_price, set_price

router = APIRouter()


class PriceBody(Body):
    price: dict[str, Any]  # as the config file's `price:`: input_per_mtok/output_per_mtok, cpu_hour_usd, ...
    reason: str | None = None


@router.get("/v1/admin/models", summary="Every model with its price and the price's source")
async def get_models(request: Request) -> Response:
    admin(request)
    return json_response({"object": "list", "data": model_prices(app_state(request).catalog)})


@router.put("/v1/admin/models/{model:path}/price", summary="Set a model's price (every replica, no restart)")
async def put_price(request: Request, model: str, body: PriceBody) -> Response:
    principal = admin(request)
    state = app_state(request)
    raw = parse_price(body.price)
    async with state.pool.connection() as conn:
        out = await set_price(conn, state.catalog, model, raw, author=principal.author, reason=body.reason)
    return json_response(out)


@router.delete("/v1/admin/models/{model:path}/price", summary="Remove a price set here (the config's applies)")
async def remove_price(request: Request, model: str, reason: str | None = None) -> Response:
    principal = admin(request)
    state = app_state(request)
    async with state.pool.connection() as conn:
        removed = await delete_price(conn, state.catalog, model, author=principal.author, reason=reason)
    return json_response({"object": "model.price", "model": model, "deleted": removed})
