"""FastAPI routes (everything but the two hot endpoints in ``endpoints``): parse, call one service,
shape the answer. Also the error handlers and the OpenAPI document for the whole gateway."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import psycopg
import psycopg_pool
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response

from tollway.errors import InvalidRequest, NotFound, ServiceUnavailable, TollwayError, model_not_found
from tollway.gateway.apis.messages import input_tokens
from tollway.gateway.chat.service import CompletionService
from tollway.gateway.http.deps import app_state
from tollway.gateway.http.endpoints import openapi_paths
from tollway.gateway.http.protocol import parse_json_object
from tollway.gateway.tenancy.roles import Can, require
from tollway.routing import off_loop_if_long

router = APIRouter()


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def _service(request: Request) -> CompletionService:
    service: CompletionService = app_state(request).service
    return service


def _models(request: Request) -> list[dict[str, Any]]:
    """The models the key may use; a key that may not call models (finance) sees none: a 403."""
    principal = request.state.principal
    require(principal.role, Can.CALL_MODELS, f"A {principal.role} key may not call models.")
    data: list[dict[str, Any]] = _service(request).models(principal)["data"]
    return data


@router.get("/v1/models", summary="List the models this key may use")
async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": _models(request)})


@router.get("/v1/models/{model:path}", summary="One model this key may use")
async def model(request: Request, model: str) -> Response:
    """``client.models.retrieve(id)``. An id may hold slashes (``meta-llama/Llama-3.1-8B-Instruct``): the SDK
    sends it as it is."""
    for entry in _models(request):
        if entry["id"] == model:
            return json_response(entry)
    raise model_not_found(model)


@router.post("/v1/messages/count_tokens", summary="A Messages request's input tokens (Anthropic's count_tokens), at $0")
async def count_tokens(request: Request) -> Response:
    """``client.messages.count_tokens(...)``: counted with tiktoken (``input_tokens``), without calling a model;
    the model must be one the key may use."""
    allowed = {entry["id"] for entry in _models(request)}  # a key that may not call models: a 403 first
    raw = await request.body()
    model_name, tokens = await off_loop_if_long(len(raw), input_tokens, parse_json_object(raw),
                                                request.state.principal.tenant_id)
    if model_name not in allowed:
        raise model_not_found(model_name)
    return json_response({"input_tokens": tokens})


@router.get("/", summary="Where things are: a browser goes to the console", include_in_schema=False)
async def root(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/console", status_code=307)
    return json_response({"object": "tollway", "api": "/v1", "console": "/console", "docs": "/docs",
                          "health": "/healthz", "ready": "/readyz"})


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness: this replica can serve; its database, Redis and upstreams reported")
async def readyz(request: Request, require: str | None = None) -> Response:
    """200 once the replica has started: it serves through an outage of what it shares with the others
    (known keys keep working without the database, fail-open tenants without Redis, degraded answers
    without an upstream), and taking every replica out of a load balancer at once would turn those
    answers into connection errors. ``checks`` says what is reachable (``status: degraded`` when something
    is not); ``?require=database,redis,upstream`` makes those conditions (503 when one fails). 503
    ``draining`` from a SIGTERM until the server stops accepting (``TOLLWAY_DRAIN_PAUSE_S``)."""
    state = app_state(request)
    if state.drain.draining:  # SIGTERM: out of the balancer first, then the graceful stop
        return json_response({"status": "draining"}, status=503)
    checks = await state.readiness()
    needed = [n for n in (require or "").split(",") if n]
    unknown = [n for n in needed if n not in checks]
    if unknown:
        raise InvalidRequest(f"require names {', '.join(unknown)}; it takes {', '.join(checks)}.", param="require")
    ready = all(checks[n] for n in needed)
    status = "not_ready" if not ready else "ready" if all(checks.values()) else "degraded"
    return json_response({"status": status, "checks": checks}, status=200 if ready else 503)


def method_not_allowed(method: str, path: str, allow: str) -> TollwayError:
    """A 405 in the OpenAI shape with its ``allow`` header: a FastAPI route's, and a POST endpoint's of the hot
    path (``tollway.app``)."""
    err = InvalidRequest(f"{method} is not served on {path}; {allow} is.", code="method_not_allowed")
    err.status = 405  # type: ignore[misc]
    err.headers = {"allow": allow}
    return err


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client sees is in the OpenAI shape; no traceback ever reaches the wire."""

    async def tollway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TollwayError)
        return json_response(exc.body(), status=exc.status, headers=exc.headers or None)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await tollway_error(request, InvalidRequest(f"Invalid request: {first['msg']}.", param=param))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err: TollwayError = NotFound(f"Unknown path {request.url.path}.", code="unknown_url")
        elif exc.status_code == 405:
            allow = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")  # Starlette's "Allow"
            err = method_not_allowed(request.method, request.url.path, allow)
        else:
            err = InvalidRequest(str(exc.detail), code=f"http_{exc.status_code}")
            err.status = exc.status_code  # type: ignore[misc]
            err.headers = dict(exc.headers or {})
        return await tollway_error(request, err)

    async def store_down(request: Request, exc: Exception) -> Response:
        """PostgreSQL or Redis unreachable, or a statement past its time limit: a 503 to retry."""
        if isinstance(exc, psycopg.errors.QueryCanceled):  # a statement past its limit (a search's: 10 s)
            why = "The database did not answer within the statement's time limit"
        else:
            store = "Redis" if isinstance(exc, RedisConnectionError | RedisTimeoutError) else "The database"
            why = f"{store} is unreachable right now"
        return await tollway_error(request, ServiceUnavailable(
            f"{why}; nothing was changed. Try again shortly.", code="store_unavailable"))

    async def bad_value(request: Request, exc: Exception) -> Response:
        """A value PostgreSQL refuses as data (a NUL in text, a number out of range): the client's input,
        mapped here once; the routes validate what they know of first."""
        return await tollway_error(request, InvalidRequest(
            "A value in the request cannot be stored or searched (for example a NUL character or a number out "
            "of range).", code="invalid_value"))

    async def pooled_session(request: Request, exc: Exception) -> Response:
        """A prepared statement another client's session holds, or one missing from this one: PostgreSQL is
        behind a transaction pooler that the settings do not name."""
        logging.getLogger("tollway.gateway").error(
            "PostgreSQL answered %s: it is behind a pooler in transaction mode (PgBouncer, RDS Proxy ...); set "
            "TOLLWAY_DATABASE_POOLER=transaction and TOLLWAY_DATABASE_DIRECT_URL (docs/reference/production.md)",
            type(exc).__name__)
        return await tollway_error(request, ServiceUnavailable(
            "The database connection is misconfigured; nothing was changed. The operator is told in the logs.",
            code="store_unavailable"))

    async def unexpected(request: Request, exc: Exception) -> Response:
        return await tollway_error(request, TollwayError("The gateway failed unexpectedly; the request id "
                                                         "identifies it in the logs."))

    app.add_exception_handler(TollwayError, tollway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    for foreign in STORE_ERRORS:
        app.add_exception_handler(foreign, store_down)
    app.add_exception_handler(psycopg.DataError, bad_value)
    for pooled in (psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName):
        app.add_exception_handler(pooled, pooled_session)
    app.add_exception_handler(Exception, unexpected)


# Foreign errors that mean a store is down (not a bug): mapped to 503 in one place.
STORE_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg_pool.PoolTimeout,
                                             RedisConnectionError, RedisTimeoutError)


def install_openapi(app: FastAPI) -> None:
    """The FastAPI document plus the hot endpoints, which are served in front of FastAPI."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema["paths"] = {**openapi_paths(), **schema.get("paths", {})}
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
