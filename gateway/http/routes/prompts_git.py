"""`git clone` and `git push` against ``/v1/prompts.git``: the prompts part's git server
(``tollway.prompts.GitServer``) behind the gateway's authentication. HTTP Basic with a Tollway key as the
password (the auth middleware answers ``WWW-Authenticate: Basic`` on this path so git sends credentials);
prompt engineer and admin keys only, each on its own tenant's repository."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool
from starlette.types import Receive, Scope, Send

from tollway.errors import PermissionDenied
from tollway.gateway.http.middleware import send_error
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.roles import Can, may
from tollway.prompts import GitServer

PREFIX = "/v1/prompts.git"


class GitHTTP:
    def __init__(self, pool: AsyncConnectionPool, on_landed: Callable[[int], Awaitable[None]]) -> None:
        self.server = GitServer(pool, on_landed)

    def close(self) -> None:
        self.server.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal = scope["state"]["principal"]
        if not may(principal.role, Can.MANAGE_PROMPTS):
            await send_error(send, PermissionDenied(f"A {principal.role} key may not use the prompt repository.",
                                                    code="role_not_allowed"))
            return
        await self.server.serve(scope, receive, send, prefix=PREFIX, tenant_id=principal.tenant_id,
                                author=principal.author)
