"""Guard policies: which validators run on input and on output, and what a failure does.

The same shape at three levels, each overriding the one below per validator and per setting (they do
not merge lists): the config file's ``guardrails:`` defaults < the tenant's policy (admin API, CLI) < the
prompt file's ``guards:``. Term, competitor and topic lists live in the tenant's policy (or the config's
defaults); a prompt chooses validators and actions, not lists::

    input:  {injection: block, pii: redact, tool_injection: block, passage_injection: drop}
    output: {pii: redact, secrets: block, json: block, leak: redact}
    terms: ["Project Falcon"]        # restricted terms, exact and fuzzy
    competitors: ["Globex"]
    topics: {medical: [diagnosis, prescription]}
    max_input_chars: 32000           # the 'length' validator
    max_output_chars: 8000
    injection_threshold: 0.8
    injection_model: false           # the learned detector beside the rules (off: the rules alone)
    fallback_message: "Sorry, I can't help with that."

Actions: ``redact`` (output: replace the span; JSON: repair; length: truncate; input: replace the span
before anything is sent), ``block`` (output: the answer is withheld, ``finish_reason: content_filter``;
input: 400 ``content_policy_violation``, nothing sent, nothing charged), ``fallback`` (the policy's
safe templated answer), ``log`` (record only), ``off`` (a lower level's choice switched off).

Indirect injection, where agent attacks arrive: ``tool_injection`` scores the request's tool results (``tool``
and ``function`` messages) like the user's text (``block`` refuses the request, ``log`` flags it);
``passage_injection`` scores each retrieved passage before it is packed (``drop`` leaves it out and its room
goes to the next passage, ``log`` keeps it and flags it). Both use ``injection_threshold`` and
``injection_model``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tollway.guardrails.detectors import PII

Action = Literal["redact", "block", "fallback", "log", "off", "drop"]
BUILTIN = ("pii", "secrets", "terms", "json", "injection", "length", "leak", "tool_injection", "passage_injection")
NAME = r"^[a-z][a-z0-9_-]{0,39}$"
FALLBACK_MESSAGE = "I'm sorry, but I can't help with that request."

# What each built-in validator can do on each side ('redact' on length truncates, on json repairs).
INPUT_ACTIONS: dict[str, frozenset[str]] = {
    "pii": frozenset({"redact", "block", "fallback", "log", "off"}),
    "secrets": frozenset({"redact", "block", "fallback", "log", "off"}),
    "terms": frozenset({"redact", "block", "fallback", "log", "off"}),
    "injection": frozenset({"block", "fallback", "log", "off"}),
    "length": frozenset({"block", "fallback", "log", "off"}),
    "tool_injection": frozenset({"block", "log", "off"}),
    "passage_injection": frozenset({"drop", "log", "off"}),
}
OUTPUT_ACTIONS: dict[str, frozenset[str]] = {
    "pii": INPUT_ACTIONS["pii"], "secrets": INPUT_ACTIONS["pii"], "terms": INPUT_ACTIONS["pii"],
    "leak": INPUT_ACTIONS["pii"], "json": INPUT_ACTIONS["pii"], "length": INPUT_ACTIONS["pii"],
}


M = TypeVar("M", bound="PromptGuards")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptGuards(_Strict):
    """What a prompt file's ``guards:`` may say."""

    input: dict[str, Action] = Field(default_factory=dict)
    output: dict[str, Action] = Field(default_factory=dict)
    max_input_chars: int | None = Field(default=None, gt=0)
    max_output_chars: int | None = Field(default=None, gt=0)
    injection_threshold: float | None = Field(default=None, gt=0, le=10)
    injection_model: bool | None = None
    fallback_message: str | None = Field(default=None, min_length=1, max_length=2000)
    pii_kinds: list[str] | None = None

    @field_validator("pii_kinds")
    @classmethod
    def _kinds(cls, value: list[str] | None) -> list[str] | None:
        unknown = [k for k in value or [] if k not in PII]
        if unknown:
            raise ValueError(f"unknown PII kind(s) {', '.join(unknown)} (kinds: {', '.join(PII)})")
        return value


class GuardPolicy(PromptGuards):
    """A tenant's policy (and the config's defaults): a prompt's fields plus the lists."""

    terms: list[str] | None = None
    competitors: list[str] | None = None
    topics: dict[str, list[str]] | None = None

    @field_validator("terms", "competitors")
    @classmethod
    def _terms(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not t.strip() or len(t) > 200 for t in value):
            raise ValueError("terms are non-empty, at most 200 characters")
        return value


