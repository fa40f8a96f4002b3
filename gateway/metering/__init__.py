"""Cost control: the ledger (one row per request, never lost), one request's accounting, hard budgets and
rate limits in Redis (``quota``), reconciliation against the ledger, budget alerts, economic circuit
breaker events and finance's cost reports."""

# The groups of a cost report (``reports.cost_report``, ``GET /v1/reports/costs?group_by=``), here where the
# CLI's parser reads them without importing the report's code.
GROUPS = ("day", "model", "tier", "key", "user", "tag", "prompt", "route", "role", "endpoint", "tenant")
