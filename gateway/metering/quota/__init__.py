"""Hard budgets, rate limits and economic circuit breakers, enforced in Redis.

Admission is one Lua script, atomic over every counter that applies to the request (tenant, key, end
user and session budgets in each window, tenant and key rate limits), plus the retry-storm and
spend-velocity checks: either the worst case fits in all of them and is reserved in all of them, or
nothing is reserved and the request is refused before anything is sent upstream.

A reservation is a lease: it carries an expiry, renewed while the request runs. Leases are kept per
tenant (a sorted set by expiry, a hash of what each one reserved where, the request's ledger fields).
Settlement replaces the lease by what the upstream actually used; it runs after the answer has been
sent. A lease that runs out (its gateway was killed mid-request) is counted at its reservation, and the
lease sweeper (``tollway.gateway.metering.sweeper``) writes its ledger row, marked unsettled; a settled
request stays in Redis until its ledger row is on disk, so the rows a killed gateway still held in memory
are written by the sweeper too.

Amounts are integers: USD in nano-dollars (rounded up), tokens, requests. Keys share a hash tag per
tenant (``{t:ID}``, ``tollway.keyspace``), so one script touches one Redis Cluster slot.

One module per idea: ``scripts`` (the Lua), ``windows`` (window arithmetic), ``counters`` (which counters
apply, amounts), ``service`` (admission, leases, settlement), ``local`` (fail-open counters),
``headers`` (rate-limit headers and the headroom signal).

When Redis fails, the tenant's policy decides: ``closed`` (default) refuses with 503 and spends
nothing; ``open`` admits against conservative local counters (a share of the headroom last seen in
Redis); the reconciliation job later raises the Redis counters to what the ledger recorded.
"""

from tollway.gateway.metering.quota.counters import (
    NANO,
    NO_LIMIT,
    Counter,
    Demand,
    budget_counter,
    clear_counters,
    counters_for,
    from_nano,
    to_nano,
)
from tollway.gateway.metering.quota.scripts import SWEEP, SWEPT
from tollway.gateway.metering.quota.service import Admission, QuotaService, Reservation, fingerprint, new_rid
from tollway.gateway.metering.quota.windows import Window, window

__all__ = ["NANO", "NO_LIMIT", "SWEEP", "SWEPT", "Admission", "Counter", "Demand", "QuotaService", "Reservation",
           "Window",
           "budget_counter", "clear_counters", "counters_for", "fingerprint", "from_nano", "new_rid", "to_nano",
           "window"]
