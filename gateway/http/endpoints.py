"""The two hot endpoints, as plain ASGI: parse, call the service, shape the answer.

They sit in front of FastAPI (see ``tollway.app.Gateway``) because a chat completion pays for every
framework layer on every request; here it pays for none of them. They behave like any FastAPI
route: errors in the OpenAI shape, never a traceback. Their OpenAPI entries come from the same
pydantic models (``openapi_paths``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway.errors import TollwayError
from tollway.gateway.chat.service import CallContext, CompletionService, JSONResult, StreamResult
from tollway.gateway.http.middleware import send_error, send_json
from tollway.gateway.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    MessagesRequest,
    ModerationRequest,
    ResponseRequest,
)
from tollway.gateway.http.streaming import BodyReader, ClientDisconnected, send_event_stream, until_disconnect

log = logging.getLogger("tollway.gateway")

Work = Callable[[CompletionService, CallContext, BodyReader], Awaitable[JSONResult | StreamResult]]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def endpoint(work: Work) -> Callable[[Scope, Receive, Send, CompletionService], Awaitable[None]]:
    """Errors in the shape of the API the path belongs to (``send_error``)."""

    async def handle(scope: Scope, receive: Receive, send: Send, service: CompletionService) -> None:
        state = scope["state"]
        try:
            ctx = CallContext.of(state["request_id"], state["principal"], lambda name: _header(scope, name.encode()))
        except TollwayError as exc:  # a header out of bounds
            await send_error(send, exc, path=scope["path"])
            return
        try:
            result = await until_disconnect(receive, lambda read_body: work(service, ctx, read_body))
        except TollwayError as exc:
            await send_error(send, exc, path=scope["path"])
            return
        except ClientDisconnected:
            return
        except Exception:
            log.exception("unexpected failure serving %s", ctx.request_id)
            await send_error(send, TollwayError("The gateway failed unexpectedly; the request id identifies "
                                                "it in the logs."), path=scope["path"])
            return
        if isinstance(result, JSONResult):
            await send_json(send, result.payload, result.headers)
        else:
            await send_event_stream(send, receive, result.frames, result.headers)

    return handle


chat_completions = endpoint(lambda service, ctx, read_body: service.chat(ctx, read_body))
embeddings = endpoint(lambda service, ctx, read_body: service.embeddings(ctx, read_body))

moderations = endpoint(lambda service, ctx, read_body: service.moderations(ctx, read_body))
completions = endpoint(lambda service, ctx, read_body: service.completions(ctx, read_body))
messages = endpoint(lambda service, ctx, read_body: service.messages(ctx, read_body))
responses = endpoint(lambda service, ctx, read_body: service.responses(ctx, read_body))

HOT_ROUTES = {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/embeddings"): embeddings,
              ("POST", "/v1/moderations"): moderations, ("POST", "/v1/completions"): completions,
              ("POST", "/v1/messages"): messages, ("POST", "/v1/responses"): responses}


_ERROR = {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}


def _operation(model: type[Any], summary: str, *, anthropic: bool = False) -> dict[str, Any]:
    shape = {"type": "object", "properties": {"type": {"const": "error"}, "error": _ERROR}} if anthropic else \
        {"type": "object", "properties": {"error": _ERROR}}
    error = {"description": "Anthropic-shaped error" if anthropic else "OpenAI-shaped error",
             "content": {"application/json": {"schema": shape}}}
    return {"post": {
        "summary": summary,
        "security": [{"api_key": []}, {"bearer": []}] if anthropic else [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
        "responses": {"200": {"description": "JSON, or server-sent events when stream is true"},
                      **{str(code): error for code in (400, 401, 403, 404, 413, 429, 502, 503, 504)}},
    }}


def openapi_paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": _operation(ChatCompletionRequest,
                                           "Create a chat completion (OpenAI-compatible, streaming or not)"),
        "/v1/completions": _operation(CompletionRequest, "Create a text completion (OpenAI's legacy endpoint, "
                                                         "served through the chat path)"),
        "/v1/embeddings": _operation(EmbeddingRequest, "Create embeddings (OpenAI-compatible)"),
        "/v1/moderations": _operation(ModerationRequest, "Classify texts with the tenant's guards "
                                                         "(OpenAI-compatible shape)"),
        "/v1/responses": _operation(ResponseRequest, "Create a response (OpenAI's Responses API, served "
                                                     "through the chat path; stored per the content policy)"),
        "/v1/messages": _operation(MessagesRequest, "Create a message (Anthropic's Messages API, served through "
                                                    "the chat path; x-api-key or bearer)", anthropic=True),
    }
