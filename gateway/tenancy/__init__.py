"""Who is calling and what they may do: tenants and API keys (``keys``: the keyed hash, the principal,
roles), and each tenant's policy (``policy``: budgets, failure mode, limits, routing, guards, content)."""
