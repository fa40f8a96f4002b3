"""HTTP routes: parse, call one service, shape the answer. Nothing else lives here."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from tollway.gateway.ledger import utcnow
from tollway.gateway.protocol import ChatCompletionRequest, EmbeddingRequest
from tollway.gateway.service import CallContext, CompletionService, JSONResult
from tollway.gateway.streaming import ClientDisconnected, EventStreamResponse, until_disconnect

from tollway.errors import InvalidRequest, NotFound, TollwayError

router = APIRouter()


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def _context(request: Request) -> CallContext:
    return CallContext(request_id=request.state.request_id, principal=request.state.principal,
                       header_user=request.headers.get("x-tollway-user"), started=time.perf_counter(),
                       created_at=utcnow())


def _service(request: Request) -> CompletionService:
    service: CompletionService = request.app.state.tollway.service
    return service


def _body_schema(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema()}}}}  # type: ignore[attr-defined]


@router.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest),
             summary="Create a chat completion (OpenAI-compatible, streaming or not)")
async def chat_completions(request: Request) -> Any:
    ctx, service = _context(request), _service(request)
    result = await until_disconnect(request, lambda read_body: service.chat(ctx, read_body))
    if isinstance(result, JSONResult):
        return json_response(result.payload, headers=result.headers)
    return EventStreamResponse(result.frames, result.headers)


@router.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest),
             summary="Create embeddings (OpenAI-compatible)")
async def embeddings(request: Request) -> Response:
    ctx, service = _context(request), _service(request)
    result = await until_disconnect(request, lambda read_body: service.embeddings(ctx, read_body))
    return json_response(result.payload, headers=result.headers)


@router.get("/v1/models", summary="List the models this key may use")
async def models(request: Request) -> Response:
    return json_response(_service(request).models(request.state.principal))


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness: database, Redis and an upstream reachable")
async def readyz(request: Request) -> Response:
    checks = await request.app.state.tollway.readiness()
    ready = all(checks.values())
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks},
                         status=200 if ready else 503)


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client sees is in the OpenAI shape; no traceback ever reaches the wire."""

    async def tollway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TollwayError)
        return json_response(exc.body(), status=exc.status)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await tollway_error(request, InvalidRequest(f"Invalid request: {first['msg']}.", param=param))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err: TollwayError = NotFound(f"Unknown path {request.url.path}.", code="unknown_url")
        else:
            err = InvalidRequest(str(exc.detail), code=f"http_{exc.status_code}")
            err.status = exc.status_code  # type: ignore[misc]
        return await tollway_error(request, err)

    async def disconnected(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return await tollway_error(request, TollwayError("The gateway failed unexpectedly; the request id "
                                                         "identifies it in the logs."))

    app.add_exception_handler(TollwayError, tollway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, disconnected)
    app.add_exception_handler(Exception, unexpected)
