"""The route policy: a pure function from what is known about a request to where it goes.

``decide`` takes the request's features (the model asked for, what it needs, its difficulty), the
tenant's rules (quality/cost threshold, allow-list, quality floor), the budget signals (headroom,
spend velocity), each model's health ('ok', 'saturated', 'down': breakers and vLLM saturation folded
in by ``tollway.routing.health``) and the end user's canary bucket, and returns the steps to try
(target first, then the fallback chain, each with its deadlines) and a reason string that the ledger
and the ``x-tollway-route`` header carry. It calls nothing and keeps nothing, so every business rule
can be tested as a table of inputs and outputs, and the code that calls upstreams holds none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from tollway.errors import InvalidRequest, PermissionDenied, model_not_found
from tollway.routing.catalog import Catalog, ModelEntry
from tollway.routing.difficulty import Difficulty


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str  # as asked: a model, an alias, or a routing alias such as 'auto'
    kind: str = "chat"
    needs: frozenset[str] = frozenset()  # capabilities: 'tools', 'json_mode', 'vision'
    difficulty: Difficulty | None = None  # scored for routing aliases only
    tokens: int | None = None  # prompt plus requested output, where some model has a context window


@dataclass(frozen=True, slots=True)
class TenantRouting:
    threshold: float = 0.5
    allowed_models: frozenset[str] | None = None  # None: every model
    quality_floor: str | None = None  # no tier below this one
    degraded_answers: bool = False


@dataclass(frozen=True, slots=True)
class BudgetSignal:
    headroom: float | None = None  # the smallest share left of any budget that applies (0..1)
    velocity_soft: bool = False  # spend velocity above the tenant's soft line


@dataclass(frozen=True, slots=True)
class Step:
    model: ModelEntry
    deadline_s: float
    ttft_deadline_s: float

    @classmethod
    def of(cls, catalog: Catalog, model: ModelEntry) -> Step:
        """A call to ``model`` under its tier's deadlines."""
        tier = catalog.tier(model.tier)
        return cls(model, tier.deadline_s, tier.ttft_deadline_s)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    steps: tuple[Step, ...]  # the target first, then the fallback chain
    reason: str
    degraded_allowed: bool = False
    rollout: str | None = None  # 'canary' when the target is a rollout candidate
    rollout_of: str | None = None  # then: the model it stands in for

    @property
    def target(self) -> ModelEntry:
        return self.steps[0].model


def canary_bucket(subject: str) -> float:
    """A stable point in [0, 1) for an end user (or key): the same user always sees the same variant."""
    digest = hashlib.blake2b(subject.encode(), digest_size=8, person=b"tw-canary").digest()
    return int.from_bytes(digest, "big") / 2**64


def no_model_fits(req: RouteRequest) -> InvalidRequest:
    return InvalidRequest("No model this request may use (the tenant's allowed models, and the key's where it "
                          "names some) can serve it "
                          f"(needs: {', '.join(sorted(req.needs)) or 'nothing special'}).",
                          param="model", code="model_not_supported")


def candidates(catalog: Catalog, req: RouteRequest, tenant: TenantRouting) -> list[ModelEntry]:
    """Every model this request could end up on (for the worst-case budget reservation)."""
    if req.model in catalog.auto_aliases:
        return [m for m in catalog.models.values() if _eligible(catalog, m, req, tenant)]
    entry = _named(catalog, req, tenant)
    if entry.fallbacks is not None:
        below = [catalog.models[n] for n in entry.fallbacks]
    elif (rank := catalog.rank(entry.tier)) == len(catalog.tiers) - 1:
        below = []  # the lowest tier, nothing to fall back to: the common case, kept cheap
    else:
        below = [m for m in catalog.models.values() if catalog.rank(m.tier) > rank]
    # canary candidates too (a shadow's cost is not the tenant's); only what the tenant may use
    canaries = [catalog.models[r.candidate] for r in catalog.rollouts
                if r.model == entry.name and r.canary_percent > 0 and r.candidate in catalog.models]
    return [entry, *(m for m in (*below, *canaries) if _eligible(catalog, m, req, tenant))]


def _floor(catalog: Catalog, tenant: TenantRouting) -> int:
    if tenant.quality_floor is None:
        return len(catalog.tiers) - 1
    return catalog.rank(tenant.quality_floor)


def _fits(m: ModelEntry, req: RouteRequest) -> bool:
    return m.context_window is None or req.tokens is None or req.tokens <= m.context_window


def _eligible(catalog: Catalog, m: ModelEntry, req: RouteRequest, tenant: TenantRouting) -> bool:
    return (m.kind == req.kind and m.can(req.needs) and _fits(m, req)
            and (tenant.allowed_models is None or m.name in tenant.allowed_models)
            and catalog.rank(m.tier) <= _floor(catalog, tenant))


_FITNESS = {"ok": 0, "saturated": 1, "down": 2}


def _cheapest_per_tier(catalog: Catalog, req: RouteRequest, tenant: TenantRouting, start: int,
                       health: Mapping[str, str], reasons: list[str]) -> list[ModelEntry]:
    """Per tier from ``start`` down to the floor, the cheapest model that fits, healthy ones first
    (a cheaper one passed over for its health is named in the reason)."""
    out = []
    for rank in range(start, _floor(catalog, tenant) + 1):
        fit = [m for m in catalog.in_tier(rank, req.kind) if _eligible(catalog, m, req, tenant)]
        if not fit:
            continue
        best = min(fit, key=lambda m: _FITNESS[health.get(m.name, "ok")])  # stable: the cheapest of the fittest
        if best is not fit[0]:
            reasons.append(f"{fit[0].name}:{health[fit[0].name]}")
        out.append(best)
    return out


