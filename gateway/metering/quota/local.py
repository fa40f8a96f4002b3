"""Fail-open counters: while Redis is unreachable, a tenant whose policy says ``open`` is admitted against
a share of the headroom last seen in Redis, counted in this process (never unlimited); a cap on requests in
flight, against that share of the cap, held here until each request settles."""

from __future__ import annotations

from collections.abc import Sequence

from tollway.gateway.metering.quota.counters import REQ, Counter, Demand


class LocalCounters:
    """Fail-open fallback: per-counter usage kept in this process while Redis is unreachable."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.last_seen: dict[str, list[int]] = {}
        self.local: dict[str, list[int]] = {}
        self.in_flight: dict[str, int] = {}  # a cap's key -> requests admitted here that have not settled

    def remember(self, counter: Counter, used: Sequence[int]) -> None:
        self.last_seen[counter.key] = list(used)
        self.local.pop(counter.key, None)

    def admit(self, counters: list[Counter], demand: Demand) -> Counter | None:
        for counter in counters:
            if counter.parallel:
                if self.in_flight.get(counter.key, 0) + 1 > max(1, int(counter.limits[REQ] * self.share)):
                    return counter
                continue
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
            if counter.parallel:
                self.in_flight[counter.key] = self.in_flight.get(counter.key, 0) + 1
                continue
            mine = self.local.setdefault(counter.key, [0, 0, 0])
            for dim, amount in enumerate(demand.amounts(counter)):
                mine[dim] += amount
        return None

    def release(self, counters: list[Counter]) -> None:
        """A request admitted here has settled: it no longer counts against a cap on requests in flight."""
        for counter in counters:
            if counter.parallel:
                left = self.in_flight.get(counter.key, 0) - 1
                if left > 0:
                    self.in_flight[counter.key] = left
                else:
                    self.in_flight.pop(counter.key, None)
