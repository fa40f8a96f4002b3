"""deploy/k8s and deploy/compose.yaml render and validate offline: every kustomization (the base, each
overlay) through `kubectl kustomize`; core kinds against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown field fails); the custom resources (KEDA ScaledObject, CloudNativePG Cluster) against
the minimal schemas vendored in deploy/k8s/schemas; the compose file against the compose specification's
schema (check-jsonschema's vendored copy). Then what an operator relies on: no secret value anywhere,
probes and a drain that outlasts the longest answer, every container with requests and a memory limit,
the config the gateway mounts parses, the dashboard is the one deploy/grafana builds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tollway.config import parse_config

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/production", "overlays/staging"]
KUBERNETES = "1.32.0"
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
          ("postgresql.cnpg.io/v1", "Cluster"): "cnpg-cluster.json"}


def render(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s (it carries kustomize)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet", "Job") else {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


@pytest.mark.parametrize("target", TARGETS)
def test_every_kustomization_renders_and_validates(target):
    docs = render(target)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM:
            schema = json.loads((K8S / "schemas" / CUSTOM[key]).read_text())
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_what_an_operator_relies_on(target):
    docs = render(target)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not [d for d in docs if d["kind"] == "Secret"]  # referenced, never written
    for doc in docs:
        for c in containers(doc):
            for env in c.get("env", []):
                sensitive = any(w in env["name"] for w in ("SECRET", "PASSWORD", "TOKEN", "DATABASE_URL", "REDIS_URL"))
                assert not sensitive or "valueFrom" in env, (doc["metadata"]["name"], env["name"])
            resources = c.get("resources", {})
            assert resources.get("requests") and "memory" in resources.get("limits", {}), (doc["metadata"]["name"], c["name"])
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tollway")
    pod = gateway["spec"]["template"]["spec"]
    [main] = pod["containers"]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(main)
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tollway-config"))
    config = parse_config(yaml.safe_load(config_map["data"]["tollway.yaml"]), target)
    longest = max(t.deadline_s for t in config.routing.tiers)
    assert pod["terminationGracePeriodSeconds"] >= pause + longest  # a stream started last finishes
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert ("PodDisruptionBudget", "tollway") in kinds
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert ("Job", "tollway-migrate") in kinds
    upstreams = {u.base_url.split("//")[1].split(":")[0] for u in config.upstreams}
    services = {name for kind, name in kinds if kind == "Service"}
    if target != "base":  # the overlays bring the models the config names
        assert upstreams <= services, upstreams - services
        scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
        assert scaled == {name for kind, name in kinds if kind == "Deployment" and name.startswith("vllm-")}
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tollway-dashboard"))
    committed = json.loads((ROOT / "deploy" / "grafana" / "tollway-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["tollway-dashboard.json"]) == committed


def test_the_compose_file_validates_against_the_compose_specification():
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "deploy" / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway-1", "gateway-2", "proxy", "redis", "postgres", "migrate"} <= set(services)
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["sim"]["profiles"] == ["cpu"]
    haproxy = (ROOT / "deploy" / "compose" / "haproxy.cfg").read_text()
    assert "server gateway-1 gateway-1:8080 check" in haproxy
    assert "server gateway-2 gateway-2:8080 check" in haproxy
    assert "option httpchk GET /readyz" in haproxy
    for name in ("gateway-1", "gateway-2"):
        env = services[name]["environment"]
        assert env["TOLLWAY_KEY_SECRET"].startswith("${")  # from the environment, never a value
