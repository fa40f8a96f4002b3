"""Process settings from the environment (``TOLLWAY_*``), built once in the CLI or app factory.

The routing config file (upstreams, models, prices) is parsed separately and strictly by
``tollway.routing.load_config``; this module only says where it is.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """Where the embedded stores live unless told: one place per user, whatever the current folder
    (``$XDG_DATA_HOME/tollway``, else ``~/.local/share/tollway``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tollway"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLWAY_", extra="forbid", frozen=True, env_ignore_empty=True)

    config: Path | None = None
    # The embedded stores, the key secret, the ledger's spill files; a relative path is taken from the
    # folder the command starts in and made absolute at once (so every worker and later command agree).
    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    # Proxies (addresses, comma-separated, or "*") whose X-Forwarded-Proto / -For this gateway believes, as
    # uvicorn's forwarded_allow_ips: behind a TLS proxy the console's cookie is then marked Secure. Empty:
    # no proxy is trusted.
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    port: int = Field(default=8080, ge=0, le=65535)
    # Worker processes behind the one port; embedded services are started once, by the parent.
    workers: int = Field(default=1, ge=1, le=64)
    # On SIGTERM, /readyz answers 503 and the gateway serves on for this long before it stops accepting, so
    # a balancer that learns from health checks takes it out first (more than its check interval times its
    # fall count). 0: stop accepting at once (Kubernetes removes the pod from its endpoints before SIGTERM).
    drain_pause_s: float = Field(default=0.0, ge=0, le=300)

    database_url: str | None = None
    # PostgreSQL behind a pooler in transaction mode (PgBouncer, RDS Proxy, Supavisor ...): the pool prepares
    # no statement (a prepared statement lives on one server session, which the pooler hands to others), and
    # what needs a session of its own (LISTEN for changes, the migration and quality-monitor advisory locks,
    # the CLI) goes to database_direct_url, straight to PostgreSQL. Required with "transaction".
    database_pooler: Literal["none", "transaction"] = "none"
    database_direct_url: str | None = None
    redis_url: str | None = None
    redis_max_connections: int = Field(default=64, ge=1)
    # A Redis Cluster (redis-py's cluster client) or one node; unset: what the server says at start-up.
    redis_cluster: bool | None = None
    # The budget scripts over one multiplexed connection per process (tollway.infra.redisscripts) where the
    # client allows it (one node, TCP or a Unix socket, no TLS); false: through redis-py like everything else.
    redis_script_channel: bool = True
    # Extra OpenAI-compatible upstreams whose models come from their /v1/models (comma-separated).
    upstreams: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Start the packaged llama.cpp model when nothing else is configured.
    local_model: bool = True
    # Its price, by the machine time it uses (until one is set with `tollway models price`): an hour of the
    # host (about a 2-vCPU cloud VM on demand) and the throughput measured on 2 cores (bench/RESULTS.md).
    local_cpu_hour_usd: Decimal = Field(default=Decimal("0.09"), ge=0)
    local_prefill_tokens_per_s: Decimal = Field(default=Decimal(250), gt=0)
    local_decode_tokens_per_s: Decimal = Field(default=Decimal(80), gt=0)
    # On a database with no tenants, create tenant 'default' and print one app key.
    bootstrap: bool = True

    otlp_endpoint: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    auth_cache_ttl_s: float = Field(default=5.0, ge=0)
    # While the database is unreachable, a known key's last good entry serves for up to this long.
    auth_stale_max_s: float = Field(default=3600.0, ge=0)
    # The server secret of the keyed hash API keys are stored under (default: <data_dir>/key-secret, made
    # once); every replica sets the same one. The previous secret, during a rotation (tollway.gateway.tenancy.keys).
    key_secret: str | None = Field(default=None, repr=False)
    key_secret_previous: str | None = Field(default=None, repr=False)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=2048, ge=1)
    max_tokens_limit: int = Field(default=262_144, ge=1)
    # Where a chat content part's image, audio or video URL may point (the model server fetches it):
    # public, any, inline (tollway.routing.wire.media_url_refusal).
    media_urls: Literal["public", "any", "inline"] = "public"
    # Prompt tokens a budget reserves for each image, audio, video or file part: the upstream charges them, and
    # what it charges depends on the model and the media (routing.tokens.media_parts).
    media_part_tokens: int = Field(default=4096, ge=0, le=1_000_000)

    ledger_queue_size: int = Field(default=20_000, ge=1)
    ledger_batch_size: int = Field(default=500, ge=1)
    ledger_flush_interval_s: float = Field(default=0.05, gt=0)
    ledger_retry_interval_s: float = Field(default=1.0, gt=0)

    # Budgets: how long a reservation holds if its gateway dies, how fast policy changes apply, and
    # what share of the last known headroom a fail-open tenant may spend while Redis is unreachable.
    lease_s: float = Field(default=60.0, gt=0)
    # How often one gateway process writes the ledger rows of requests a dead process left in Redis
    # (gateway/metering/sweeper.py); a settled request's row is its own gateway's to write for lease_s.
    sweep_interval_s: float = Field(default=10.0, gt=0)
    policy_cache_ttl_s: float = Field(default=2.0, ge=0)
    fail_open_share: float = Field(default=0.5, gt=0, le=1)
    # Each tenant's requests in flight at once where its policy sets no cap (max_parallel_requests): one
    # tenant's flood then cannot fill a shared model server's queue unasked. None: no cap by default.
    default_max_parallel_requests: int | None = Field(default=None, gt=0, le=1_000_000)
    reconcile_interval_s: float = Field(default=300.0, gt=0)

    # Retrieval: the embedding model new collections use ('local': the packaged CPU model; or an embedding
    # model of the catalog), the context budget a request gets when it names none, and its ceiling.
    embedder: str = "local"
    local_embedder: bool = True  # offer the packaged model even when the default embedder is another
    preload_embedder: bool = False  # load it at start (else on its first use: ~180 MiB only when embedding)
    # A search's query through its int8 query model (tollway.retrieval.quantize: about twice as fast, vectors
    # within a cosine of 0.98 of the packaged model's); false: queries too through the packaged model.
    embedder_query_model: bool = True
    # Where that query model is built and read (unset: $XDG_CACHE_HOME/tollway/models, else ~/.cache/...);
    # an image with a read-only file system builds it there at build time (deploy/Dockerfile).
    models_dir: Path | None = None
    context_tokens: int = Field(default=1000, ge=1)
    max_context_tokens: int = Field(default=16_000, ge=1)
    max_document_tokens: int = Field(default=200_000, ge=1)
    # One tenant's searches (the API's and chats' retrieval) running at once in a process; its others wait for
    # one of them to end, holding no connection. Other tenants' searches are not counted against it: a tenant's
    # flood shares the cores with another tenant's one search instead of queueing it behind the whole flood.
    search_concurrency: int = Field(default=8, ge=1, le=1024)
    # Whether a chat whose retrieval fails is refused ('fail') or answered without context ('answer');
    # a request may choose for itself with retrieval.on_failure.
    retrieval_failure: Literal["fail", "answer"] = "fail"

    # Alerts (budget thresholds, drift) are also POSTed here, signed with the secret (see tollway.infra.alerts).
    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = None
    alert_webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    # Budget alerts: shares of a budget's limit that raise an alert once per window, and whether a forecast
    # over the limit does ("0.8,1.0,forecast"; empty: none), checked every interval from the ledger.
    budget_alerts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["0.8", "1.0", "forecast"])
    budget_alert_interval_s: float = Field(default=300.0, gt=0)  # each pass sums every budget's window in the ledger

    # Prometheus: /metrics on the main port needs an admin key; this port serves it without auth (for a
    # scraper inside the cluster; with --workers N the parent serves it, summing every worker).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_budget_interval_s: float = Field(default=60.0, gt=0)  # how often budget use ratios are re-read
    # The console's sign-in session lasts this long (then sign in again); a revoked key ends it at once.
    console_session_ttl_s: int = Field(default=8 * 3600, ge=60)

    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_timeout_s: float = Field(default=120.0, gt=0)
    discovery_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _pooler_has_a_direct_url(self) -> Settings:
        if self.database_pooler == "transaction" and not self.database_direct_url:
            raise ValueError("TOLLWAY_DATABASE_POOLER=transaction needs TOLLWAY_DATABASE_DIRECT_URL, a URL straight to "
                             "PostgreSQL: LISTEN (changes reaching the gateways at once), the migration lock and the "
                             "quality monitor's leader lock hold a session, which a transaction pooler does not keep")
        return self

    @property
    def session_database_url(self) -> str | None:
        """Where a connection that keeps a session goes: the direct URL where PostgreSQL is behind a pooler."""
        return self.database_direct_url or self.database_url

    @property
    def pool_kwargs(self) -> dict[str, object]:
        """psycopg connection options of the pooled connections: behind a transaction pooler, no prepared
        statements (psycopg prepares a query run five times on one connection)."""
        return {"prepare_threshold": None} if self.database_pooler == "transaction" else {}

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("budget_alerts", mode="before")
    @classmethod
    def _alerts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for part in value if isinstance(value, list) else []:
            if part != "forecast":
                try:
                    share = float(part)
                except ValueError:
                    raise ValueError(f"{part!r}: give shares of the limit (0.8) or 'forecast'") from None
                if not 0 < share <= 10:
                    raise ValueError(f"{part!r}: a share of the limit is between 0 and 10")
        return value

    @property
    def budget_alert_thresholds(self) -> tuple[float, ...]:
        return tuple(sorted(float(p) for p in self.budget_alerts if p != "forecast"))

    @field_validator("upstreams", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def spill_dir(self) -> Path:
        return self.data_dir / "ledger-spill"
