"""Prompt routes: submit a version, list, show, diff, render with cost (a dry run), move a label, roll back.

Who may: ``prompt_engineer`` keys manage their own tenant's prompts and labels (``production`` only
through the gate); ``admin`` keys act on any tenant by naming it (``tenant``) and may override a failed
gate, recorded; no other key reads, renders or writes prompts, and no key ever reaches another tenant's.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tollway.errors import PayloadTooLarge
from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import app_state
from tollway.gateway.parts.prompting import dry_run, requests_per_day
from tollway.gateway.tenancy.keys import Principal, reachable_tenant
from tollway.gateway.tenancy.roles import Can, may, require
from tollway.jsontypes import JSON
from tollway.prompts import (
    PRODUCTION,
    Registry,
    gate_move,
    labels_of,
    may_override,
    move_label,
    repair,
    rollback,
    submit,
    version,
    versions_of,
)

router = APIRouter()
MAX_DIFF_LINES = 10_000 * 10_000  # line pairs a diff may compare (about 0.2 s of CPU)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None  # admin keys name the tenant


class VersionBody(_Body):
    content: str = Field(min_length=1, max_length=256 * 1024)
    message: str = Field(min_length=1, max_length=4096)
    parent: str | None = None
    files: dict[str, str] | None = None  # other files of the commit (a golden set)


class LabelBody(_Body):
    version: str
    split_version: str | None = None
    split_percent: float = Field(default=0, ge=0, le=100)
    reason: str | None = None
    override: bool = False


class RollbackBody(_Body):
    reason: str | None = None


class RenderBody(_Body):
    ref: str | None = None  # a version or a label (default: production)
    variables: JSON | None = None


async def _tenant(request: Request, named: str | None) -> tuple[Principal, int, str]:
    principal: Principal = request.state.principal
    require(principal.role, Can.MANAGE_PROMPTS, f"A {principal.role} key may not manage prompts.")
    tid = await reachable_tenant(app_state(request).pool, principal, named,
                                 "manage its own tenant's prompts")
    return principal, tid, named or principal.tenant


async def _reload(request: Request, tid: int) -> None:
    """This process serves the change at once; other replicas follow the change channel."""
    registry: Registry = app_state(request).prompts
    await registry.load(tid)


@router.post("/v1/prompts/{name}/versions", status_code=201, summary="Submit a new version of a prompt (a commit)")
async def post_version(request: Request, name: str, body: VersionBody) -> Response:
    principal, tid, _ = await _tenant(request, body.tenant)
    async with app_state(request).pool.connection() as conn:
        made = await submit(conn, tid, name, body.content, message=body.message, author=principal.author,
                            parent=body.parent, extra_files=body.files)
    await _reload(request, tid)
    return json_response(made.as_json(), status=201)


@router.post("/v1/prompts/repair", summary="Admin: drop entries a prompt repository may not hold (a commit on main)")
async def post_repair(request: Request, body: _Body) -> Response:
    principal, tid, _ = await _tenant(request, body.tenant)
    require(principal.role, Can.ADMINISTER, "Only an admin key may repair a prompt repository.")
    async with app_state(request).pool.connection() as conn:
        dropped = await repair(conn, tid, principal.author)
    await _reload(request, tid)
    return json_response({"dropped": dropped})


@router.get("/v1/prompts", summary="Prompts with their latest version and labels")
async def list_prompts(request: Request, tenant: str | None = None) -> Response:
    _, tid, _ = await _tenant(request, tenant)
    async with app_state(request).pool.connection() as conn:
        versions = await versions_of(conn, tid)
        labels = await labels_of(conn, tid)
    out: dict[str, JSON] = {}
    for v in versions:  # newest first per name
        entry = out.setdefault(v.name, {"name": v.name, "latest": v.version, "versions": 0, "labels": {}})
        entry["versions"] += 1
    for label in labels:
        if label.name in out:
            out[label.name]["labels"][label.label] = label.as_json()
    return json_response({"object": "list", "data": list(out.values())})


@router.get("/v1/prompts/{name}/versions", summary="A prompt's versions, newest first")
async def list_versions(request: Request, name: str, tenant: str | None = None) -> Response:
    _, tid, _ = await _tenant(request, tenant)
    async with app_state(request).pool.connection() as conn:
        versions = await versions_of(conn, tid, name)
    return json_response({"object": "list", "data": [v.as_json() for v in versions]})


@router.get("/v1/prompts/{name}/diff", summary="Unified diff of two versions (or labels) of a prompt")
async def diff(request: Request, name: str, tenant: str | None = None) -> Response:
    _, tid, _ = await _tenant(request, tenant)
    params = request.query_params
    async with app_state(request).pool.connection() as conn:
        a = await version(conn, tid, name, params.get("from", ""))
        b = await version(conn, tid, name, params.get("to", PRODUCTION))
    # a line diff's work grows with the product of the two versions' lines (two 60,000-line files: seconds of
    # CPU): past a bound it is git's to do, and below it runs off the event loop
    lines = (a.content.count("\n") + 1) * (b.content.count("\n") + 1)
    if lines > MAX_DIFF_LINES:
        raise PayloadTooLarge(f"These versions are too large to diff here ({lines:,} line pairs, at most "
                              f"{MAX_DIFF_LINES:,}); fetch them with git and diff them there.", param="to")
    return json_response({"from": a.version, "to": b.version, "diff": await asyncio.to_thread(a.diff, b)})


@router.get("/v1/prompts/{name}", summary="One version of a prompt (by version or label; default production)")
async def show(request: Request, name: str, ref: str = PRODUCTION, tenant: str | None = None) -> Response:
    _, tid, _ = await _tenant(request, tenant)
    async with app_state(request).pool.connection() as conn:
        found = await version(conn, tid, name, ref)
    return json_response(found.as_json(content=True))


@router.put("/v1/prompts/{name}/labels/{label}", summary="Point a label at a version (production: through the gate)")
async def put_label(request: Request, name: str, label: str, body: LabelBody) -> Response:
    principal, tid, tenant = await _tenant(request, body.tenant)
    state = app_state(request)
    admin = may(principal.role, Can.ADMINISTER)
    may_override(label, body.override, admin)  # before the gate runs
    # production's gate runs first, holding no connection of the pool (nor the label's row): it may take minutes
    gated = await gate_move(state.pool, tid, tenant, name, label, body.version, state.prompt_gate, principal)
    async with state.pool.connection() as conn:
        moved, gate = await move_label(conn, tid, tenant, name, label, body.version, author=principal.author,
                                       reason=body.reason, split_version=body.split_version,
                                       split_percent=body.split_percent, gate=state.prompt_gate,
                                       admin=admin, override=body.override, actor=principal, gated=gated)
    await _reload(request, tid)
    out = moved.as_json()
    out["gate"] = None if gate is None else {"passed": gate.passed, "summary": gate.summary, "report": gate.report}
    return json_response(out)


@router.post("/v1/prompts/{name}/labels/{label}/rollback", summary="Move a label back to its previous version")
async def post_rollback(request: Request, name: str, label: str, body: RollbackBody) -> Response:
    principal, tid, tenant = await _tenant(request, body.tenant)
    async with app_state(request).pool.connection() as conn:
        moved = await rollback(conn, tid, tenant, name, label, author=principal.author, reason=body.reason)
    await _reload(request, tid)
    return json_response(moved.as_json())


@router.post("/v1/prompts/{name}/render", summary="Dry run: the rendered messages, their tokens and cost per model")
async def render(request: Request, name: str, body: RenderBody) -> Response:
    principal, tid, _ = await _tenant(request, body.tenant)
    state = app_state(request)
    rendered = await state.prompts.render_ref(tid, f"key:{principal.key_id}", name, body.ref or PRODUCTION,
                                        body.variables)
    async with state.pool.connection() as conn:
        per_day = await requests_per_day(conn, tid, name)
    return json_response(dry_run(state.catalog, rendered.name, rendered.version, list(rendered.messages),
                                 rendered.params, per_day))


