"""What every model call shares, chat and embeddings alike: who is calling, the ledger row it opens, the
model it may use, the tenant's rules, and admission against budgets (the worst case reserved)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry.trace import SpanKind

from tollway.errors import InvalidRequest, PermissionDenied, model_not_found
from tollway.gateway.http.protocol import USER_CHARS
from tollway.gateway.metering.accounting import Tally
from tollway.gateway.metering.ledger import Ledger, LedgerRow, utcnow
from tollway.gateway.metering.quota import Admission, Demand, QuotaService, fingerprint, to_nano
from tollway.gateway.observability.telemetry import Telemetry
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import PolicyStore, TenantPolicy, TenantRules
from tollway.gateway.tenancy.roles import Can, require
from tollway.jsontypes import JSON
from tollway.routing import Catalog, MediaURLs, ModelEntry, TenantRouting, Usage, check_content_parts

# Worst-case input: tiktoken's count, plus a margin for upstreams whose tokenizers count more.
INPUT_MARGIN = 1.10
INPUT_SLACK = 16
# Worst-case output: max_tokens in the upstream's tokens, which tiktoken may count a little higher.
# Streams are counted with tiktoken and cut at this figure, so a compliant upstream is never cut and
# one that ignores max_tokens never outgrows its reservation.
OUTPUT_MARGIN = 1.25
OUTPUT_SLACK = 8


def reserved_input(tokens: int) -> int:
    return math.ceil(tokens * INPUT_MARGIN) + INPUT_SLACK


def reserved_output(max_tokens: int, n: int = 1) -> int:
    return (math.ceil(max_tokens * OUTPUT_MARGIN) + OUTPUT_SLACK) * n


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    principal: Principal
    header_user: str | None
    started: float  # time.perf_counter()
    created_at: datetime
    session: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def of(cls, request_id: str, principal: Principal, header: Callable[[str], str | None]) -> CallContext:
        """A request's context from its headers (``header``: a lookup by lower-case name), starting now; an end
        user or session id longer than the ``user`` field may be, or tags beyond ``MAX_TAGS`` of
        ``MAX_TAG_CHARS``, are a 400 (they go into every ledger row, Redis keys and reports)."""
        user, session, tags = header("x-tollway-user"), header("x-tollway-session"), header("x-tollway-tags")
        for name, value in (("x-tollway-user", user), ("x-tollway-session", session)):
            if value is not None and len(value) > USER_CHARS:
                raise InvalidRequest(f"'{name}' may be at most {USER_CHARS} characters.", param=name)
        return cls(request_id=request_id, principal=principal, header_user=user, started=time.perf_counter(),
                   created_at=utcnow(), session=session,
                   tags=checked_tags([t.strip() for t in tags.split(",") if t.strip()] if tags else [],
                                     "x-tollway-tags"))


@dataclass(frozen=True, slots=True)
class Limits:
    max_messages: int
    max_tokens: int
    media_urls: MediaURLs = "public"  # where a content part's media URL may point (tollway.routing.wire)
    media_part_tokens: int = 4096  # reserved per media part (TOLLWAY_MEDIA_PART_TOKENS)


# OpenTelemetry's GenAI operation names, per endpoint
OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "messages": "chat", "responses": "chat",
              "embeddings": "embeddings"}


@dataclass(slots=True)
class JSONResult:
    payload: JSON
    headers: dict[str, str]


@dataclass(slots=True)
class StreamResult:
    frames: AsyncIterator[bytes]
    headers: dict[str, str]


MAX_TAGS, MAX_TAG_CHARS = 32, 64


def checked_tags(tags: list[str], param: str) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TAG_CHARS for t in tags):
        raise InvalidRequest(f"At most {MAX_TAGS} tags of at most {MAX_TAG_CHARS} characters each.", param=param)
    return tuple(tags)


def tags_of(ctx: CallContext, data: JSON) -> list[str] | None:
    """The request's feature tags: ``x-tollway-tags`` and ``metadata.tags`` (together at most ``MAX_TAGS``)."""
    tags = list(ctx.tags)
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        raw = metadata.get("tags")
        if isinstance(raw, str):
            tags += [t.strip() for t in raw.split(",") if t.strip()]
        elif isinstance(raw, list):
            scalars = (str(t) for t in raw if isinstance(t, str | int | float))
            tags += itertools.islice((t for t in scalars if t.strip()), MAX_TAGS + 1)
    return sorted(set(checked_tags(tags, "metadata.tags"))) or None


def _needs_bound(rules: TenantRules, principal: Principal) -> bool:
    policy = rules.policy
    return bool(rules.budgets or policy.tpm or policy.rpm or principal.tpm or principal.rpm
                or rules.parallel or principal.max_parallel_requests
                or policy.velocity_hard_usd_per_min or policy.velocity_soft_usd_per_min)


