"""The HTTP face of Tollway: OpenAI-compatible API, auth, ledger, telemetry."""

if __name__ != "tollway.gateway":
    raise ImportError("This folder is Tollway's 'tollway.gateway' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'gateway'.")
