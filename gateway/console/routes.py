"""The console at ``/console``: server-rendered pages (Jinja2, inline SVG charts) for finance and operators.

Sign-in posts a Tollway key (field ``key``) to ``/console/login``; finance keys see their own tenant, admin
keys every tenant (as in the API), other keys are refused. A sign-in is a row in ``console_sessions``
(the cookie holds a random token, the table its hash): the cookie is HttpOnly, SameSite=Strict, scoped to
/console and ends after ``TOLLWAY_CONSOLE_SESSION_TTL_S``, at sign-out, or when the key is revoked. Forms
that change something also carry a token derived from the session (CSRF).

Pages read what the API reads (cost reports, budget use, the change channel), so their numbers are the
API's; the Costs page reads the daily rollup and downloads as CSV or JSON exactly the tables it shows.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from tollway.errors import AuthenticationFailed, InvalidRequest, PermissionDenied, TollwayError
from tollway.gateway.console import charts, queries
from tollway.gateway.console.views import COLUMNS, MONEY, costs_csv, costs_view
from tollway.gateway.http.deps import app_state
from tollway.gateway.metering.budget_alerts import budget_uses
from tollway.gateway.quality.sampling import list_rates
from tollway.gateway.tenancy.keys import Principal, list_keys, list_tenants, reachable_tenant, revoke_key
from tollway.gateway.tenancy.roles import Can, may
from tollway.infra.alerts import list_alerts
from tollway.infra.changes import history
from tollway.jsontypes import JSON
from tollway.prompts import list_prompt_rollouts
from tollway.routing import list_rollouts

router = APIRouter(include_in_schema=False)
COOKIE = "tollway_console"

_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(),
                   trim_blocks=True, lstrip_blocks=True)


def money(value: Any) -> str:
    """Dollars to the micro-dollar, grouped: what every page shows (CSV and JSON carry the exact value). A
    real cost below half a micro-dollar shows as such, never as $0."""
    amount = Decimal(value)
    if 0 < abs(amount) < Decimal("0.0000005"):
        return "<$0.000001" if amount > 0 else "-<$0.000001"
    return f"${amount:,.6f}"


def number(value: Any) -> str:
    return f"{int(value):,}"


def amount(value: Any, measure: str) -> str:
    """A budget amount: dollars as ``money``, tokens as a grouped count."""
    return money(value) if measure == "usd" else f"{int(value):,} tokens"


_env.filters["money"] = money
_env.filters["amount"] = amount
_env.filters["number"] = number


@dataclass(frozen=True)
class Session:
    principal: Principal
    token: str

    @property
    def csrf(self) -> str:
        return hmac.new(self.token.encode(), b"console-form", hashlib.sha256).hexdigest()

    @property
    def admin(self) -> bool:
        return may(self.principal.role, Can.ADMINISTER)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _session(request: Request) -> Session | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    async with app_state(request).pool.connection() as conn:
        row = await queries.session_key(conn, _digest(token))
    if row is None:
        return None
    return Session(Principal(key_id=row[0], tenant_id=row[1], tenant=row[2], role=row[3], allowed_models=None,
                             name=row[4]), token)


def _page(name: str, code: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(page=name, **context)
    return HTMLResponse(html, status_code=code, headers={
        "cache-control": "no-store", "x-frame-options": "DENY", "referrer-policy": "same-origin",
        "content-security-policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
                                   " form-action 'self'; frame-ancestors 'none'"})


def _to_login() -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


def _error(session: Session | None, exc: TollwayError) -> HTMLResponse:
    return _page("error.html", exc.status, session=session, message=exc.message, status=exc.status)


async def _serve(request: Request, render: Callable[[Session], Awaitable[Response]], *,
                 admin: bool = False) -> Response:
    """A page for a signed-in session (else to the sign-in form; ``admin``: admin keys only); a Tollway
    error becomes an error page with its status."""
    session = await _session(request)
    if session is None:
        return _to_login()
    try:
        if admin and not session.admin:
            raise PermissionDenied("This page is for platform operators (admin keys).")
        return await render(session)
    except TollwayError as exc:
        return _error(session, exc)


# -- sign-in -------------------------------------------------------------------------------------------


@router.get("/console")
async def home(request: Request) -> Response:
    return RedirectResponse("/console/costs" if await _session(request) else "/console/login", status_code=303)


@router.get("/console/login")
async def login_form(request: Request) -> Response:
    return _page("login.html", session=None, error=None)


def same_origin(request: Request) -> bool:
    """A browser's POST from this console, not from another site: its Origin (or, where a browser sends
    none, Sec-Fetch-Site) names this host. Clients that send neither (curl, scripts) are not browsers."""
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return hmac.compare_digest(origin.lower().rstrip("/"), own.lower())
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def _cross_site() -> HTMLResponse:
    return _page("error.html", 403, session=None, status=403,
                 message="This form was sent from another site; sign in from the console itself.")


@router.post("/console/login")
async def login(request: Request) -> Response:
    state = app_state(request)
    if not same_origin(request):
        return _cross_site()
    form = await request.form()
    secret = str(form.get("key") or "").strip()
    try:
        if not secret:
            raise AuthenticationFailed("Paste a Tollway key to sign in.")
        principal = await state.keys.authenticate(secret)
        if not may(principal.role, Can.READ_COSTS):
            raise PermissionDenied("The console is for finance and admin keys; this key is an "
                                   f"{principal.role} key.", code="role_not_allowed")
    except TollwayError as exc:
        return _page("login.html", exc.status, session=None, error=exc.message)
    token = secrets.token_urlsafe(32)
    ttl = state.settings.console_session_ttl_s
    async with state.pool.connection() as conn:
        await queries.open_session(conn, _digest(token), principal.key_id, ttl)
    response = RedirectResponse("/console/costs", status_code=303)
    response.set_cookie(COOKIE, token, max_age=ttl, path="/console", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    if not same_origin(request):
        return _cross_site()
    token = request.cookies.get(COOKIE)
    if token:
        async with app_state(request).pool.connection() as conn:
            await queries.close_session(conn, _digest(token))
    return _to_login()


async def _form_checked(request: Request, session: Session) -> dict[str, Any]:
    if not same_origin(request):
        raise PermissionDenied("This form was sent from another site.", code="cross_site")
    form = dict(await request.form())
    if not hmac.compare_digest(str(form.get("csrf", "")), session.csrf):
        raise PermissionDenied("This form has expired; reload the page and try again.", code="csrf_failed")
    return form


# -- costs ---------------------------------------------------------------------------------------------


async def _tenant_names(state: Any) -> list[str]:
    async with state.pool.connection() as conn:
        return [t["name"] for t in await list_tenants(conn)]


@router.get("/console/costs")
async def costs(request: Request) -> Response:
    return await _serve(request, lambda session: _costs_page(request, session))


async def _costs_page(request: Request, session: Session) -> Response:
    state = app_state(request)
    view = await costs_view(state, session.principal, request.query_params)
    daily = view["daily"]
    values = {tuple(k.split("|", 1)): Decimal(v) for k, v in daily["spend_usd"].items()}
    chart = charts.stacked_bars(f"Spend per day by {view['stack']}", daily["days"], daily["series"], values)
    query = request.url.query
    return _page("costs.html", session=session, view=view, chart=chart, columns=COLUMNS, money_columns=MONEY,
                 tenants=await _tenant_names(state) if session.admin else [], query=query,
                 day_rows=[(d, [values.get((d, s)) for s in daily["series"]]) for d in daily["days"]])


@router.get("/console/costs.csv")
async def costs_download_csv(request: Request) -> Response:
    return await _serve(request, lambda session: _download(request, session, "csv"))


@router.get("/console/costs.json")
async def costs_download_json(request: Request) -> Response:
    return await _serve(request, lambda session: _download(request, session, "json"))


async def _download(request: Request, session: Session, kind: str) -> Response:
    view = await costs_view(app_state(request), session.principal, request.query_params)
    name = f"tollway-costs-{view['tenant'] or 'all'}-{view['from']}-{view['to']}.{kind}"
    headers = {"content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store"}
    if kind == "csv":
        return Response(costs_csv(view), media_type="text/csv; charset=utf-8", headers=headers)
    return Response(orjson.dumps(view), media_type="application/json", headers=headers)


# -- budgets -------------------------------------------------------------------------------------------


async def _tenant_scope(state: Any, session: Session, tenant: str | None) -> list[int] | None:
    """The tenants a page shows: an admin's choice (None: all), a finance key's own (403 for another)."""
    if session.admin and not tenant:
        return None
    return [await reachable_tenant(state.pool, session.principal, tenant, "see its own tenant")]


@router.get("/console/budgets")
async def budgets(request: Request) -> Response:
    return await _serve(request, lambda session: _budgets_page(request, session))


async def _budgets_page(request: Request, session: Session) -> Response:
    state = app_state(request)
    now = datetime.now(UTC)
    tenant = request.query_params.get("tenant") or None
    ids = await _tenant_scope(state, session, tenant)
    defaults = (state.settings.budget_alert_thresholds, "forecast" in state.settings.budget_alerts)
    rows: list[dict[str, Any]] = []
    cards: list[dict[str, Any]] = []
    async with state.pool.connection() as conn:
        async for use in budget_uses(conn, now, ids):
            forecast_share = use.forecast(now)
            thresholds, forecast_alert = use.budget.alerts(defaults)
            row = {"tenant": use.tenant, "budget": use.budget, "who": use.who, "subject": use.subject,
                   "window": use.window_text, "used": use.used, "limit": use.limit, "share": use.share,
                   "forecast": forecast_share, "alerts": [f"{t:.0%}" for t in thresholds]
                   + (["forecast"] if forecast_alert else []), "ends": use.end if use.window.start else None}
            rows.append(row)
            if use.budget.subject == "*" and len(cards) >= 12:
                continue
            # a chart per limit the budget has: dollars, tokens, or both
            limits = [("usd", use.budget.limit_usd),
                      ("tokens", None if use.budget.limit_tokens is None else Decimal(use.budget.limit_tokens))]
            for measure, limit in limits:
                if limit is None:
                    continue
                points = await queries.burn(conn, use, now, measure)
                if not points:
                    continue
                used = points[-1][1]
                share = None if forecast_share is None or not use.share else forecast_share * float(
                    used / limit if limit else 0) / use.share  # this limit's own forecast share
                projected = None if share is None else limit * Decimal(str(share))
                cards.append({**row, "points": points, "measure": measure, "limit_amount": limit,
                              "projected": projected, "chart": charts.burn_down(
                                  f"{use.who}: {use.window_text}", points, limit, projected,
                                  (use.start.strftime("%Y-%m-%d %H:%M"), use.end.strftime("%Y-%m-%d %H:%M")),
                                  measure)})
        events = await queries.breaker_events(conn, ids)
        alerts = []
        for tid in ids or (None,):
            alerts += [a for a in await list_alerts(conn, tid, 50) if a["kind"].startswith("budget")]
    # a USD limit counts answers at their price, and a model nobody priced costs $0: say which ones
    unpriced = state.catalog.unpriced() if any(r["budget"].limit_usd is not None for r in rows) else []
    return _page("budgets.html", session=session, rows=rows, cards=cards, events=events, alerts=alerts,
                 unpriced=unpriced, tenant=tenant if session.admin else session.principal.tenant, now=now,
                 tenants=await _tenant_names(state) if session.admin else [])


# -- operations, audit, keys (admin) -------------------------------------------------------------------


@router.get("/console/operations")
async def operations(request: Request) -> Response:
    return await _serve(request, lambda session: _operations_page(request, session), admin=True)


async def _operations_page(request: Request, session: Session) -> Response:
    state = app_state(request)
    replicas = [{**r.describe(), "name": name, "error_rate": (r.failures / r.calls) if r.calls else None}
                for name, r in sorted(state.routing.health.replicas.items())]
    async with state.pool.connection() as conn:
        attempts = await queries.failed_attempts(conn)
    ledger = state.ledger
    return _page("operations.html", session=session, replicas=replicas, attempts=attempts,
                 ledger={"queued": ledger.in_hand, "spill_files": len(ledger.pending_spill_files()),
                         "rejected_files": len(ledger.rejected_files())},
                 retry_budget=round(state.routing.caller.retry_budget.tokens, 2),
                 workers=state.settings.workers)


@router.get("/console/quality")
async def quality(request: Request) -> Response:
    return await _serve(request, lambda session: _quality_page(request, session), admin=True)


def _findings(evidence: Any) -> list[JSON]:
    findings = evidence.get("findings") if isinstance(evidence, dict) else None
    return [f for f in findings or [] if isinstance(f, dict)]


async def _quality_page(request: Request, session: Session) -> Response:
    """The live quality loop: rollouts in flight, drift alerts with their evidence, the sampling rates the
    monitor asks for, and (on the replica that leads the monitor) its watches."""
    state = app_state(request)
    async with state.pool.connection() as conn:
        rollouts = [r.as_json() for r in await list_rollouts(conn)]
        prompt_rollouts = await list_prompt_rollouts(conn)
        rates = await list_rates(conn)
        alerts = await list_alerts(conn, None, 50, kind="drift")
        names = await queries.tenant_names(conn)
    for alert in alerts:
        alert["tenant"] = names.get(alert["tenant_id"])
        alert["findings"] = _findings(alert["evidence"])
        alert["action"] = (alert["evidence"] or {}).get("action")
    live = state.quality
    return _page("quality.html", session=session, rollouts=rollouts, prompt_rollouts=prompt_rollouts, rates=rates,
                 alerts=alerts, enabled=live.settings.enabled, leader=state.monitor.leading,
                 watches=state.monitor.describe(), incidents=state.monitor.incidents(),
                 base_rate=live.settings.policy.base, queue=live.queue_state())


@router.get("/console/audit")
async def audit(request: Request) -> Response:
    return await _serve(request, lambda session: _audit_page(request, session), admin=True)


def _pretty(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


async def _audit_page(request: Request, session: Session) -> Response:
    state = app_state(request)
    tenant = request.query_params.get("tenant") or None
    kind = request.query_params.get("kind") or None
    ids = await _tenant_scope(state, session, tenant)
    async with state.pool.connection() as conn:
        rows = await history(conn, tenant_id=None if ids is None else ids[0], limit=500)
        names = await queries.tenant_names(conn)
    rows = [{**r, "tenant": names.get(r["tenant_id"]), "before_json": _pretty(r["before"]),
             "after_json": _pretty(r["after"])} for r in rows if kind is None or r["kind"] == kind][:200]
    return _page("audit.html", session=session, rows=rows, tenant=tenant, kind=kind,
                 tenants=await _tenant_names(state))


@router.get("/console/keys")
async def keys(request: Request) -> Response:
    return await _serve(request, lambda session: _keys_page(request, session), admin=True)


async def _keys_page(request: Request, session: Session) -> Response:
    state = app_state(request)
    tenant = request.query_params.get("tenant") or None
    async with state.pool.connection() as conn:
        rows = await list_keys(conn, tenant)
        tenants = await list_tenants(conn)
    return _page("keys.html", session=session, rows=rows, tenants=tenants, tenant=tenant,
                 notice=request.query_params.get("revoked"))


@router.post("/console/keys/{key_id}/revoke")
async def revoke(request: Request, key_id: int) -> Response:
    return await _serve(request, lambda session: _revoke(request, session, key_id), admin=True)


async def _revoke(request: Request, session: Session, key_id: int) -> Response:
    state = app_state(request)
    form = await _form_checked(request, session)
    if key_id == session.principal.key_id:
        raise InvalidRequest("This is the key you signed in with; sign in with another admin key to revoke it.")
    async with state.pool.connection() as conn:
        done = await revoke_key(conn, key_id, author=session.principal.author,
                                reason=str(form.get("reason") or "") or "revoked in the console")
    state.keys.forget(key_id)
    return RedirectResponse(f"/console/keys?revoked={key_id if done else ''}", status_code=303)
