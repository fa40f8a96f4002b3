"""The gateway: one room per folder.

- ``http``: the ASGI app's face (hot endpoints, middleware, request shapes, errors, one route module per surface)
- ``chat``: the chat path (stages over one exchange, the relay, embeddings)
- ``metering``: ledger, accounting, quota (budgets, rate limits, breakers), reconciliation, reports
- ``tenancy``: keys, roles and tenant policies
- ``parts``: the gateway side of prompts, retrieval, guardrails and evals
- ``quality``: live sampling, drift monitor, shadows
- ``console``: the browser console
- ``observability``: OpenTelemetry and Prometheus
"""

if __name__ != "tollway.gateway":
    raise ImportError("This folder is Tollway's 'tollway.gateway' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'gateway'.")
