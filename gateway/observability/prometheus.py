"""Prometheus metrics through ``prometheus_client``, the reference exporter: ``/metrics`` on the main port
(admin key) and, with ``TOLLWAY_METRICS_PORT``, without auth on a port of its own for an in-cluster scraper.

With ``--workers N`` the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before the workers
start: every worker writes its values there and any scrape (of any worker, or of the parent's metrics
port) sums them, so one scrape covers every worker. Gauges say how workers combine: calls in flight and
queue depths add up, breaker states take the worst, budget use the most recent.

Cardinality is bounded by design: labels are tenants, catalog models, upstreams, status codes, validators,
budgets; never a request, key, end user or tag.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}  # higher is worse
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_M = TypeVar("_M", Counter, Histogram)  # a metric whose labelled children Metrics keeps


class _Ledger(Protocol):
    @property
    def in_hand(self) -> int: ...

    def pending_spill_files(self) -> list[Path]: ...

    def rejected_files(self) -> list[Path]: ...


class _Replica(Protocol):
    state: str
    outstanding: int
    latency_ms: float | None
    ttft_ms: float | None
    waiting: float | None
    kv_cache: float | None
    calls: int
    failures: int


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The gateway's Prometheus series. One per app; in multiprocess mode values live in the shared folder
    (the registry only serves the scrape), otherwise in this object's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Counter | Histogram] = {}
        reg = None if multiprocess() else self.registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=reg)

        def gauge(name: str, doc: str, labels: Iterable[str], mode: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=reg, multiprocess_mode=mode)  # type: ignore[arg-type]

        self.requests = counter("tollway_requests", "Requests answered, by tenant, model and HTTP status",
                                ("tenant", "model", "status"))
        self.tokens = counter("tollway_tokens", "Tokens recorded in the ledger, by tenant, model and type",
                              ("tenant", "model", "type"))
        self.cost = counter("tollway_cost_usd", "Spend recorded in the ledger (USD), by tenant and model",
                            ("tenant", "model"))
        self.duration = Histogram("tollway_request_duration_seconds", "Request latency, by model", ["model"],
                                  buckets=_LATENCY_BUCKETS, registry=reg)
        self.ttft = Histogram("tollway_time_to_first_token_seconds", "Time to first token of streams, by model",
                              ["model"], buckets=_TTFT_BUCKETS, registry=reg)
        self.failed_attempts = counter("tollway_failed_attempts", "Upstream attempts that failed and fell back",
                                       ("model", "upstream", "error"))
        self.cache_hits = counter("tollway_cache_hits", "Answers served from the response cache", ("tenant",))
        self.guards = counter("tollway_guard_outcomes", "Guard outcomes by tenant, validator and action",
                              ("tenant", "validator", "action"))
        self.alerts = counter("tollway_alerts", "Alerts raised, by kind", ("kind",))
        self.quality = counter("tollway_quality_samples", "Live answers sampled for scoring, by model and outcome "
                               "(passed, failed, unchecked; dropped: the scoring queue was full)", ("model", "outcome"))
        self.breaker = gauge("tollway_upstream_breaker_state",
                             "Circuit breaker per upstream replica: 0 closed, 1 half-open, 2 open", ("upstream",), "max")
        self.in_flight = gauge("tollway_upstream_in_flight", "Calls in flight per upstream replica", ("upstream",),
                               "livesum")
        self.latency = gauge("tollway_upstream_latency_seconds", "Latency per replica (EWMA)", ("upstream",), "max")
        self.upstream_ttft = gauge("tollway_upstream_ttft_seconds", "Time to first token per replica (EWMA)",
                                   ("upstream",), "max")
        self.queue = gauge("tollway_upstream_queue", "vLLM requests waiting per replica", ("upstream",), "max")
        self.kv_cache = gauge("tollway_upstream_kv_cache_ratio", "vLLM KV-cache use per replica (0-1)",
                              ("upstream",), "max")
        self.upstream_calls = gauge("tollway_upstream_calls", "Calls per replica since the workers started",
                                    ("upstream",), "livesum")
        self.upstream_failures = gauge("tollway_upstream_failures", "Failed calls per replica since start",
                                       ("upstream",), "livesum")
        self.ledger_queue = gauge("tollway_ledger_queue_depth", "Ledger rows waiting to be written", (), "livesum")
        self.ledger_spill = gauge("tollway_ledger_spill_bytes", "Ledger rows spilled to disk, waiting for the "
                                                                "database (bytes)", (), "livesum")
        self.ledger_rejected = gauge("tollway_ledger_rejected_bytes", "Ledger rows the database refused for their "
                                     "content, set aside for an operator (bytes)", (), "livesum")
        self.budget_use = gauge("tollway_budget_use_ratio", "Budget use in its current window as a share of the "
                                "limit (the larger of USD and tokens; a budget for each subject: its highest)",
                                ("tenant", "budget", "scope", "window"), "mostrecent")

    def request(self, tenant: str, model: str, status: int, latency_s: float, ttft_s: float | None,
                cost_usd: float, input_tokens: int, output_tokens: int, cache_hit: bool) -> None:
        child = self._child
        child(self.requests, tenant, model, str(status)).inc()
        child(self.duration, model).observe(latency_s)
        if ttft_s is not None:
            child(self.ttft, model).observe(ttft_s)
        if cost_usd:
            child(self.cost, tenant, model).inc(cost_usd)
        if input_tokens:
            child(self.tokens, tenant, model, "input").inc(input_tokens)
        if output_tokens:
            child(self.tokens, tenant, model, "output").inc(output_tokens)
        if cache_hit:
            child(self.cache_hits, tenant).inc()

    def _child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, kept: prometheus_client checks the values and takes a lock on every
        call (a sixth of a request's metering). The request series are never removed, so a kept child stays
        the metric's own."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return cast(_M, found)

    def observe(self, replicas: Mapping[str, _Replica], ledger: _Ledger) -> None:
        """This process's gauges from its state: every few seconds, and before each scrape it serves."""
        self.replicas(replicas)
        self.ledger(ledger.in_hand, ledger.pending_spill_files(), ledger.rejected_files())

    def replicas(self, replicas: Mapping[str, _Replica]) -> None:
        for name, r in replicas.items():
            self.breaker.labels(name).set(BREAKER_VALUES.get(r.state, 2))
            self.in_flight.labels(name).set(r.outstanding)
            self.upstream_calls.labels(name).set(r.calls)
            self.upstream_failures.labels(name).set(r.failures)
            for gauge, value, scale in ((self.latency, r.latency_ms, 1000), (self.upstream_ttft, r.ttft_ms, 1000),
                                        (self.queue, r.waiting, 1), (self.kv_cache, r.kv_cache, 1)):
                if value is not None:
                    gauge.labels(name).set(value / scale)

    def ledger(self, queued: int, spill_files: Iterable[Path], rejected_files: Iterable[Path] = ()) -> None:
        self.ledger_queue.set(queued)
        self.ledger_spill.set(_size(spill_files))
        self.ledger_rejected.set(_size(rejected_files))

    def budgets(self, uses: Iterable[tuple[str, int, str, str, float]]) -> None:
        """(tenant, budget id, scope, window, share) per budget; budgets that are gone are dropped."""
        self.budget_use.clear()
        for tenant, budget_id, scope, window, share in uses:
            self.budget_use.labels(tenant, str(budget_id), scope, window).set(share)

    def exposition(self) -> bytes:
        return bytes(generate_latest(shared_registry() if multiprocess() else self.registry))

    def close(self) -> None:
        if multiprocess():
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # its live gauges leave the sums


def shared_registry() -> CollectorRegistry:
    """What the parent of ``--workers N`` serves on the metrics port: every worker's values, summed."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _size(files: Iterable[Path]) -> int:
    size = 0
    for path in files:
        try:
            size += path.stat().st_size
        except OSError:
            continue  # replayed and removed meanwhile
    return size
