"""Health and saturation of every upstream replica, and picking one of a model's replicas.

Per replica: EWMA latency and time to first token, the outcome of recent calls, a circuit breaker,
the calls this gateway has in flight, and for vLLM servers the queue depth and KV-cache use read from
their Prometheus ``/metrics``. The breaker trips for single-replica groups too: a dead only replica
gets no traffic until its cool-down ends, and then only ``half_open_probes`` trial calls.

    closed --(N consecutive failures, or error rate over the window)--> open
    open --(open_s elapsed)--> half-open: at most `half_open_probes` calls in flight
    half-open --(a probe succeeds)--> closed;  --(a probe fails)--> open again
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from tollway.config import RawBreaker, RawSaturation
from tollway.infra.periodic import Periodic
from tollway.routing.catalog import UpstreamSpec

log = logging.getLogger("tollway.routing.health")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
EWMA_ALPHA = 0.2
AFFINITY_SLACK = 2  # the affine replica keeps a prompt unless it has this many more calls in flight


@dataclass(slots=True)
class Ticket:
    """One call's claim on a replica; hand it back to ``ReplicaHealth.finish`` exactly once."""

    replica: ReplicaHealth
    probe: bool
    started: float


@dataclass
class ReplicaHealth:
    name: str
    breaker: RawBreaker
    saturation: RawSaturation
    clock: Callable[[], float] = time.monotonic
    state: str = CLOSED
    opened_at: float = 0.0
    probes_in_flight: int = 0
    consecutive_failures: int = 0
    outcomes: deque[bool] = field(default_factory=deque)
    outstanding: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    # from vLLM /metrics
    waiting: float | None = None
    running: float | None = None
    kv_cache: float | None = None
    metrics_at: float = 0.0
    # lifetime counters, for /metrics and tests
    calls: int = 0
    failures: int = 0
    refused_open: int = 0
    probes: int = 0
    trips: int = 0
    calls_at_first_trip: int | None = None
    adopted: int = 0  # trips learned from another gateway process (``adopt``)
    on_trip: Callable[[str], None] | None = None  # told of each trip of this process's own (shared breakers)

    def _cooled_down(self) -> bool:
        return self.state == OPEN and self.clock() - self.opened_at >= self.breaker.open_s

    def available(self) -> bool:
        """Could a call go here now (without claiming it)?"""
        if self.state == OPEN and not self._cooled_down():
            return False
        if self.state == HALF_OPEN or self._cooled_down():
            return self.probes_in_flight < self.breaker.half_open_probes
        return True

    def saturated(self) -> bool:
        limit = self.saturation.max_outstanding
        if limit is not None and self.outstanding >= limit:
            return True
        if self.clock() - self.metrics_at > self.saturation.stale_after_s:
            return False  # no fresh reading: say nothing
        return ((self.waiting is not None and self.waiting >= self.saturation.max_waiting and
                 self.saturation.max_waiting > 0)
                or (self.kv_cache is not None and self.kv_cache >= self.saturation.max_kv_cache))

    def start(self) -> Ticket | None:
        """Claim a call, or None when the breaker says no (an open breaker, or its probes all taken)."""
        if self._cooled_down():
            self.state, self.probes_in_flight = HALF_OPEN, 0
        if self.state == OPEN:
            self.refused_open += 1
            return None
        probe = self.state == HALF_OPEN
        if probe:
            if self.probes_in_flight >= self.breaker.half_open_probes:
                self.refused_open += 1
                return None
            self.probes_in_flight += 1
            self.probes += 1
        self.outstanding += 1
        self.calls += 1
        return Ticket(self, probe, self.clock())

    def finish(self, ticket: Ticket, ok: bool, *, ttft_s: float | None = None, count: bool = True) -> None:
        """``count=False``: the call ended for a reason that says nothing about this replica's health
        (the client went away, the request was refused as invalid)."""
        self.outstanding -= 1
        if ticket.probe:
            self.probes_in_flight -= 1
        if not count:
            return
        elapsed_ms = (self.clock() - ticket.started) * 1000
        if ok:
            self.latency_ms = _ewma(self.latency_ms, elapsed_ms)
            if ttft_s is not None:
                self.ttft_ms = _ewma(self.ttft_ms, ttft_s * 1000)
        self.outcomes.append(ok)
        while len(self.outcomes) > self.breaker.window:
            self.outcomes.popleft()
        if ok:
            self.consecutive_failures = 0
            if self.state == HALF_OPEN:
                self.state = CLOSED
                self.outcomes.clear()
            return
        self.failures += 1
        self.consecutive_failures += 1
        if self.state == HALF_OPEN or self._should_trip():
            self._trip()

    def _should_trip(self) -> bool:
        if self.state != CLOSED:
            return False
        if self.consecutive_failures >= self.breaker.consecutive_failures:
            return True
        window = self.outcomes
        return len(window) >= self.breaker.window and window.count(False) / len(window) >= self.breaker.error_rate

    def _trip(self) -> None:
        opening = self.state != OPEN
        if opening:
            log.warning("upstream %s: circuit breaker open for %.1fs", self.name, self.breaker.open_s)
        self.trips += 1
        if self.calls_at_first_trip is None:
            self.calls_at_first_trip = self.calls
        self._open()
        if opening and self.on_trip is not None:
            self.on_trip(self.name)

    def adopt(self) -> bool:
        """Another gateway process found this upstream failing: open the breaker here too, for the same
        cool-down, without a call of our own (then half-open and probe as usual). False: already open."""
        if self.state == OPEN and not self._cooled_down():
            return False
        log.warning("upstream %s: circuit breaker open for %.1fs (tripped by another gateway)", self.name,
                    self.breaker.open_s)
        self.adopted += 1
        self._open()
        self.consecutive_failures = 0
        return True

    def _open(self) -> None:
        """Open now, for ``open_s``, with a fresh window of outcomes."""
        self.state, self.opened_at = OPEN, self.clock()
        self.outcomes.clear()

    def describe(self) -> dict[str, object]:
        return {"state": self.state, "outstanding": self.outstanding, "latency_ms": self.latency_ms,
                "ttft_ms": self.ttft_ms, "waiting": self.waiting, "running": self.running,
                "kv_cache": self.kv_cache, "calls": self.calls, "failures": self.failures,
                "refused_open": self.refused_open, "probes": self.probes, "trips": self.trips,
                "calls_at_first_trip": self.calls_at_first_trip, "adopted": self.adopted,
                "saturated": self.saturated()}


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else previous + EWMA_ALPHA * (value - previous)


