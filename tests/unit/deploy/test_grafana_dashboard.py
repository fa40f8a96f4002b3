"""deploy/grafana/tollway-dashboard.json is valid against Grafana's dashboard schema: it is what the Grafana
Foundation SDK's schema-generated builders produce, it goes through the SDK's models without losing or
changing a field, and every panel queries a series that Tollway's /metrics exposes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "deploy" / "grafana" / "tollway-dashboard.json"


def _builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "deploy" / "grafana" / "build_dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_the_builders_output():
    assert json.loads(COMMITTED.read_text()) == _builder().build()


def test_the_dashboard_round_trips_through_grafanas_models():
    data = json.loads(COMMITTED.read_text())
    again = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))
    assert again == data
    assert data["schemaVersion"] >= 36
    assert data["uid"] == "tollway-gateway"
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"] and all(t["refId"] for t in panel["targets"]), panel["title"]
        assert panel["gridPos"]["w"] <= 24


def test_every_query_names_a_series_tollway_exports():
    from tollway.gateway.observability.prometheus import Metrics

    exported = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[family.type]
        exported |= {family.name + s for s in suffixes}
    data = json.loads(COMMITTED.read_text())
    named = {name for p in data["panels"] for t in p.get("targets", ()) for name in
             re.findall(r"\b(tollway_[a-z_]+)", t["expr"])}
    assert named and named <= exported, named - exported
    for needed in ("tollway_cost_usd_total", "tollway_request_duration_seconds_bucket",
                   "tollway_requests_total", "tollway_upstream_breaker_state"):
        assert needed in named