class Calls:
    """The shared steps, built once in the lifespan."""

    def __init__(self, catalog: Catalog, ledger: Ledger, telemetry: Telemetry, limits: Limits,
                 policies: PolicyStore | None = None, quota: QuotaService | None = None) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.telemetry = telemetry
        self.limits = limits
        self.policies = policies
        self.quota = quota

    def open(self, ctx: CallContext, endpoint: str) -> Tally:
        p = ctx.principal
        span = self.telemetry.tracer.start_span(endpoint, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": OPERATIONS.get(endpoint, endpoint),
            "tollway.request_id": ctx.request_id, "tollway.tenant": p.tenant})
        row = LedgerRow(request_id=ctx.request_id, created_at=ctx.created_at, tenant_id=p.tenant_id,
                        key_id=p.key_id, endpoint=endpoint, end_user=ctx.header_user, session_id=ctx.session,
                        tags=list(ctx.tags) or None)
        return Tally(ledger=self.ledger, telemetry=self.telemetry, quota=self.quota, row=row, span=span,
                     started=ctx.started, tenant=p.tenant,
                     baseline=self.catalog.baseline if endpoint in ("chat.completions", "completions", "messages")
                     else None)

    def resolve(self, principal: Principal, name: str, kind: str, *,
                also: ModelEntry | None = None) -> ModelEntry | None:
        """The model a request names (None for a routing alias such as 'auto'), or the 4xx why not.
        ``also``: a model served besides the catalog (the packaged embedder), checked the same way."""
        require(principal.role, Can.CALL_MODELS, f"A {principal.role} key may not call models.")
        if kind == "chat" and name in self.catalog.auto_aliases:
            return None
        entry = also if also is not None and name == also.name else self.catalog.get(name)
        if entry is None:
            raise model_not_found(name)
        if not principal.may_use(entry.name):
            raise PermissionDenied(f"This key may not use model '{name}'.", param="model",
                                   code="model_not_allowed")
        if entry.kind != kind:
            raise InvalidRequest(f"The model '{name}' is an {entry.kind} model; it cannot serve {kind}.",
                                 param="model", code="model_not_supported")
        return entry

    def check_messages(self, count: int) -> None:
        if count > self.limits.max_messages:
            raise InvalidRequest(f"At most {self.limits.max_messages} messages are allowed.", param="messages")

    def check_parts(self, messages: list[Any]) -> None:
        check_content_parts(messages, self.limits.media_urls)

    def check_max_tokens(self, name: str, value: int | None) -> None:
        if value is not None and value > self.limits.max_tokens:
            raise InvalidRequest(f"'{name}' may be at most {self.limits.max_tokens}.", param=name)

    async def rules(self, tenant_id: int) -> TenantRules:
        if self.policies is None:
            return TenantRules(TenantPolicy(tenant_id), ())
        return await self.policies.rules(tenant_id)

    @staticmethod
    def tenant_routing(rules: TenantRules, principal: Principal) -> TenantRouting:
        policy = rules.policy
        allowed = None if policy.allowed_models is None else frozenset(policy.allowed_models)
        if principal.allowed_models is not None:
            keyed = frozenset(principal.allowed_models)
            allowed = keyed if allowed is None else allowed & keyed
        return TenantRouting(threshold=policy.route_threshold, allowed_models=allowed,
                             quality_floor=policy.quality_floor, degraded_answers=policy.degraded_answers)

    def bounded(self, rules: TenantRules, principal: Principal) -> bool:
        """Whether anything limits this request (then its worst case is computed and reserved)."""
        return self.quota is not None and _needs_bound(rules, principal)

    async def admit(self, ctx: CallContext, tally: Tally, rules: TenantRules, body: bytes,
                    models: Sequence[ModelEntry], worst: Usage | None, *, retries: int = 0,
                    count_storm: bool = True) -> Admission | None:
        """Reserve the worst case in every budget and limit that applies, or refuse (429/503). ``worst``:
        the request's worst-case usage (None: nothing bounds it), priced at the dearest of ``models``;
        ``retries``: failed attempts whose prompt a stream may be billed before it succeeds."""
        if self.quota is None:
            return None
        demand = Demand(0, 0)
        if worst is not None:
            prompt_only = Usage(input_tokens=worst.input_tokens)
            usd = max(m.price.cost(worst) for m in models) + retries * max(m.price.cost(prompt_only) for m in models)
            demand = Demand(to_nano(usd), worst.input_tokens * (1 + retries) + worst.output_tokens)
        admission = await self.quota.admit(
            ctx.principal, rules, rid=ctx.request_id, end_user=tally.row.end_user, session=ctx.session,
            fingerprint=fingerprint(ctx.principal.tenant_id, body), demand=demand, count_storm=count_storm,
            row=tally.row, model=tally.row.model or (models[0].name if models else None))
        tally.reservation = admission.reservation
        return admission
