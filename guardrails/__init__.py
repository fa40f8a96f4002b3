"""Input and output guards built on guardrails-ai, streaming-aware: deterministic detectors (PII with
checksums, secrets, restricted terms, system-prompt leakage), prompt-injection scoring, JSON checks,
policies in three levels, and the held-back window a stream is released through. Pure: the gateway's
``tollway.gateway.parts.guarding`` plugs them into the chat stages."""

if __name__ != "tollway.guardrails":
    raise ImportError("This folder is Tollway's 'tollway.guardrails' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'guardrails'. A bare 'import guardrails' means guardrails-ai: run from outside the repository root.")

from tollway.guardrails.detectors import DETECTORS, PII, Detector, Finder, Span, detect, redact
from tollway.guardrails.engine import ChoiceGuard, Extra, Outcome, OutputPlan, PassageScreen, check_input
from tollway.guardrails.moderation import Moderation, moderate
from tollway.guardrails.policy import (
    BUILTIN,
    GuardConfig,
    GuardPolicy,
    PolicyError,
    PromptGuards,
    Resolved,
    load_validator,
    parse_config,
    parse_policy,
    parse_prompt_guards,
    resolve,
)
from tollway.guardrails.structure import schema_of, warm

__all__ = [
    "BUILTIN",
    "DETECTORS",
    "PII",
    "ChoiceGuard",
    "Detector",
    "Extra",
    "Finder",
    "GuardConfig",
    "GuardPolicy",
    "Moderation",
    "Outcome",
    "OutputPlan",
    "PassageScreen",
    "PolicyError",
    "PromptGuards",
    "Resolved",
    "Span",
    "check_input",
    "detect",
    "load_validator",
    "moderate",
    "parse_config",
    "parse_policy",
    "parse_prompt_guards",
    "redact",
    "resolve",
    "schema_of",
    "warm",
]
