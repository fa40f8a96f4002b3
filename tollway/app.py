"""The composition root: settings in, a FastAPI app out. Everything stateful is built in the lifespan
and held by one ``AppState``, reachable as ``app.state.tollway``; nothing is built at import time."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.types import Message, Receive, Scope, Send

import tollway
from tollway.config import ConfigError
from tollway.errors import TollwayError
from tollway.failures import one_line
from tollway.gateway.console.routes import router as console_router
from tollway.gateway.http.api import (
    install_error_handlers,
    install_openapi,
    json_response,
    method_not_allowed,
    router,
)
from tollway.gateway.http.endpoints import HOT_ROUTES
from tollway.gateway.http.middleware import AuthMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from tollway.gateway.http.routes import budgets, guards, models, operations, reports, responses, tenants
from tollway.gateway.http.routes.evals import router as evals_router
from tollway.gateway.http.routes.metrics import router as metrics_router
from tollway.gateway.http.routes.prompts import router as prompts_router
from tollway.gateway.http.routes.prompts_git import PREFIX as GIT_PREFIX
from tollway.gateway.http.routes.quality import router as quality_router
from tollway.gateway.http.routes.retrieval import router as retrieval_router
from tollway.settings import Settings
from tollway.state import AppState, StartupError, build_state, upstream_configs

log = logging.getLogger("tollway")
HOT_PATHS = frozenset(path for _, path in HOT_ROUTES)


class Gateway:
    """The ASGI application: our middleware, then the hot endpoints, then FastAPI for the rest.

    FastAPI owns the lifespan (which builds ``AppState``), the docs and the small routes."""

    def __init__(self, settings: Settings, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        self.settings = settings
        self._startup_failure: str | None = None  # why start-up failed, where a line says it better than a traceback

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with AsyncExitStack() as stack:
                try:
                    app.state.tollway = state = await build_state(settings, stack, span_exporter, metric_reader)
                except Exception as exc:
                    self._startup_failure = startup_reason(exc)
                    raise
                stack.callback(state.drain.install())  # under `tollway serve`: SIGTERM pauses, then stops
                # Everything built so far lives as long as the process: keep it out of the cyclic GC,
                # whose full passes over it otherwise stall requests for tens of milliseconds.
                gc.collect()
                gc.freeze()
                yield

        self.api = FastAPI(title="Tollway", version=tollway.__version__, lifespan=lifespan, redoc_url=None,
                           description="OpenAI-compatible LLM gateway with cost control.")
        self.api.include_router(router)
        for surface in (budgets, guards, tenants, models, operations, reports, responses):
            self.api.include_router(surface.router)
        self.api.include_router(prompts_router)
        self.api.include_router(retrieval_router)
        self.api.include_router(evals_router)
        self.api.include_router(console_router)
        self.api.include_router(metrics_router)
        self.api.include_router(quality_router)
        install_error_handlers(self.api)
        install_openapi(self.api)
        self._stack = RequestIdMiddleware(BodyLimitMiddleware(
            AuthMiddleware(self._dispatch, lambda: self.state.keys, basic_paths=(GIT_PREFIX,)),
            settings.max_body_bytes))

    @property
    def state(self) -> AppState:
        state: AppState = self.api.state.tollway
        return state

    def lifespan(self) -> AbstractAsyncContextManager[Any]:
        """Run start-up and shutdown without a server (tests)."""
        return self.api.router.lifespan_context(self.api)

    def _lifespan_reply(self, send: Send) -> Send:
        """The server logs the message of a failed start-up: our line instead of the traceback, where a cause
        outside the program (a config, an upstream, a store) has one."""

        async def reply(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self._startup_failure is not None:
                message = {**message, "message": f"tollway could not start: {self._startup_failure}"}
            await send(message)

        return reply

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = HOT_ROUTES.get((scope.get("method", ""), scope["path"]))
        if handler is None and scope["path"].startswith(GIT_PREFIX + "/") and self.state.git is not None:
            await self.state.git(scope, receive, send)
        elif handler is None and scope["path"] in HOT_PATHS:  # another method on a POST endpoint
            error = method_not_allowed(scope.get("method", ""), scope["path"], "POST")
            await json_response(error.body(), status=error.status, headers=error.headers)(scope, receive, send)
        elif handler is None:
            await self.api(scope, receive, send)
        else:
            await handler(scope, receive, send, self.state.service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.api(scope, receive, self._lifespan_reply(send))
        else:
            await self._stack(scope, receive, send)


SERVE_SETTINGS_ENV = "TOLLWAY_SERVE_SETTINGS"  # `tollway serve --workers N` hands each worker its settings here


def create_app_from_env() -> Gateway:
    """The factory each worker of `tollway serve --workers N` calls: the parent's resolved settings."""
    return create_app(Settings.model_validate_json(os.environ[SERVE_SETTINGS_ENV]))


def startup_reason(exc: Exception) -> str | None:
    """A failed start-up in one line: a configuration the gateway refuses, an upstream it cannot list, a store it
    cannot reach. None for anything else (a bug: its traceback is what helps)."""
    if isinstance(exc, StartupError | ConfigError):
        return str(exc)
    if isinstance(exc, TollwayError):
        return exc.message
    return one_line(exc)


def create_app(settings: Settings | None = None, *, span_exporter: SpanExporter | None = None,
               metric_reader: MetricReader | None = None) -> Gateway:
    """``span_exporter`` / ``metric_reader``: where tests collect telemetry (production sets an OTLP endpoint)."""
    return Gateway(settings or Settings(), span_exporter, metric_reader)


__all__ = ["AppState", "Gateway", "StartupError", "create_app", "create_app_from_env", "upstream_configs"]