class HubValidator(_Strict):
    """A guardrails-ai validator the user installed (a Hub validator, or their own), by import path."""

    use: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # 'guardrails.hub:ToxicLanguage'
    args: dict[str, Any] = Field(default_factory=dict)


class GuardConfig(GuardPolicy):
    """The config file's ``guardrails:`` section: the defaults, and the extra validators."""

    validators: dict[str, HubValidator] = Field(default_factory=dict)

    @field_validator("validators")
    @classmethod
    def _names(cls, value: dict[str, HubValidator]) -> dict[str, HubValidator]:
        for name in value:
            if name in BUILTIN or not re.match(NAME, name):
                raise ValueError(f"validator name {name!r} is taken or not a plain lowercase name")
        return value


def _describe(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}.{loc}: {err['msg']}" if loc else f"{where}: {err['msg']}")
    return "; ".join(parts)


def _check_names(policy: PromptGuards, extra: frozenset[str], where: str) -> None:
    for side, allowed in (("input", INPUT_ACTIONS), ("output", OUTPUT_ACTIONS)):
        for name, action in getattr(policy, side).items():
            if name in extra:
                continue
            if name not in allowed:
                known = sorted({*allowed, *extra})
                raise PolicyError(f"{where}.{side}.{name}: no such {side} validator (known: {', '.join(known)})")
            if action not in allowed[name]:
                raise PolicyError(f"{where}.{side}.{name}: '{action}' is not an action of this validator "
                                  f"(actions: {', '.join(sorted(allowed[name]))})")


def _validated(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise PolicyError(_describe(exc, where)) from exc


def parse_policy(data: Any, *, extra: frozenset[str] = frozenset(), where: str = "guards") -> GuardPolicy:
    """A tenant's policy; ``extra``: the names of the configured extra validators."""
    policy = _validated(GuardPolicy, data, where)
    _check_names(policy, extra, where)
    return policy


def parse_prompt_guards(data: Any, *, where: str = "guards") -> PromptGuards:
    """A prompt file's ``guards:``; names beyond the built-in ones are checked when a request uses them."""
    guards = _validated(PromptGuards, data, where)
    _check_names(guards, frozenset(n for side in (guards.input, guards.output) for n in side if n not in BUILTIN),
                 where)
    return guards


def parse_config(data: Any, *, where: str = "guardrails") -> GuardConfig:
    config = _validated(GuardConfig, data, where)
    _check_names(config, frozenset(config.validators), where)
    return config


def load_validator(name: str, spec: HubValidator) -> type:
    """The validator class an import path names; a clear error when it is not installed."""
    module_name, _, attr = spec.use.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"guardrails.validators.{name}: cannot import {spec.use} ({exc})") from exc
    from guardrails.validator_base import Validator

    if not (isinstance(cls, type) and issubclass(cls, Validator)):
        raise PolicyError(f"guardrails.validators.{name}: {spec.use} is not a guardrails-ai Validator")
    return cls


# -- the policy one request runs under ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Resolved:
    """The levels folded into one: the validators that run (never 'off') and every setting."""

    input: dict[str, str] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)
    pii_kinds: tuple[str, ...] = PII
    terms: tuple[str, ...] = ()
    competitors: tuple[str, ...] = ()
    topics: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_input_chars: int | None = None
    max_output_chars: int | None = None
    injection_threshold: float = 0.8
    injection_model: bool = False  # the learned detector's score joins the rules' (the higher counts)
    fallback_message: str = FALLBACK_MESSAGE

    @property
    def empty(self) -> bool:
        return not self.input and not self.output


def resolve(*levels: PromptGuards | None) -> Resolved:
    """Lowest level first (config, tenant, prompt): a higher level's choice of a validator or a setting
    replaces the lower one's."""
    present = [level for level in levels if level is not None]
    sides: dict[str, dict[str, str]] = {"input": {}, "output": {}}
    settings: dict[str, Any] = {}
    for level in present:
        for side, actions in sides.items():
            actions.update(getattr(level, side))
        for name in type(level).model_fields:
            if name not in ("input", "output", "validators") and getattr(level, name) is not None:
                settings[name] = getattr(level, name)
    topics = settings.pop("topics", None) or {}
    return Resolved(
        input={k: v for k, v in sides["input"].items() if v != "off"},
        output={k: v for k, v in sides["output"].items() if v != "off"},
        pii_kinds=tuple(settings.pop("pii_kinds", PII)),
        terms=tuple(settings.pop("terms", ())),
        competitors=tuple(settings.pop("competitors", ())),
        topics=tuple((name, tuple(words)) for name, words in sorted(topics.items())),
        **settings,
    )
