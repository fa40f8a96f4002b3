"""Builds deploy/grafana/tollway-dashboard.json with the Grafana Foundation SDK, whose builders and models are
generated from Grafana's own dashboard schema (so a field Grafana does not know cannot be written).

    .venv/bin/python deploy/grafana/build_dashboard.py    # rewrites the JSON next to this file

Panels use Tollway's Prometheus series (docs/reference/operating.md); tests/unit/deploy/test_grafana_dashboard.py
checks that the committed JSON is this script's output and survives Grafana's models unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).with_name("tollway-dashboard.json")
K8S_COPY = Path(__file__).parents[1] / "k8s" / "base" / "tollway-dashboard.json"  # kustomize reads below its root
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
TENANT = 'tenant=~"$tenant"'


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def series(title: str, unit: str, *queries: prometheus.Dataquery, width: int = 12, stacked: bool = False,
           description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).height(8).span(width)
    if stacked:
        from grafana_foundation_sdk.builders.common import StackingConfig
        from grafana_foundation_sdk.models.common import StackingMode

        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def single(title: str, unit: str, expr: str) -> stat.Panel:
    return stat.Panel().title(title).unit(unit).datasource(DS).height(4).span(6).with_target(query(expr, title).ref_id("A"))


def build() -> dict[str, Any]:
    board = (
        dashboard.Dashboard("Tollway")
        .uid("tollway-gateway")
        .tags(["tollway", "llm", "cost"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("utc")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(dashboard.QueryVariable("tenant").label("Tenant").datasource(DS)
                       .query("label_values(tollway_requests_total, tenant)").multi(True).include_all(True)
                       .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
        .with_row(dashboard.Row("Spend"))
        .with_panel(single("Spend (range)", "currencyUSD", f"sum(increase(tollway_cost_usd_total{{{TENANT}}}[$__range]))"))
        .with_panel(single("Requests (range)", "short", f"sum(increase(tollway_requests_total{{{TENANT}}}[$__range]))"))
        .with_panel(single("Error share", "percentunit",
                           f'sum(rate(tollway_requests_total{{{TENANT},status=~"5.."}}[5m]))'
                           f" / sum(rate(tollway_requests_total{{{TENANT}}}[5m]))"))
        .with_panel(single("Highest budget use", "percentunit", f"max(tollway_budget_use_ratio{{{TENANT}}})"))
        .with_panel(series("Cost per tenant (USD/hour)", "currencyUSD",
                           query(f"sum by (tenant) (rate(tollway_cost_usd_total{{{TENANT}}}[5m])) * 3600", "{{tenant}}"),
                           stacked=True, description="Spend rate from the ledger's records, per tenant"))
        .with_panel(series("Cost per model (USD/hour)", "currencyUSD",
                           query(f"sum by (model) (rate(tollway_cost_usd_total{{{TENANT}}}[5m])) * 3600", "{{model}}"),
                           stacked=True))
        .with_panel(series("Tokens per second", "short",
                           query(f"sum by (type) (rate(tollway_tokens_total{{{TENANT}}}[5m]))", "{{type}}")))
        .with_panel(series("Budget use (share of limit)", "percentunit",
                           query(f"tollway_budget_use_ratio{{{TENANT}}}", "{{tenant}} #{{budget}} {{window}}")))
        .with_row(dashboard.Row("Latency and errors"))
        .with_panel(series("Request latency p50 / p95 / p99", "s", *(
            query(f"histogram_quantile({q}, sum by (le) (rate(tollway_request_duration_seconds_bucket[5m])))", f"p{p}")
            for q, p in (("0.5", 50), ("0.95", 95), ("0.99", 99)))))
        .with_panel(series("Time to first token p50 / p95", "s", *(
            query(f"histogram_quantile({q}, sum by (le) (rate(tollway_time_to_first_token_seconds_bucket[5m])))",
                  f"p{p}") for q, p in (("0.5", 50), ("0.95", 95)))))
        .with_panel(series("Requests by status", "reqps",
                           query(f"sum by (status) (rate(tollway_requests_total{{{TENANT}}}[5m]))", "{{status}}"),
                           stacked=True))
        .with_panel(series("Failed upstream attempts", "reqps",
                           query("sum by (upstream, error) (rate(tollway_failed_attempts_total[5m]))",
                                 "{{upstream}} {{error}}")))
        .with_row(dashboard.Row("Upstreams and breakers"))
        .with_panel(series("Breaker state (0 closed, 1 half-open, 2 open)", "short",
                           query("max by (upstream) (tollway_upstream_breaker_state)", "{{upstream}}")))
        .with_panel(series("Upstream latency and TTFT (EWMA)", "s",
                           query("tollway_upstream_latency_seconds", "{{upstream}} latency"),
                           query("tollway_upstream_ttft_seconds", "{{upstream}} ttft")))
        .with_panel(series("Calls in flight and vLLM queue", "short",
                           query("tollway_upstream_in_flight", "{{upstream}} in flight"),
                           query("tollway_upstream_queue", "{{upstream}} waiting")))
        .with_panel(series("Guard outcomes", "short",
                           query(f"sum by (validator, action) (rate(tollway_guard_outcomes_total{{{TENANT}}}[5m]))",
                                 "{{validator}} {{action}}")))
        .with_panel(series("Ledger queue and spill", "short",
                           query("tollway_ledger_queue_depth", "queued rows"),
                           query("tollway_ledger_spill_bytes", "spilled bytes"),
                           query("tollway_ledger_rejected_bytes", "set-aside bytes"), width=24))
    )
    return json.loads(json.dumps(board.build(), cls=JSONEncoder, sort_keys=True))


def main() -> None:
    text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    for path in (OUT, K8S_COPY):
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
