"""The routing tests' helpers: a config with a large and a small tier on scripted upstreams, a request, a
stream's chunks, and the counters of an upstream and of the gateway's metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import yaml

BIG_PRICE = {"input_per_mtok": "3", "output_per_mtok": "15"}


SMALL_PRICE = {"input_per_mtok": "0.15", "output_per_mtok": "0.6"}


def stats(sim: Any) -> dict[str, Any]:
    with urllib.request.urlopen(sim.url.removesuffix("/v1") + "/sim/stats", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def calls(sim: Any) -> int:
    return int(stats(sim)["total"])


def routing_config(path: Path, *, big: list[str], small: list[str], routing: dict[str, Any] | None = None,
                   vllm_metrics: bool = False, extra_models: list[dict[str, Any]] | None = None,
                   extra_upstreams: list[dict[str, Any]] | None = None) -> Path:
    """'big' (tier large) on the `big` replicas, 'small' (tier small) on the `small` ones."""
    upstreams = [{"name": f"big-{i}", "base_url": url, "timeout_s": 30, "vllm_metrics": vllm_metrics}
                 for i, url in enumerate(big)]
    upstreams += [{"name": f"small-{i}", "base_url": url, "timeout_s": 30} for i, url in enumerate(small)]
    upstreams += extra_upstreams or []
    models = [
        {"name": "big", "upstreams": [u["name"] for u in upstreams if u["name"].startswith("big")],
         "upstream_model": "sim-large", "tier": "large", "price": BIG_PRICE, "capabilities": ["tools", "json_mode"]},
        {"name": "small", "upstreams": [u["name"] for u in upstreams if u["name"].startswith("small")],
         "upstream_model": "sim-small", "tier": "small", "price": SMALL_PRICE, "capabilities": ["json_mode"]},
        *(extra_models or []),
    ]
    config = {"upstreams": upstreams, "models": models,
              "routing": {"tiers": [{"name": "large", "deadline_s": 5, "ttft_deadline_s": 5},
                                    {"name": "small", "deadline_s": 5, "ttft_deadline_s": 5}],
                          **(routing or {})}}
    path.write_text(yaml.safe_dump(config))
    return path


def ask(content: str = "say something", **extra: Any) -> dict[str, Any]:
    return {"model": "big", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


async def stream_text(resp: Any) -> list[dict[str, Any]]:
    frames = []
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            frames.append(json.loads(line[6:]))
    return frames


def counted(reader: Any, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
    """A metric's data points (counter or gauge) from an in-memory metric reader, by attribute set."""
    out: dict[tuple[tuple[str, Any], ...], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        out[tuple(sorted(point.attributes.items()))] = point.value
    return out
