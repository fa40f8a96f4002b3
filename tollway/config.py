"""The routing config file: raw, strict models (unknown keys are start-up errors).

Raw models mirror the file exactly; ``tollway.routing.catalog.build_catalog`` resolves them into
runtime objects (prices looked up, secrets read from the environment, aliases indexed).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tollway.errors import InvalidRequest

_SECRET_REF = re.compile(r"^env::[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(Exception):
    """The config file is unreadable or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RawUpstream(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["openai", "litellm"] = "openai"
    base_url: str | None = None
    # A reference to a secret, never the secret: ``env::VLLM_API_KEY``.
    api_key: str | None = None
    # Add every model the upstream lists at /v1/models (priced at zero unless a model entry says more).
    discover_models: bool = False
    timeout_s: float | None = Field(default=None, gt=0)
    connect_timeout_s: float | None = Field(default=None, gt=0)
    # A vLLM server: poll its Prometheus /metrics for queue depth and KV-cache use (saturation).
    vllm_metrics: bool = False

    @field_validator("api_key")
    @classmethod
    def _secret_is_a_reference(cls, value: str | None) -> str | None:
        if value is not None and not _SECRET_REF.match(value):
            raise ValueError("secrets are referenced by environment variable name, e.g. 'env::VLLM_API_KEY'")
        return value

    @model_validator(mode="after")
    def _openai_needs_url(self) -> RawUpstream:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an 'openai' upstream needs base_url")
        return self


class RawPrice(_Strict):
    """Per-token prices (USD per million tokens); the price of an hour of the machine that serves the model
    (a GPU's, or a CPU's for a model on the gateway's own host) with its measured throughput, which
    attributes machine time to each request; or a key into litellm's bundled price table."""

    input_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_per_mtok: Decimal | None = Field(default=None, ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)
    gpu_hour_usd: Decimal | None = Field(default=None, ge=0)
    cpu_hour_usd: Decimal | None = Field(default=None, ge=0)
    prefill_tokens_per_s: Decimal | None = Field(default=None, gt=0)
    decode_tokens_per_s: Decimal | None = Field(default=None, gt=0)
    litellm: str | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> RawPrice:
        per_token = self.input_per_mtok is not None or self.output_per_mtok is not None
        hourly = [name for name in ("gpu_hour_usd", "cpu_hour_usd") if getattr(self, name) is not None]
        schemes = sum([per_token, len(hourly), self.litellm is not None])
        if schemes != 1:
            raise ValueError("give exactly one of: input_per_mtok/output_per_mtok, gpu_hour_usd, cpu_hour_usd, "
                             "litellm")
        if hourly and (self.prefill_tokens_per_s is None or self.decode_tokens_per_s is None):
            raise ValueError(f"{hourly[0]} needs prefill_tokens_per_s and decode_tokens_per_s")
        return self


Capability = Literal["tools", "json_mode", "vision"]


class RawModel(_Strict):
    name: str = Field(min_length=1)
    # One upstream, or several replicas of the same model (load-balanced, each with its own health).
    upstream: str | None = None
    upstreams: list[str] = Field(default_factory=list)
    upstream_model: str | None = None
    kind: Literal["chat", "embedding", "rerank"] = "chat"  # rerank: an upstream /v1/rerank (retrieval)
    tier: str | None = None  # default: the lowest tier
    price: RawPrice | None = None
    context_window: int | None = Field(default=None, gt=0)
    # None: not declared (nothing is filtered); a list: what the model can do.
    capabilities: list[Capability] | None = None
    aliases: list[str] = Field(default_factory=list)
    # Models to try, in order, when this one fails; default: the cheapest model of each lower tier.
    fallbacks: list[str] | None = None
    # Request body fields this model's upstream accepts beyond OpenAI's and the documented decoding extras
    # (``tollway.routing.wire``); clients may send them for this model. Never transport settings.
    forward_fields: list[str] = Field(default_factory=list)

    @field_validator("forward_fields")
    @classmethod
    def _body_fields_only(cls, value: list[str]) -> list[str]:
        from tollway.routing import forbidden_config_fields

        bad = forbidden_config_fields(value)
        if bad:
            raise ValueError(f"{bad[0]!r} is a transport or credential setting, not a body field; set it on the "
                             "upstream")
        return value

    @model_validator(mode="after")
    def _one_placement(self) -> RawModel:
        if (self.upstream is None) == (not self.upstreams):
            raise ValueError("give 'upstream' or 'upstreams' (replicas), not both and not neither")
        return self

    @property
    def replicas(self) -> list[str]:
        return [self.upstream] if self.upstream is not None else list(self.upstreams)


class RawTier(_Strict):
    name: str = Field(min_length=1)
    # A whole non-streamed answer from one attempt: longer than the longest generation expected there,
    # since an answer cut by its deadline is paid for and then asked again of the next tier.
    deadline_s: float = Field(default=120.0, gt=0)
    ttft_deadline_s: float = Field(default=10.0, gt=0)  # first content token of a stream, first byte otherwise


class RawBreaker(_Strict):
    consecutive_failures: int = Field(default=5, ge=1)
    error_rate: float = Field(default=0.5, gt=0, le=1)  # over the last `window` calls
    window: int = Field(default=20, ge=2)
    open_s: float = Field(default=10.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)


class RawSaturation(_Strict):
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_waiting: int = Field(default=8, ge=0)  # vllm:num_requests_waiting at or above: saturated
    max_kv_cache: float = Field(default=0.95, gt=0, le=1)  # vllm:gpu_cache_usage_perc at or above
    max_outstanding: int | None = Field(default=None, ge=1)  # this gateway's in-flight calls per replica
    stale_after_s: float = Field(default=5.0, gt=0)  # older readings are ignored


class RawCache(_Strict):
    enabled: bool = True
    ttl_s: int = Field(default=3600, gt=0)
    max_entry_bytes: int = Field(default=1 << 20, gt=0)


class RawRollout(_Strict):
    model: str
    candidate: str
    canary_percent: float = Field(default=0.0, ge=0, le=100)  # by consistent hash of the end user
    shadow_percent: float = Field(default=0.0, ge=0, le=100)  # sampled copies, recorded, not returned


def _default_tiers() -> list[RawTier]:
    return [RawTier(name="large", deadline_s=120, ttft_deadline_s=10), RawTier(name="small", deadline_s=60,
                                                                               ttft_deadline_s=5)]


class RawRouting(_Strict):
    auto_aliases: list[str] = Field(default_factory=lambda: ["auto"])
    tiers: list[RawTier] = Field(default_factory=_default_tiers, min_length=1)  # the top tier first
    # Below this share of a budget left, or above the spend-velocity soft line, 'auto' steps a tier down.
    budget_step_down_headroom: float = Field(default=0.1, ge=0, le=1)
    balance: Literal["p2c", "least_outstanding"] = "p2c"
    prefix_affinity: bool = False  # the same system prompt to the same replica (vLLM prefix caching)
    max_attempts: int = Field(default=3, ge=1)
    # Retries allowed on top of first attempts: ratio of recent requests plus a floor per second.
    retry_budget_ratio: float = Field(default=0.2, ge=0)
    retry_budget_min_per_s: float = Field(default=5.0, ge=0)
    degraded_message: str = ("This is a degraded answer: the service could not reach a language model just now. "
                             "Please try again in a little while.")
    breaker: RawBreaker = Field(default_factory=RawBreaker)
    saturation: RawSaturation = Field(default_factory=RawSaturation)
    cache: RawCache = Field(default_factory=RawCache)
    rollouts: list[RawRollout] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_tiers(self) -> RawRouting:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        return self


class RawConfig(_Strict):
    upstreams: list[RawUpstream] = Field(default_factory=list)
    models: list[RawModel] = Field(default_factory=list)
    routing: RawRouting = Field(default_factory=RawRouting)
    # Guard policy defaults and extra validators: parsed (as strictly) by ``tollway.guardrails.policy``.
    guardrails: dict[str, Any] | None = None
    # Eval runs and the production gate's thresholds: parsed by ``tollway.gateway.parts.evaluating``.
    evals: dict[str, Any] | None = None
    # The live quality loop (sampling, drift detection, automatic rollback): ``tollway.gateway.quality.sampling``.
    quality: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> RawConfig:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        tiers = {t.name for t in self.routing.tiers}
        models = {m.name for m in self.models}
        for model in self.models:
            for upstream in model.replicas:
                if upstream not in names:
                    raise ValueError(f"model {model.name!r} names unknown upstream {upstream!r}")
            if model.tier is not None and model.tier not in tiers:
                raise ValueError(f"model {model.name!r} names unknown tier {model.tier!r} "
                                 f"(routing.tiers: {', '.join(sorted(tiers))})")
            for fallback in model.fallbacks or []:
                if fallback not in models:
                    raise ValueError(f"model {model.name!r} falls back to unknown model {fallback!r}")
        for rollout in self.routing.rollouts:
            for name in (rollout.model, rollout.candidate):
                if name not in models:
                    raise ValueError(f"rollout names unknown model {name!r}")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


M = TypeVar("M", bound=BaseModel)


def parse_section(model: type[M], data: Any, name: str) -> M:
    """A section the config keeps as a plain mapping (``evals:``, ``quality:``), parsed by the part that owns
    it; the first problem is named by its path in the file."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(f"{name}.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc


def parse_config(data: object, source: str = "<config>") -> RawConfig:
    if data is None:
        data = {}
    try:
        return RawConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def load_config(path: Path | None) -> RawConfig:
    if path is None:
        return RawConfig()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(data, str(path))


def parse_steps(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """"5,20,50,100" -> (5.0, 20.0, 50.0, 100.0): increasing canary percentages in (0, 100]."""
    if text is None or text == "":
        return ()
    try:
        steps = tuple(float(s) for s in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise InvalidRequest(f"steps are canary percentages such as 5,20,50,100 (got {text!r})",
                             param="steps") from None
    if any(not 0 < s <= 100 for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidRequest("steps must increase, each above 0 and at most 100", param="steps")
    return steps