def _auto(catalog: Catalog, req: RouteRequest, tenant: TenantRouting, budget: BudgetSignal,
          health: Mapping[str, str], reasons: list[str]) -> list[ModelEntry]:
    difficulty = req.difficulty
    score = 1.0 if difficulty is None else difficulty.score
    hard = score >= tenant.threshold
    rank = 0 if hard else min(1, len(catalog.tiers) - 1)
    reasons.append(f"auto:difficulty={'?' if difficulty is None else difficulty.describe()}"
                   f"{'>=' if hard else '<'}{tenant.threshold:.2f}")
    last = len(catalog.tiers) - 1
    if rank < last and budget.velocity_soft:
        rank += 1
        reasons.append("velocity_step_down")
    elif rank < last and budget.headroom is not None and budget.headroom < catalog.routing.budget_step_down_headroom:
        rank += 1
        reasons.append("budget_step_down")
    floor = _floor(catalog, tenant)
    if rank > floor:
        rank = floor
        reasons.append("quality_floor")
    chain = _cheapest_per_tier(catalog, req, tenant, rank, health, reasons)
    if not chain:  # nothing fits at or below the chosen tier: look upwards
        chain = _cheapest_per_tier(catalog, req, tenant, 0, health, reasons)
    if chain and catalog.rank(chain[0].tier) != rank:  # the tier chosen had no model this request may use
        reasons.append(f"{catalog.tiers[rank].name}:none_eligible")
    return chain


def _named(catalog: Catalog, req: RouteRequest, tenant: TenantRouting) -> ModelEntry:
    entry = catalog.get(req.model)
    if entry is None:
        raise model_not_found(req.model)
    if tenant.allowed_models is not None and entry.name not in tenant.allowed_models:
        raise PermissionDenied(f"This tenant may not use model '{req.model}'.", param="model",
                               code="model_not_allowed")
    if not _fits(entry, req):
        raise InvalidRequest(f"This model's maximum context length is {entry.context_window} tokens; the request "
                             f"needs about {req.tokens} (prompt plus max_tokens).", param="messages",
                             code="context_length_exceeded")
    return entry


def _requested(catalog: Catalog, req: RouteRequest, tenant: TenantRouting, health: Mapping[str, str],
               reasons: list[str]) -> list[ModelEntry]:
    entry = _named(catalog, req, tenant)
    reasons.append("requested")
    if entry.fallbacks is not None:
        fallbacks = [catalog.models[n] for n in entry.fallbacks if _eligible(catalog, catalog.models[n], req, tenant)]
    else:
        fallbacks = _cheapest_per_tier(catalog, req, tenant, catalog.rank(entry.tier) + 1, health, reasons)
    return [entry, *(m for m in fallbacks if m.name != entry.name)]


def _canary(catalog: Catalog, chain: list[ModelEntry], req: RouteRequest, tenant: TenantRouting,
            bucket: float | None, reasons: list[str]) -> str | None:
    """The model the canary stands in for, when this end user's bucket puts the request on one."""
    if bucket is None:
        return None
    for rollout in catalog.rollouts:
        if rollout.model == chain[0].name and bucket * 100 < rollout.canary_percent:
            candidate = catalog.models.get(rollout.candidate)
            if candidate is not None and _eligible(catalog, candidate, req, tenant):
                chain.insert(0, candidate)
                reasons.append(f"canary:{candidate.name}")
                return rollout.model
    return None


def _by_health(chain: list[ModelEntry], health: Mapping[str, str], reasons: list[str]) -> list[ModelEntry]:
    """Healthy models keep their order; saturated ones move behind them (overflow before the queue
    turns into timeouts); models whose every replica is down are left out."""
    ready = [m for m in chain if health.get(m.name, "ok") == "ok"]
    busy = [m for m in chain if health.get(m.name) == "saturated"]
    for model in chain:
        state = health.get(model.name, "ok")
        if state != "ok" and (model is chain[0] or state == "down"):
            reasons.append(f"{model.name}:{state}")
    return ready + busy


def decide(catalog: Catalog, req: RouteRequest, tenant: TenantRouting, budget: BudgetSignal,
           health: Mapping[str, str], canary: float | None = None) -> RouteDecision:
    reasons: list[str] = []
    if req.model in catalog.auto_aliases:
        chain = _auto(catalog, req, tenant, budget, health, reasons)
    else:
        chain = _requested(catalog, req, tenant, health, reasons)
        if budget.velocity_soft:
            reasons.append("velocity_soft")  # recorded; a named model is not swapped for a cheaper one
    if not chain:
        raise no_model_fits(req)
    rollout_of = _canary(catalog, chain, req, tenant, canary, reasons)
    ordered = _by_health(chain, health, reasons)
    steps = tuple(Step.of(catalog, m) for m in ordered)
    if steps and steps[0].model is not chain[0]:
        reasons.append(f"target={steps[0].model.name}")
    return RouteDecision(steps=steps, reason=";".join(reasons), degraded_allowed=tenant.degraded_answers,
                         **({"rollout": "canary", "rollout_of": rollout_of}
                            if rollout_of is not None and steps and steps[0].model is chain[0] else {}))
