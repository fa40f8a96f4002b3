"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks contextvars and buffers streams).

Order, outermost first: RequestId -> BodyLimit -> Auth. Each one is small and does one thing.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.errors import AuthenticationFailed, InvalidRequest, PayloadTooLarge, TollwayError
from tollway.gateway.chat.wire import new_request_id
from tollway.gateway.tenancy.keys import KeyStore


async def send_json(send: Send, payload: Any, headers: dict[str, str], status: int = 200) -> None:
    body = orjson.dumps(payload)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: TollwayError, headers: dict[str, str] | None = None, *,
                     path: str | None = None) -> None:
    """The error in the shape of the API ``path`` belongs to (Anthropic's on /v1/messages, else OpenAI's)."""
    body = anthropic_error(exc) if path == ANTHROPIC_PATH else exc.body()
    await send_json(send, body, {**exc.headers, **(headers or {})}, exc.status)


ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(exc: TollwayError) -> dict[str, Any]:
    """A Tollway error in Anthropic's shape (its code and param kept beside Anthropic's fields)."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(exc.status, "api_error"),
                                       "message": exc.message, "code": exc.code, "param": exc.param}}


class RequestIdMiddleware:
    """Gives every request a gateway-made id (the ledger's key), echoed as ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or sent chunked; 400 for a URL
    holding a NUL character."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # no name, id or query the gateway serves holds a NUL character (PostgreSQL text cannot)
            await send_error(send, InvalidRequest("The URL may not contain a NUL character (%00).",
                                                  code="invalid_url"))
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await send_error(send, self._too_large(), {"connection": "close"}, path=scope["path"])
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> PayloadTooLarge:
        """Built when raised, not for every request (an exception made ahead is garbage in a cycle)."""
        return PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")



class AuthMiddleware:
    """Resolves the key on /v1 paths to a Principal in ``scope["state"]``: ``Authorization: Bearer <key>``,
    or HTTP Basic with the key as the password (what git sends for the prompt repository, whose path
    answers ``WWW-Authenticate: Basic`` so git knows to send it)."""

    def __init__(self, app: ASGIApp, keys: Callable[[], KeyStore], basic_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        self.basic_paths = basic_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope["state"]
        secret = credential(scope["headers"])
        try:
            if secret is None:
                raise AuthenticationFailed(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
            state["principal"] = await self.keys().authenticate(secret)
        except TollwayError as exc:
            challenge = 'Basic realm="Tollway"' if scope["path"].startswith(self.basic_paths) else "Bearer"
            await send_error(send, exc, {"www-authenticate": challenge} if exc.status == 401 else None,
                             path=scope["path"])
            return
        await self.app(scope, receive, send)


def credential(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of ``Authorization: Bearer`` (or Basic's password, for git), else of ``x-api-key`` (as
    Anthropic's clients send it)."""
    found = _authorization(headers)
    if found is not None:
        return found
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def _authorization(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            if scheme.lower() == "basic" and token:
                try:
                    _, _, password = base64.b64decode(token, validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return None
                return password or None
            return None
    return None
