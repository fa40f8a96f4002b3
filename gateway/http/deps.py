"""What route handlers share: the process state (typed), the caller (the principal the auth middleware put
on the request), the admin check, and the strict base of request bodies (unknown fields are a 400)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.roles import Can, require

if TYPE_CHECKING:
    from tollway.state import AppState


def app_state(request: Request) -> AppState:
    """The process's state, built in the lifespan (``tollway.state``)."""
    state: AppState = request.app.state.tollway
    return state


def caller(request: Request) -> Principal:
    """The authenticated key of this request."""
    principal: Principal = request.state.principal
    return principal


def admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    require(principal.role, Can.ADMINISTER, "This needs an admin key.")
    return principal


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
