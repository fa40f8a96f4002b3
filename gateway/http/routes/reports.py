"""Cost reports for finance (``GET /v1/reports/costs``): spend, tokens and requests per group, JSON or CSV,
straight from the ledger. Finance keys read their own tenant, admin keys any."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import app_state
from tollway.gateway.metering.reports import build_query, cost_report, to_csv, top_tier

router = APIRouter()


@router.get("/v1/reports/costs", summary="Cost report: spend, tokens, requests and budget use per group")
async def get_cost_report(request: Request, group_by: str = "day", format: str = "json",
                          tenant: str | None = None) -> Response:
    params = request.query_params
    state = app_state(request)
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
