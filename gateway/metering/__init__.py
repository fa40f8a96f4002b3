"""Cost control: the ledger (one row per request, never lost), one request's accounting, hard budgets and
rate limits in Redis (``quota``), reconciliation against the ledger, budget alerts, economic circuit
breaker events and finance's cost reports."""
