"""The scripted upstream's models and the test config's prices, and the routing config the tests write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SIM_MODELS = ["sim-large", "sim-small", "sim-embed", "sim-error", "sim-overloaded", "sim-timeout", "sim-cut",
              "sim-malformed", "sim-ignoremax", "sim-echo", "sim-large-v2", "sim-tools",
              "sim-tools-nousage", "sim-echo-reasons", "my-model"]
# Prices used by the tests: USD per million tokens.
PRICES = {"sim-large": (3, 15), "sim-small": ("0.15", "0.6")}


def write_config(path: Path, sim_url: str, *, extra_models: list[dict[str, Any]] | None = None,
                 extra_upstreams: list[dict[str, Any]] | None = None) -> Path:
    models: list[dict[str, Any]] = [
        {"name": name, "upstream": "sim", "tier": "large" if "large" in name else "small",
         "price": {"input_per_mtok": str(inp), "output_per_mtok": str(out)}}
        for name, (inp, out) in PRICES.items()
    ]
    models[0]["aliases"] = ["big"]
    models += [{"name": "sim-embed", "upstream": "sim", "kind": "embedding",
                "price": {"input_per_mtok": "0.02"}}]
    models += [{"name": m, "upstream": "sim", "price": {"input_per_mtok": "1", "output_per_mtok": "2"}}
               for m in SIM_MODELS if m not in PRICES and m != "sim-embed"]
    models += extra_models or []
    config = {"upstreams": [{"name": "sim", "base_url": sim_url, "timeout_s": 3}, *(extra_upstreams or [])],
              "models": models}
    path.write_text(yaml.safe_dump(config))
    return path


