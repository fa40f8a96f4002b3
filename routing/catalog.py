"""The model catalog: which public model names exist, where they are served, and what they cost.

Built once at start-up from the raw config plus models discovered from upstreams' ``/v1/models``.
Prices are ``Decimal`` end to end so finance's totals add up to the cent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path

from tollway.config import (
    ConfigError,
    RawConfig,
    RawPrice,
    RawRollout,
    RawRouting,
    RawTier,
    RawUpstream,
)
from tollway.jsontypes import JSON

_MTOK = Decimal(1_000_000)
_HOUR = Decimal(3600)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token, or USD per machine-second (a GPU's or a CPU's) with the throughput that attributes
    machine time to a request."""

    input_per_token: Decimal = ZERO
    output_per_token: Decimal = ZERO
    cached_input_per_token: Decimal | None = None
    machine_second_usd: Decimal | None = None
    prefill_tokens_per_s: Decimal | None = None
    decode_tokens_per_s: Decimal | None = None
    source: str = "unpriced"

    def cost(self, usage: Usage) -> Decimal:
        if self.machine_second_usd is not None:
            assert self.prefill_tokens_per_s is not None and self.decode_tokens_per_s is not None
            seconds = (
                Decimal(usage.input_tokens) / self.prefill_tokens_per_s
                + Decimal(usage.output_tokens) / self.decode_tokens_per_s
            )
            return seconds * self.machine_second_usd
        cached = min(usage.cached_tokens, usage.input_tokens)
        cached_rate = self.input_per_token if self.cached_input_per_token is None else self.cached_input_per_token
        return (
            Decimal(usage.input_tokens - cached) * self.input_per_token
            + Decimal(cached) * cached_rate
            + Decimal(usage.output_tokens) * self.output_per_token
        )


FREE = Price(source="unpriced")


