"""Model catalog and prices, upstream clients, the route policy (pure), the difficulty signal, replica
health and saturation, carrying out a route (fallback chain), the response cache, token counting.
Other parts import from here."""

if __name__ != "tollway.routing":
    raise ImportError("This folder is Tollway's 'tollway.routing' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'routing'.")

from tollway.routing.cache import ResponseCache, cache_key, deterministic
from tollway.routing.catalog import (
    Catalog,
    ModelEntry,
    Price,
    UpstreamSpec,
    Usage,
    build_catalog,
    resolve_upstream,
)
from tollway.routing.config import ConfigError, RawConfig, RawUpstream, load_config, parse_config
from tollway.routing.difficulty import assess
from tollway.routing.fallback import Attempt, Caller, ChainFailed, RetryBudget, Served
from tollway.routing.health import Health, SaturationPoller
from tollway.routing.policy import (
    BudgetSignal,
    RouteDecision,
    RouteRequest,
    Step,
    TenantRouting,
    canary_bucket,
    candidates,
    decide,
    no_model_fits,
)
from tollway.routing.tokens import count_messages, count_text
from tollway.routing.upstream import Upstream, UpstreamStream, build_upstream, discover, new_session

__all__ = [
    "Attempt",
    "BudgetSignal",
    "Caller",
    "Catalog",
    "ChainFailed",
    "ConfigError",
    "Health",
    "ModelEntry",
    "Price",
    "RawConfig",
    "RawUpstream",
    "ResponseCache",
    "RetryBudget",
    "RouteDecision",
    "RouteRequest",
    "SaturationPoller",
    "Served",
    "Step",
    "TenantRouting",
    "Upstream",
    "UpstreamSpec",
    "UpstreamStream",
    "Usage",
    "assess",
    "build_catalog",
    "build_upstream",
    "cache_key",
    "canary_bucket",
    "candidates",
    "count_messages",
    "count_text",
    "decide",
    "deterministic",
    "discover",
    "load_config",
    "new_session",
    "no_model_fits",
    "parse_config",
    "resolve_upstream",
]
