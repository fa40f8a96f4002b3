"""What operators watch: OpenTelemetry traces and metrics (``telemetry``) and Prometheus metrics
(``prometheus``; served by ``routes.metrics``)."""
