"""The routing config file: raw, strict models (unknown keys are start-up errors).

Raw models mirror the file exactly; ``tollway.routing.catalog.build_catalog`` resolves them into
runtime objects (prices looked up, secrets read from the environment, aliases indexed).
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    """Per-token prices (USD per million tokens), a GPU-hour price with measured throughput,
    or a key into litellm's bundled price table."""

    input_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_per_mtok: Decimal | None = Field(default=None, ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)
    gpu_hour_usd: Decimal | None = Field(default=None, ge=0)
    prefill_tokens_per_s: Decimal | None = Field(default=None, gt=0)
    decode_tokens_per_s: Decimal | None = Field(default=None, gt=0)
    litellm: str | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> RawPrice:
        per_token = self.input_per_mtok is not None or self.output_per_mtok is not None
        gpu = self.gpu_hour_usd is not None
        schemes = sum([per_token, gpu, self.litellm is not None])
        if schemes != 1:
            raise ValueError("give exactly one of: input_per_mtok/output_per_mtok, gpu_hour_usd, litellm")
        if gpu and (self.prefill_tokens_per_s is None or self.decode_tokens_per_s is None):
            raise ValueError("gpu_hour_usd needs prefill_tokens_per_s and decode_tokens_per_s")
        return self


class RawModel(_Strict):
    name: str = Field(min_length=1)
    upstream: str
    upstream_model: str | None = None
    kind: Literal["chat", "embedding"] = "chat"
    tier: str = "small"
    price: RawPrice | None = None
    context_window: int | None = Field(default=None, gt=0)
    aliases: list[str] = Field(default_factory=list)


class RawConfig(_Strict):
    upstreams: list[RawUpstream] = Field(default_factory=list)
    models: list[RawModel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> RawConfig:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        for model in self.models:
            if model.upstream not in names:
                raise ValueError(f"model {model.name!r} names unknown upstream {model.upstream!r}")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


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
