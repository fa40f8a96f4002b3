"""Input and output guards built on guardrails-ai, streaming-aware. Not built yet."""

if __name__ != "tollway.guardrails":
    raise ImportError("This folder is Tollway's 'tollway.guardrails' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'guardrails'. A bare 'import guardrails' means guardrails-ai: run from outside the repository root.")
