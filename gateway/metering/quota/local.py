"""Fail-open counters: while Redis is unreachable, a tenant whose policy says ``open`` is admitted against
a share of the headroom last seen in Redis, counted in this process (never unlimited)."""

from __future__ import annotations

from collections.abc import Sequence

from tollway.gateway.metering.quota.counters import Counter, Demand


class LocalCounters:
    """Fail-open fallback: per-counter usage kept in this process while Redis is unreachable."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.last_seen: dict[str, list[int]] = {}
        self.local: dict[str, list[int]] = {}

    def remember(self, counter: Counter, used: Sequence[int]) -> None:
        self.last_seen[counter.key] = list(used)
        self.local.pop(counter.key, None)

    def admit(self, counters: list[Counter], demand: Demand) -> Counter | None:
        for counter in counters:
            seen = self.last_seen.get(counter.key)
            mine = self.local.get(counter.key, [0, 0, 0])
            for dim, limit in enumerate(counter.limits):
                if limit < 0:
                    continue
                base = seen[dim] if seen is not None else limit // 2  # unknown: assume half used
                allowance = max(0, limit - base) * self.share
                if mine[dim] + demand.amounts(counter)[dim] > allowance:
                    return counter
        for counter in counters:
            mine = self.local.setdefault(counter.key, [0, 0, 0])
            for dim, amount in enumerate(demand.amounts(counter)):
                mine[dim] += amount
        return None
