"""Roles and what each may do, in one table. A key has one role; every check in the gateway asks this
table (``require``), so adding a role or a permission is one edit here.

| permission     | app | finance | admin | prompt_engineer |
|----------------|-----|---------|-------|-----------------|
| call_models    |  x  |         |   x   |        x        |  chat, embeddings (engineers spend as the tenant)
| search         |  x  |         |   x   |        x        |  retrieval search, RAG in chat
| run_evals      |  x  |         |   x   |        x        |  eval runs, feedback
| manage_prompts |     |         |   x   |        x        |  prompt API and git
| read_costs     |     |    x    |   x   |                 |  cost reports, the console
| read_feedback  |     |    x    |   x   |        x        |  the feedback report
| administer     |     |         |   x   |                 |  admin API, /metrics, other tenants

Writing documents is ``administer``, or an app key created with ``--ingest``.
"""

from __future__ import annotations

from enum import StrEnum

from tollway.errors import PermissionDenied


class Role(StrEnum):
    APP = "app"
    FINANCE = "finance"
    ADMIN = "admin"
    PROMPT_ENGINEER = "prompt_engineer"


class Can(StrEnum):
    CALL_MODELS = "call_models"
    SEARCH = "search"
    RUN_EVALS = "run_evals"
    MANAGE_PROMPTS = "manage_prompts"
    READ_COSTS = "read_costs"
    READ_FEEDBACK = "read_feedback"
    ADMINISTER = "administer"


ROLES: tuple[str, ...] = tuple(Role)
PERMISSIONS: dict[Can, frozenset[Role]] = {
    Can.CALL_MODELS: frozenset({Role.APP, Role.ADMIN, Role.PROMPT_ENGINEER}),
    Can.SEARCH: frozenset({Role.APP, Role.ADMIN, Role.PROMPT_ENGINEER}),
    Can.RUN_EVALS: frozenset({Role.APP, Role.ADMIN, Role.PROMPT_ENGINEER}),
    Can.MANAGE_PROMPTS: frozenset({Role.ADMIN, Role.PROMPT_ENGINEER}),
    Can.READ_COSTS: frozenset({Role.FINANCE, Role.ADMIN}),
    Can.READ_FEEDBACK: frozenset({Role.FINANCE, Role.ADMIN, Role.PROMPT_ENGINEER}),
    Can.ADMINISTER: frozenset({Role.ADMIN}),
}


def may(role: str, can: Can) -> bool:
    return role in PERMISSIONS[can]


def roles_that(can: Can) -> list[str]:
    """The roles with a permission, in the table's order (for messages)."""
    return [r.value for r in Role if r in PERMISSIONS[can]]


def require(role: str, can: Can, message: str, code: str = "role_not_allowed") -> None:
    """A 403 with ``message`` unless ``role`` has the permission."""
    if not may(role, can):
        raise PermissionDenied(message, code=code)
