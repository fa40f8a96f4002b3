"""Input and output guards built on guardrails-ai, streaming-aware: deterministic detectors (PII with
checksums, secrets, restricted terms, system-prompt leakage), prompt-injection scoring, JSON checks,
policies in three levels, and the held-back window a stream is released through. Pure: the gateway's
``tollway.gateway.guarding`` plugs them into the chat stages."""

if __name__ != "tollway.guardrails":
    raise ImportError("This folder is Tollway's 'tollway.guardrails' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'guardrails'. A bare 'import guardrails' means guardrails-ai: run from outside the repository root.")

from tollway.guardrails.detectors import DETECTORS, PII, Detector, Finder, Span, detect, redact

__all__ = ["DETECTORS", "PII", "Detector", "Finder", "Span", "detect", "redact"]