@cache
def litellm_price_table() -> Mapping[str, Mapping[str, object]]:
    """litellm's bundled price table, read from the wheel without importing litellm (slow, and it
    reaches for the network unless told not to)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        raise ConfigError("litellm is not installed; its price table is unavailable")
    path = Path(spec.origin).parent / "model_prices_and_context_window_backup.json"
    table: dict[str, Mapping[str, object]] = json.loads(path.read_text())
    table.pop("sample_spec", None)
    return table


def _dec(value: object) -> Decimal | None:
    if value is None:
        return None
    return Decimal(str(value))


def litellm_price(key: str) -> Price:
    entry = litellm_price_table().get(key)
    if entry is None:
        raise ConfigError(f"model {key!r} is not in litellm's bundled price table")
    return Price(
        input_per_token=_dec(entry.get("input_cost_per_token")) or ZERO,
        output_per_token=_dec(entry.get("output_cost_per_token")) or ZERO,
        cached_input_per_token=_dec(entry.get("cache_read_input_token_cost")),
        source=f"litellm:{key}",
    )


def resolve_price(raw: RawPrice | None) -> Price:
    if raw is None:
        return FREE
    if raw.litellm is not None:
        return litellm_price(raw.litellm)
    hourly = raw.gpu_hour_usd if raw.gpu_hour_usd is not None else raw.cpu_hour_usd
    if hourly is not None:
        return Price(
            machine_second_usd=hourly / _HOUR,
            prefill_tokens_per_s=raw.prefill_tokens_per_s,
            decode_tokens_per_s=raw.decode_tokens_per_s,
            source="gpu_hour" if raw.gpu_hour_usd is not None else "cpu_hour",
        )
    return Price(
        input_per_token=(raw.input_per_mtok or ZERO) / _MTOK,
        output_per_token=(raw.output_per_mtok or ZERO) / _MTOK,
        cached_input_per_token=None if raw.cached_input_per_mtok is None else raw.cached_input_per_mtok / _MTOK,
        source="config",
    )


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    kind: str  # "openai" (fast path) or "litellm" (translation)
    base_url: str | None
    api_key: str | None = field(repr=False)
    timeout_s: float
    connect_timeout_s: float
    discover_models: bool
    vllm_metrics: bool = False


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    upstream: str  # the first replica; the one a single-upstream model has
    upstream_model: str
    kind: str
    tier: str
    price: Price
    context_window: int | None = None
    replicas: tuple[str, ...] = ()
    capabilities: frozenset[str] | None = None  # None: not declared
    fallbacks: tuple[str, ...] | None = None  # None: the cheapest model of each lower tier
    forward_fields: frozenset[str] = frozenset()  # body fields its upstream takes beyond the allow-list

    def __post_init__(self) -> None:
        if not self.replicas:
            object.__setattr__(self, "replicas", (self.upstream,))

    def can(self, needs: frozenset[str]) -> bool:
        return self.capabilities is None or needs <= self.capabilities

    def unit_cost(self) -> Decimal:
        """A comparable price: 1,000 input and 500 output tokens."""
        return self.price.cost(Usage(input_tokens=1000, output_tokens=500))


class Catalog:
    """Public model names (and aliases) to entries, tiers top first, routing settings. Built once; two
    things change at run time, each in one assignment so a request sees the old state or the new one:
    rollouts (``set_rollouts``) and prices set over the API or CLI (``set_prices``)."""

    def __init__(self, upstreams: Iterable[UpstreamSpec], models: Iterable[ModelEntry],
                 aliases: Mapping[str, str] | None = None, routing: RawRouting | None = None) -> None:
        self.upstreams = {u.name: u for u in upstreams}
        self.models = {m.name: m for m in models}
        self._aliases = dict(aliases or {})
        self.routing = routing or RawRouting()
        self.tiers: tuple[RawTier, ...] = tuple(self.routing.tiers)
        self._rank = {t.name: i for i, t in enumerate(self.tiers)}
        self.auto_aliases = frozenset(self.routing.auto_aliases)
        self.has_context_windows = any(m.context_window is not None for m in self.models.values())
        # Body fields some model's config forwards: a client may send them (each attempt keeps its model's).
        self.forward_fields: frozenset[str] = frozenset().union(*(m.forward_fields for m in self.models.values()))
        self.rollouts: tuple[RawRollout, ...] = ()
        self.has_canaries = False
        self.set_rollouts(self.routing.rollouts)
        self.configured_prices = {name: m.price for name, m in self.models.items()}  # the config's (or none)
        self.default_prices: dict[str, Price] = {}  # for models without one (the local model's)
        # a model's own prompt count (its tokenizer and chat template), where the gateway has one: what a
        # stream is charged when the upstream sends no usage (else tiktoken over the messages)
        self.prompt_counters: dict[str, Callable[[Sequence[JSON]], int]] = {}
        self._tiered: dict[tuple[int, str], list[ModelEntry]] = {}
        self.baseline: Price | None = None
        self._index()
        for alias in self.auto_aliases:
            if alias in self.models or alias in self._aliases:
                raise ConfigError(f"the routing alias {alias!r} collides with a model or alias")
        for alias, target in self._aliases.items():
            if target not in self.models:
                raise ConfigError(f"alias {alias!r} points at unknown model {target!r}")
            if alias in self.models:
                raise ConfigError(f"alias {alias!r} collides with a model name")

    def set_rollouts(self, rollouts: Iterable[RawRollout]) -> None:
        """Model canaries and shadows, changeable at run time (``tollway.routing.rollouts``): one assignment,
        so a request sees either the old set or the new one. Rollouts naming a model this catalog lacks
        are left out."""
        known = tuple(r for r in rollouts if r.model in self.models and r.candidate in self.models)
        self.rollouts, self.has_canaries = known, any(r.canary_percent > 0 for r in known)

    def _index(self) -> None:
        tiered: dict[tuple[int, str], list[ModelEntry]] = {}
        for m in sorted(self.models.values(), key=lambda m: (m.unit_cost(), m.name)):
            tiered.setdefault((self.rank(m.tier), m.kind), []).append(m)
        self._tiered = tiered
        top = tiered.get((0, "chat"), [])
        # what an answer would have cost on the top tier (its cheapest chat model): routing savings
        self.baseline = top[0].price if top else None

    def set_prices(self, prices: Mapping[str, Price]) -> None:
        """Prices set at run time (``tollway.routing.prices``) over the config's; a model not named goes
        back to its configured price. Names this catalog lacks are ignored."""
        models = {name: m if m.price == (want := prices.get(name, self.configured_prices[name]))
                  else dataclasses.replace(m, price=want) for name, m in self.models.items()}
        self.models = models
        self._index()

    def get(self, name: str) -> ModelEntry | None:
        entry = self.models.get(name)
        if entry is None:
            target = self._aliases.get(name)
            entry = None if target is None else self.models[target]
        return entry

    def names(self) -> list[str]:
        return sorted(self.models)

    def unpriced(self) -> list[str]:
        """The models nobody priced (they cost $0 here: a USD limit cannot see their answers)."""
        return sorted(name for name, m in self.models.items() if m.price.source == FREE.source)

    def rank(self, tier: str) -> int:
        """0 for the top tier; larger is cheaper."""
        return self._rank.get(tier, len(self.tiers) - 1)

    def tier(self, name: str) -> RawTier:
        return self.tiers[self.rank(name)]

    def in_tier(self, rank: int, kind: str = "chat") -> list[ModelEntry]:
        """The models of one tier, cheapest first."""
        return self._tiered.get((rank, kind), [])


def _read_secret(ref: str | None) -> str | None:
    if ref is None:
        return None
    var = ref.removeprefix("env::")
    value = os.environ.get(var)
    if value is None:
        raise ConfigError(f"secret {ref!r}: environment variable {var} is not set")
    return value


def resolve_upstream(raw: RawUpstream, *, timeout_s: float, connect_timeout_s: float) -> UpstreamSpec:
    base_url = raw.base_url.rstrip("/") if raw.base_url else None
    if base_url is not None and not base_url.endswith("/v1"):
        base_url += "/v1"
    return UpstreamSpec(
        name=raw.name,
        kind=raw.kind,
        base_url=base_url,
        api_key=_read_secret(raw.api_key),
        timeout_s=raw.timeout_s or timeout_s,
        connect_timeout_s=raw.connect_timeout_s or connect_timeout_s,
        discover_models=raw.discover_models,
        vllm_metrics=raw.vllm_metrics,
    )


# What a discovered model is, read from its id (an OpenAI-style /v1/models says nothing of it; vLLM serves one
# task per server): rerankers and cross-encoders first (a bge-reranker is also a bge), then the embedding
# families a vLLM or TEI server is commonly started with, else chat. A name that says nothing is a chat model;
# a config file's `kind` says otherwise.
_RERANKER = re.compile(r"rerank|cross-encoder|ms-marco")
_EMBEDDER = re.compile(r"embed|sentence-transformers/|sentence-t5|(?:^|[/_.-])(?:bge|gte|e5|minilm|mpnet|instructor"
                       r"|stella|uae|msmarco|multi-qa|paraphrase)(?:[-_.]|$)")


def discovered_kind(model_id: str) -> str:
    lower = model_id.lower()
    return "rerank" if _RERANKER.search(lower) else "embedding" if _EMBEDDER.search(lower) else "chat"


def build_catalog(raw: RawConfig, discovered: Mapping[str, list[str]], specs: Iterable[UpstreamSpec]) -> Catalog:
    """Configured models first; discovered models fill in names the config did not claim."""
    entries: list[ModelEntry] = []
    aliases: dict[str, str] = {}
    lowest = raw.routing.tiers[-1].name
    for model in raw.models:
        if any(e.name == model.name for e in entries):
            raise ConfigError(f"model {model.name!r} is configured twice")
        entries.append(ModelEntry(
            name=model.name,
            upstream=model.replicas[0],
            upstream_model=model.upstream_model or model.name,
            kind=model.kind,
            tier=model.tier or lowest,
            price=resolve_price(model.price),
            context_window=model.context_window,
            replicas=tuple(model.replicas),
            capabilities=None if model.capabilities is None else frozenset(model.capabilities),
            fallbacks=None if model.fallbacks is None else tuple(model.fallbacks),
            forward_fields=frozenset(model.forward_fields),
        ))
        for alias in model.aliases:
            if alias in aliases:
                raise ConfigError(f"alias {alias!r} is used twice")
            aliases[alias] = model.name
    claimed = {e.name for e in entries}
    served = {(r, e.upstream_model) for e in entries for r in e.replicas}
    # A model id discovered on several upstreams (two vLLM replicas of one model, the common quick start)
    # is one model with those upstreams as replicas: balanced, each with its own breaker.
    found: dict[str, list[str]] = {}
    for upstream, model_ids in discovered.items():
        for model_id in model_ids:
            if model_id not in claimed and (upstream, model_id) not in served:
                found.setdefault(model_id, []).append(upstream)
    for model_id, replicas in found.items():
        entries.append(ModelEntry(name=model_id, upstream=replicas[0], upstream_model=model_id,
                                  kind=discovered_kind(model_id),
                                  tier=lowest, price=FREE, replicas=tuple(replicas)))
    return Catalog(specs, entries, aliases, raw.routing)
