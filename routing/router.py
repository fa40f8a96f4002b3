"""The face of routing that the gateway calls: read a request's features, plan its route, decide it
with the budget signals, carry it out. Everything else in this part is its business.

Planning happens before budgets are known and bounds what is reserved; ``decide`` may only narrow
the plan (a tier down near exhaustion or above the velocity soft line), never grow it. Every call's
claim on its replica is handed back through ``Served.release`` by whoever finishes the answer, for
JSON answers and streams alike.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tollway.infra.background import Background
from tollway.jsontypes import JSON
from tollway.routing.cache import CachedAnswer, ResponseCache, cache_key, deterministic
from tollway.routing.catalog import Catalog, ModelEntry
from tollway.routing.decision import (
    BudgetSignal,
    RouteDecision,
    RouteRequest,
    Step,
    TenantRouting,
    canary_bucket,
    candidates,
    decide,
    no_model_fits,
)
from tollway.routing.difficulty import assess
from tollway.routing.fallback import Caller, Served
from tollway.routing.health import Health
from tollway.routing.tokens import count_messages
from tollway.routing.wire import check_client_fields


def needs(body: JSON, messages: list[Any]) -> frozenset[str]:
    """The capabilities a request needs from its model: 'tools', 'json_mode', 'vision'."""
    out = set()
    if body.get("tools") or body.get("functions"):
        out.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        out.add("json_mode")
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            out.add("vision")
    return frozenset(out)


def affinity_of(messages: list[Any]) -> str | None:
    """The system prompt, where there is one: requests that share it go to the same replica (its prefix
    cache is warm there)."""
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    content = first.get("content") if first.get("role") in ("system", "developer") else None
    return content if isinstance(content, str) and content else None


@dataclass(frozen=True, slots=True)
class Plan:
    """The route as planned before budgets are known."""

    route: RouteRequest
    tenant: TenantRouting
    models: tuple[ModelEntry, ...]  # every model the request may end up on (a cached answer must be one)
    chain: tuple[ModelEntry, ...]  # the planned route, target first: what the reservation covers
    health: Mapping[str, str]
    bucket: float | None  # the end user's canary bucket, where the catalog has canaries


@dataclass(slots=True)
class Router:
    """Built in the app's lifespan; the gateway's only way into routing."""

    catalog: Catalog
    caller: Caller
    health: Health
    cache: ResponseCache | None = None
    rng: random.Random = field(default_factory=random.Random)
    background: Background = field(default_factory=lambda: Background("response cache write", drain_s=10))

    def features(self, model: str, messages: list[Any], body: JSON, *, max_output: int, n: int = 1,
                 extra_input: int = 0, prompt_tokens: int | None = None) -> RouteRequest:
        """What the policy reads: the model asked for, what the request needs, its difficulty (for
        routing aliases), and its size where some model has a context window. ``extra_input``: tokens
        a later stage may still add (a retrieval's context budget), counted as if already there;
        ``prompt_tokens``: the messages' count where the caller has it already."""
        wants = needs(body, messages)
        auto = model in self.catalog.auto_aliases
        difficulty = assess(messages, tools="tools" in wants, structured="json_mode" in wants) if auto else None
        tokens = None
        if self.catalog.has_context_windows:  # only then is the prompt counted here
            prompt = count_messages(messages) if prompt_tokens is None else prompt_tokens
            tokens = prompt + extra_input + max_output * n
        return RouteRequest(model=model, needs=wants, difficulty=difficulty, tokens=tokens)

    def plan(self, route: RouteRequest, tenant: TenantRouting, subject: str) -> Plan:
        """``subject``: the end user (or key) whose canary bucket applies."""
        models = tuple(candidates(self.catalog, route, tenant))
        if not models:
            raise no_model_fits(route)
        health = {m.name: self.health.state_of(m.replicas) for m in models}
        bucket = canary_bucket(subject) if self.catalog.has_canaries else None
        planned = decide(self.catalog, route, tenant, BudgetSignal(), health, bucket)
        return Plan(route, tenant, models, tuple(s.model for s in planned.steps) or models, health, bucket)

    def step_down(self, plan: Plan) -> tuple[ModelEntry, ...]:
        """For a routing alias: the planned chain without its top tier, when there is a lower one."""
        if plan.route.model not in self.catalog.auto_aliases or not plan.chain:
            return ()
        top = min(self.catalog.rank(m.tier) for m in plan.chain)
        return tuple(m for m in plan.chain if self.catalog.rank(m.tier) > top)

    def decide(self, plan: Plan, budget: BudgetSignal) -> RouteDecision:
        return decide(self.catalog, plan.route, plan.tenant, budget, plan.health, plan.bucket)

    def direct(self, model: ModelEntry, reason: str = "requested") -> RouteDecision:
        """A route to one model and its replicas only (embeddings, shadow calls): never another model."""
        return RouteDecision((Step.of(self.catalog, model),), reason)

    def check_fields(self, endpoint: str, body: JSON) -> None:
        """A 400 naming the first field of a client's body that no upstream may receive
        (``tollway.routing.wire``): called where a request is parsed, before anything is spent."""
        check_client_fields(endpoint, body, self.catalog.forward_fields)

    def affinity(self, messages: list[Any]) -> str | None:
        return affinity_of(messages) if self.catalog.routing.prefix_affinity else None

    async def call(self, decision: RouteDecision, body: JSON, *, stream: bool, affinity: str | None = None,
                   endpoint: str = "chat") -> Served:
        """Carry the decision out through its fallback chain. The caller owns the returned ``Served``
        and hands its replica back with ``release`` when the answer is finished."""
        return await self.caller.call(decision, body, stream=stream, affinity=affinity, endpoint=endpoint)

    # -- the response cache ---------------------------------------------------------------------
    def cache_key(self, tenant_id: int, body: JSON, versions: tuple[str | None, ...] = ()) -> str | None:
        """The key of a deterministic request's answer (None: not cacheable). ``versions``: the prompt and
        index versions that shaped it, so a label move or a re-ingest is a miss."""
        if self.cache is None or not deterministic(body):
            return None
        return cache_key(tenant_id, body, versions)

    async def cached(self, key: str) -> CachedAnswer | None:
        return None if self.cache is None else await self.cache.get(key)

    async def store(self, key: str, answer: JSON, model: str, cost: Decimal) -> None:
        if self.cache is not None:
            await self.cache.put(key, answer, model, cost)

    def remember(self, key: str, answer: JSON, model: str, cost: Decimal) -> None:
        """``store`` after the answer has gone to the client (tracked, drained at shutdown)."""
        self.spawn(self.store(key, answer, model, cost))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Work after the answer (caching a finished stream): tracked, awaited at shutdown."""
        self.background.spawn(work)

    async def drain(self) -> None:
        await self.background.drain()
