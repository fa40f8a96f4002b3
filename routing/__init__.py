"""Model catalog, prices and upstream clients (cost-aware policy and fallback come later)."""

if __name__ != "tollway.routing":
    raise ImportError("This folder is Tollway's 'tollway.routing' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'routing'.")

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
from tollway.routing.upstream import Upstream, UpstreamStream, build_upstream, discover, new_session

__all__ = [
    "Catalog", "ConfigError", "ModelEntry", "Price", "RawConfig", "RawUpstream", "Upstream", "UpstreamSpec",
    "UpstreamStream", "Usage", "build_catalog", "build_upstream", "discover", "load_config", "new_session",
    "parse_config", "resolve_upstream",
]
