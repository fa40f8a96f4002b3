"""Input and output guards built on guardrails-ai, streaming-aware. So far: the deterministic detectors
(PII with checksums, secrets) and their guardrails-ai validators with guardrails-ai's telemetry off;
policies, the input stage, the streaming window and the records come with the guardrails issue."""

if __name__ != "tollway.guardrails":
    raise ImportError("This folder is Tollway's 'tollway.guardrails' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'guardrails'. A bare 'import guardrails' means guardrails-ai: run from outside the repository root.")

from tollway.guardrails.detectors import DETECTORS, PII, Detector, Span, detect, longest, redact

__all__ = ["DETECTORS", "PII", "Detector", "Span", "detect", "longest", "redact"]
