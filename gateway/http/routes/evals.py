"""Eval runs, comparisons and feedback over HTTP.

Keys that may call models (app, admin, prompt engineer) run evals for their own tenant (admins for any,
naming it); a run's requests are that tenant's, under its budgets. Feedback comes from products with the
request id of an answer they got; it is accepted only for the caller's own tenant's requests.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tollway.errors import InvalidRequest, NotFound
from tollway.evals import GoldenSetError, Target, parse_prompt_ref, set_from_items
from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import app_state
from tollway.gateway.metering.reports import build_query
from tollway.gateway.parts import feedback
from tollway.gateway.tenancy.keys import Principal, reachable_tenant
from tollway.gateway.tenancy.roles import Can, require

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GoldenRef(_Body):
    prompt: str  # NAME or NAME@VERSION|LABEL: the golden set that version names


class InlineSet(_Body):
    name: str = Field(default="inline", min_length=1, max_length=200)
    items: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class RunBody(_Body):
    set: InlineSet | GoldenRef
    prompt: str | None = None  # NAME, NAME@VERSION or NAME@LABEL
    model: str | None = None
    concurrency: int | None = Field(default=None, ge=1, le=256)
    wait: bool = False  # answer when the run is finished (otherwise 202 at once; poll GET /v1/evals/runs/{id})
    tenant: str | None = None


class FeedbackBody(_Body):
    request_id: str = Field(min_length=1, max_length=100)
    score: float | None = Field(default=None, ge=0, le=1)
    label: str | None = Field(default=None, min_length=1, max_length=100)
    comment: str | None = Field(default=None, max_length=4000)


async def _runner(request: Request, named: str | None) -> tuple[Principal, int]:
    principal: Principal = request.state.principal
    require(principal.role, Can.RUN_EVALS, "This key may not run evals (they call models).")
    tid = await reachable_tenant(app_state(request).pool, principal, named, "run evals for its own tenant")
    return principal, tid


@router.post("/v1/evals/runs", status_code=202, summary="Run a golden set through the chat path")
async def post_run(request: Request, body: RunBody) -> Response:
    principal, tid = await _runner(request, body.tenant)
    evals = app_state(request).evals
    if isinstance(body.set, GoldenRef):
        name, ref = parse_prompt_ref(body.set.prompt)
        version = ref if ref is not None and ref not in evals.prompts.label_names(tid, name) else \
            evals.prompts.label_version(tid, name, ref or "production")
        if version is None:
            raise NotFound(f"Prompt '{name}' has no label '{ref or 'production'}'.", param="set.prompt",
                           code="prompt_not_found")
        golden = await evals.golden_set(tid, name, version)
        if golden is None:
            raise InvalidRequest(f"Prompt '{name}' names no golden set.", param="set.prompt", code="no_golden_set")
    else:
        try:
            golden = set_from_items(body.set.items, body.set.name)
        except GoldenSetError as exc:
            raise InvalidRequest(str(exc), param="set.items", code="invalid_golden_set") from exc
    target = Target(body.prompt, body.model)
    if body.wait:
        run = await evals.run(principal, tid, golden, target, concurrency=body.concurrency)
        return json_response(run, status=200)
    return json_response(await evals.start(principal, tid, golden, target, concurrency=body.concurrency), status=202)


@router.get("/v1/evals/runs", summary="Eval runs, newest first")
async def get_runs(request: Request, tenant: str | None = None, limit: int = 50) -> Response:
    _, tid = await _runner(request, tenant)
    return json_response({"object": "list", "data": await app_state(request).evals.recent(tid, limit)})


@router.get("/v1/evals/runs/{run_id}", summary="One eval run: progress, summary, and its items' results")
async def get_run(request: Request, run_id: str, tenant: str | None = None, results: bool = True) -> Response:
    _, tid = await _runner(request, tenant)
    return json_response(await app_state(request).evals.get(tid, run_id, results=results))


@router.get("/v1/evals/compare", summary="Two runs paired item by item: regressions, improvements, significance")
async def get_compare(request: Request, a: str, b: str, alpha: float | None = None,
                      tenant: str | None = None) -> Response:
    _, tid = await _runner(request, tenant)
    if alpha is not None and not 0 < alpha < 1:
        raise InvalidRequest("alpha is between 0 and 1", param="alpha")
    return json_response(await app_state(request).evals.compare(tid, a, b, alpha))


# -- feedback ----------------------------------------------------------------------------------------
@router.post("/v1/feedback", status_code=201, summary="Feedback on an answer, by its request id")
async def post_feedback(request: Request, body: FeedbackBody) -> Response:
    principal: Principal = request.state.principal
    require(principal.role, Can.RUN_EVALS, "This key may not give feedback.")
    if body.score is None and body.label is None:
        raise InvalidRequest("Give a score (0 to 1), a label, or both.", param="score")
    state = app_state(request)
    answer = await feedback.answered_by(state.pool, state.ledger, principal.tenant_id, body.request_id)
    fid, created = await feedback.record(state.pool, principal, body.request_id, body.score, body.label,
                                         body.comment, answer)
    return json_response({"object": "feedback", "id": state.evals.ids.encode("fb", fid),
                          "request_id": body.request_id, "score": body.score, "label": body.label,
                          "prompt_name": answer[0], "prompt_version": answer[1], "model": answer[2],
                          "created_at": created.isoformat()}, status=201)


@router.get("/v1/reports/feedback", summary="Feedback per prompt version or model: count, mean score, labels")
async def get_feedback_report(request: Request, group_by: Literal["prompt_version", "model"] = "prompt_version",
                              tenant: str | None = None) -> Response:
    principal: Principal = request.state.principal
    state = app_state(request)
    params = request.query_params
    query = await build_query(state.pool, principal, tenant=tenant, start=params.get("from"), end=params.get("to"),
                              group_by="day", can=Can.READ_FEEDBACK)
    groups = await feedback.report(state.pool, query, group_by)
    return json_response({"object": "report.feedback", "group_by": group_by, "from": _iso(query.start),
                          "to": _iso(query.end),
                          "groups": groups})


def _iso(value: datetime) -> str:
    return value.isoformat()
