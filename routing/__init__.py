"""Model catalog and prices, upstream clients, the route decision (pure), the difficulty signal, replica
health and saturation, carrying out a route (fallback chain), the response cache, token counting.

The gateway calls the ``Router`` (plan, decide, call, cache) and reads the few types it returns; the
composition root builds it with ``build_router``. Other parts import from here, never the modules.
"""

if __name__ != "tollway.routing":
    raise ImportError("This folder is Tollway's 'tollway.routing' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'routing'.")

from tollway.config import ConfigError, RawConfig, RawUpstream, load_config, parse_config
from tollway.routing.build import build_router
from tollway.routing.cache import CachedAnswer
from tollway.routing.catalog import (
    Catalog,
    ModelEntry,
    Price,
    UpstreamSpec,
    Usage,
    build_catalog,
    resolve_upstream,
)
from tollway.routing.decision import BudgetSignal, RouteDecision, RouteRequest, TenantRouting
from tollway.routing.fallback import Attempt, ChainFailed, Served
from tollway.routing.health import SaturationPoller
from tollway.routing.prices import (
    PRICE_KIND,
    delete_price,
    load_prices,
    model_prices,
    parse_price,
    price_json,
    set_default_prices,
    set_price,
)
from tollway.routing.rollouts import (
    ROLLOUT_KIND,
    Rollout,
    delete_rollout,
    list_rollouts,
    load_rollouts,
    move_rollout,
    seed_rollouts,
    set_rollout,
)
from tollway.routing.router import Plan, Router
from tollway.routing.shared import SharedBreakers
from tollway.routing.tokens import (
    OFF_LOOP_CHARS,
    call_texts,
    content_texts,
    count_messages,
    count_prompt,
    media_parts,
    message_chars,
    off_loop_if_long,
    prediction_chars,
    prediction_tokens,
    prompt_chars,
)
from tollway.routing.upstream import Upstream, UpstreamStream, build_upstream, discover, new_session
from tollway.routing.wire import (
    MediaURLs,
    check_content_parts,
    check_sampling,
    check_structured_output,
    forbidden_config_fields,
)
from tollway.tokens import count_text, encoding

__all__ = [
    "OFF_LOOP_CHARS",
    "PRICE_KIND",
    "ROLLOUT_KIND",
    "Attempt",
    "BudgetSignal",
    "CachedAnswer",
    "Catalog",
    "ChainFailed",
    "ConfigError",
    "MediaURLs",
    "ModelEntry",
    "Plan",
    "Price",
    "RawConfig",
    "RawUpstream",
    "Rollout",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "SaturationPoller",
    "Served",
    "SharedBreakers",
    "TenantRouting",
    "Upstream",
    "UpstreamSpec",
    "UpstreamStream",
    "Usage",
    "build_catalog",
    "build_router",
    "build_upstream",
    "call_texts",
    "check_content_parts",
    "check_sampling",
    "check_structured_output",
    "content_texts",
    "count_messages",
    "count_prompt",
    "count_text",
    "delete_price",
    "delete_rollout",
    "discover",
    "encoding",
    "forbidden_config_fields",
    "list_rollouts",
    "load_config",
    "load_prices",
    "load_rollouts",
    "media_parts",
    "message_chars",
    "model_prices",
    "move_rollout",
    "new_session",
    "off_loop_if_long",
    "parse_config",
    "parse_price",
    "prediction_chars",
    "prediction_tokens",
    "price_json",
    "prompt_chars",
    "resolve_upstream",
    "seed_rollouts",
    "set_default_prices",
    "set_price",
    "set_rollout",
]
