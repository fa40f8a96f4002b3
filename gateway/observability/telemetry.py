"""OpenTelemetry tracer and meter, built in the lifespan and handed down (never the global providers).

Nothing leaves the process unless an OTLP endpoint is configured; tests pass their own exporter.
Span attributes follow the GenAI semantic conventions (``gen_ai.*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracer, Tracer

import tollway
from tollway.gateway.observability.prometheus import BREAKER_VALUES, Metrics


class _Replica(Protocol):
    state: str
    outstanding: int
    trips: int


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Tracer
    meter: Meter
    requests: Counter
    cost_usd: Counter
    tokens: Counter
    duration: Histogram
    failed_attempts: Counter
    cache_hits: Counter
    guards: Counter
    alerts: Counter
    prometheus: Metrics

    def observe_replicas(self, replicas: Mapping[str, _Replica]) -> None:
        """Per upstream replica, read when metrics are collected: breaker state (0 closed, 1 half-open,
        2 open), calls in flight, and breaker trips so far."""

        def observe(read: Callable[[_Replica], int]) -> list[Callable[[CallbackOptions], Iterable[Observation]]]:
            def callback(_options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(read(r), {"tollway.upstream": name}) for name, r in replicas.items()]

            return [callback]

        self.meter.create_observable_gauge(
            "tollway.routing.breaker.state", callbacks=observe(lambda r: BREAKER_VALUES[r.state]),
            description="Circuit breaker per upstream replica: 0 closed, 1 half-open, 2 open")
        self.meter.create_observable_up_down_counter(
            "tollway.routing.outstanding", callbacks=observe(lambda r: r.outstanding), unit="{request}",
            description="Calls in flight per upstream replica")
        self.meter.create_observable_counter(
            "tollway.routing.breaker.trips", callbacks=observe(lambda r: r.trips),
            description="Times each replica's circuit breaker opened")

    def quality_sample(self, model: str, outcome: str) -> None:
        self.prometheus.quality.labels(model, outcome).inc()

    def alert(self, kind: str) -> None:
        self.alerts.add(1, {"tollway.alert.kind": kind})
        self.prometheus.alerts.labels(kind).inc()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        self.prometheus.close()


def build_telemetry(*, otlp_endpoint: str | None, span_exporter: SpanExporter | None = None,
                    metric_reader: MetricReader | None = None) -> Telemetry:
    resource = Resource.create({"service.name": "tollway", "service.version": tollway.__version__})
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    exporting_spans = bool(otlp_endpoint) or span_exporter is not None
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics")))
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if metric_reader is not None:
        readers.append(metric_reader)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    # With nowhere to send them, spans and measurements are not even built: the hot path pays nothing.
    tracer: Tracer = tracer_provider.get_tracer("tollway") if exporting_spans else NoOpTracer()
    meter: Meter = meter_provider.get_meter("tollway") if readers else NoOpMeter("tollway")
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        tracer=tracer,
        meter=meter,
        requests=meter.create_counter("tollway.requests", description="Requests by model and status"),
        cost_usd=meter.create_counter("tollway.cost", unit="USD", description="Spend recorded in the ledger"),
        tokens=meter.create_counter("gen_ai.client.token.usage", unit="{token}"),
        duration=meter.create_histogram("gen_ai.server.request.duration", unit="s"),
        failed_attempts=meter.create_counter("tollway.routing.failed_attempts",
                                             description="Upstream attempts that failed and fell back, by model, "
                                                         "upstream and error"),
        cache_hits=meter.create_counter("tollway.cache.hits", description="Answers served from the response cache"),
        guards=meter.create_counter("tollway.guard.outcomes",
                                    description="Guard outcomes by tenant, validator and action (pass, redact, "
                                                "block, fallback, log)"),
        alerts=meter.create_counter("tollway.infra.alerts", description="Alerts raised, by kind"),
        prometheus=Metrics(),
    )