class Health:
    """Every replica's health, by upstream name. One per process, built in the app's lifespan."""

    def __init__(self, names: Iterable[str], breaker: RawBreaker, saturation: RawSaturation,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.replicas = {n: ReplicaHealth(n, breaker, saturation, clock) for n in names}
        self.rng = rng or random.Random()

    def __getitem__(self, name: str) -> ReplicaHealth:
        return self.replicas[name]

    def usable(self, names: Iterable[str]) -> list[ReplicaHealth]:
        return [r for r in (self.replicas[n] for n in names) if r.available() and not r.saturated()]

    def state_of(self, names: Iterable[str]) -> str:
        """A model's health as the route policy sees it: 'ok', 'saturated' or 'down'."""
        replicas = [self.replicas[n] for n in names]
        up = [r for r in replicas if r.available()]
        if not up:
            return "down"
        return "ok" if any(not r.saturated() for r in up) else "saturated"

    def pick(self, names: Iterable[str], *, balance: str = "p2c", affinity: str | None = None,
             exclude: frozenset[str] = frozenset()) -> ReplicaHealth | None:
        """One replica of a model: least outstanding calls (ties by latency), or the better of two at
        random (p2c); with an affinity key, the same key goes to the same replica while it is fit."""
        candidates = [r for r in self.usable(names) if r.name not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if affinity is not None:
            preferred = max(candidates, key=lambda r: _rendezvous(affinity, r.name))
            if preferred.outstanding <= min(r.outstanding for r in candidates) + AFFINITY_SLACK:
                return preferred
        if balance == "p2c":
            candidates = self.rng.sample(candidates, 2)
        return min(candidates, key=lambda r: (r.outstanding, r.latency_ms or 0.0, self.rng.random()))


def _rendezvous(key: str, name: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest()


# -- vLLM saturation ------------------------------------------------------------------------------
_GAUGES = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
           "vllm:gpu_cache_usage_perc": "kv_cache", "vllm:kv_cache_usage_perc": "kv_cache"}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The gauges the router needs from a Prometheus text exposition: queue sums, the fullest KV cache."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        field_name = _GAUGES.get(name.strip())
        if field_name is None:
            continue
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if field_name == "kv_cache":
            out[field_name] = max(out.get(field_name, 0.0), value)
        else:
            out[field_name] = out.get(field_name, 0.0) + value
    return out


def metrics_url(spec: UpstreamSpec) -> str:
    assert spec.base_url is not None
    return spec.base_url.removesuffix("/v1") + "/metrics"


class SaturationPoller:
    """Reads every vLLM upstream's ``/metrics`` each ``poll_interval_s``; stopped by ``stop()``."""

    def __init__(self, health: Health, specs: Iterable[UpstreamSpec], session: aiohttp.ClientSession,
                 interval_s: float) -> None:
        self.health = health
        self.targets = [(s.name, metrics_url(s)) for s in specs if s.vllm_metrics and s.base_url]
        self.session = session
        self.interval_s = interval_s
        self._job = Periodic("saturation-poller", interval_s, self.poll_once, stop_s=5)

    def start(self) -> None:
        if self.targets:
            self._job.start()

    async def stop(self) -> None:
        await self._job.stop()

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(name, url) for name, url in self.targets))

    async def _poll(self, name: str, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.interval_s))
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return  # unreadable metrics say nothing; the breaker judges the calls themselves
        gauges = parse_vllm_metrics(text)
        replica = self.health[name]
        replica.waiting = gauges.get("waiting")
        replica.running = gauges.get("running")
        replica.kv_cache = gauges.get("kv_cache")
        replica.metrics_at = replica.clock()
