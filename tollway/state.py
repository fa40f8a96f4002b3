"""Everything stateful, built once per process in the app's lifespan: the pools, stores, services and
background jobs, held by one ``AppState`` (``app.state.tollway``). ``build_state`` wires the rooms
together in dependency order; nothing is built at import time."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psycopg
import redis.asyncio as aioredis
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from psycopg_pool import AsyncConnectionPool

from tollway.config import RawPrice
from tollway.errors import TollwayError
from tollway.gateway.apis.stored import ResponseStore
from tollway.gateway.chat.calls import Calls, Limits
from tollway.gateway.chat.exchange import Parts
from tollway.gateway.chat.service import CompletionService
from tollway.gateway.http.routes.prompts_git import GitHTTP
from tollway.gateway.metering.breakers import BreakerEvents
from tollway.gateway.metering.budget_alerts import budget_uses, check_budgets
from tollway.gateway.metering.ledger import Ledger
from tollway.gateway.metering.quota import QuotaService
from tollway.gateway.metering.reconcile import reconcile, seed_budget
from tollway.gateway.metering.sweeper import Sweeper
from tollway.gateway.observability.prometheus import Metrics, multiprocess
from tollway.gateway.observability.telemetry import Telemetry, build_telemetry
from tollway.gateway.parts.evaluating import EvalGate, Evals, eval_settings
from tollway.gateway.parts.guarding import Guarding
from tollway.gateway.parts.prompting import RegistryPrompts
from tollway.gateway.parts.rag import Rag, RagSettings
from tollway.gateway.quality.sampling import LiveQuality, apply_retention, quality_settings
from tollway.gateway.quality.shadow import Shadows
from tollway.gateway.quality.watch import Monitor
from tollway.gateway.tenancy.keys import (
    KeyStore,
    bootstrap_default_tenant,
    load_key_hasher,
    rekey_legacy,
    rekey_status,
)
from tollway.gateway.tenancy.policy import PolicyStore
from tollway.guardrails import PolicyError
from tollway.infra.alerts import Delivery, Webhook
from tollway.infra.background import Background
from tollway.infra.changes import ChangeListener, Note
from tollway.infra.db import Freshness, migrate
from tollway.infra.drain import Drain
from tollway.infra.periodic import Periodic
from tollway.infra.redisclient import REDIS_FAULTS, eviction_risk
from tollway.infra.redisclient import connect as connect_redis
from tollway.jsontypes import JSON
from tollway.local.embedded import LOCAL_MODEL_NAME, EmbeddedError
from tollway.prompts import Gate, Registry, RenderPool
from tollway.publicids import load_public_ids
from tollway.retrieval import EmbedderError, LocalEmbedder, ParsePool
from tollway.routing import (
    PRICE_KIND,
    Catalog,
    ConfigError,
    RawUpstream,
    Router,
    SaturationPoller,
    SharedBreakers,
    Upstream,
    build_catalog,
    build_router,
    build_upstream,
    discover,
    load_config,
    load_prices,
    load_rollouts,
    new_session,
    resolve_upstream,
    seed_rollouts,
    set_default_prices,
)
from tollway.routing import ROLLOUT_KIND as ROLLOUT
from tollway.settings import Settings

log = logging.getLogger("tollway")
SEED_FAULTS: tuple[type[Exception], ...] = (*REDIS_FAULTS, psycopg.Error)


class StartupError(Exception):
    """Tollway cannot start as configured; the message says what to change."""


@dataclass
class AppState:
    settings: Settings
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    session: aiohttp.ClientSession
    telemetry: Telemetry
    catalog: Catalog
    upstreams: dict[str, Upstream]
    keys: KeyStore
    ledger: Ledger
    service: CompletionService
    policies: PolicyStore
    quota: QuotaService
    events: BreakerEvents
    routing: Router
    shadows: Shadows
    changes: ChangeListener
    prompts: Registry
    rag: Rag
    guarding: Guarding
    evals: Evals
    quality: LiveQuality
    monitor: Monitor
    git: GitHTTP | None = None
    prompt_gate: Gate | None = None  # runs a prompt's golden set when production moves (EvalGate)
    # (tenant id, budget id): the budget's counters raised to what the ledger says its window spent (this
    # process's queued rows written first); a fault is logged and left to the periodic reconciliation
    seed_budget: Callable[[int, int], Awaitable[None]] | None = None
    drain: Drain = field(default_factory=lambda: Drain(0))  # SIGTERM's pause, /readyz 503 meanwhile

    async def readiness(self) -> dict[str, bool]:
        async def database() -> bool:
            async with self.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
            return True

        async def cache() -> bool:
            return bool(await self.redis.ping())

        async def upstream() -> bool:
            for candidate in self.upstreams.values():
                try:
                    await asyncio.wait_for(candidate.list_models(), 2)
                    return True
                except Exception:
                    continue
            return False

        names = ("database", "redis", "upstream")
        results = await asyncio.gather(*(asyncio.wait_for(c(), 3) for c in (database, cache, upstream)),
                                       return_exceptions=True)
        return {n: r is True for n, r in zip(names, results, strict=True)}


def _reconciler(pool: AsyncConnectionPool, redis_client: aioredis.Redis, ledger: Ledger,
                interval_s: float) -> Periodic:
    """At start-up (an embedded Redis starts empty) and then periodically, raise any budget counter that
    fell behind the ledger."""

    async def run() -> None:
        await ledger.flush()
        await reconcile(pool, redis_client)

    return Periodic("budget-reconcile", interval_s, run)


async def _listen_for_changes(database_url: str, keys: KeyStore, policies: PolicyStore, prompts: Registry,
                              pool: AsyncConnectionPool, catalog: Catalog,
                              seed: Callable[[int, int], None]) -> ChangeListener:
    """Every change made anywhere (CLI, any replica's admin API, a git push, the quality monitor) drops what
    this process cached about it, or reloads it (a tenant's prompts, the model rollouts)."""

    async def apply(note: Note) -> None:
        if note.kind == "key":
            keys.forget(int(note.subject))
        if note.kind == ROLLOUT:
            async with pool.connection() as conn:
                await load_rollouts(conn, catalog)
        if note.kind == PRICE_KIND:
            async with pool.connection() as conn:
                await load_prices(conn, catalog)
        if note.tenant_id is not None:
            policies.forget(note.tenant_id)
            if note.kind in ("prompt", "prompt_label"):
                await prompts.load(note.tenant_id)
            if note.kind == "budget" and note.subject.isdigit():
                seed(note.tenant_id, int(note.subject))

    listener = ChangeListener(database_url, [apply])
    listener.start()
    try:  # changes made right after start-up must not slip past: wait (briefly) until it listens
        await asyncio.wait_for(listener.connected.wait(), 5)
    except TimeoutError:
        log.warning("change listener not connected yet; caches fall back to their TTLs until it is")
    return listener


def local_prompt_counter() -> Callable[[Sequence[JSON]], int]:
    """The local model's own prompt count (its tokenizer and chat template), loaded only when it is served."""
    from tollway.local.counting import TemplateCounter
    from tollway.local.embedded import local_model_path

    return TemplateCounter(local_model_path())


UPSTREAM_KEY_ENV = "TOLLWAY_UPSTREAM_API_KEY"  # the bearer key of every --upstream (a config file names its own)


def upstream_configs(settings: Settings) -> list[RawUpstream]:
    raw = load_config(settings.config).upstreams
    key = f"env::{UPSTREAM_KEY_ENV}" if os.environ.get(UPSTREAM_KEY_ENV) else None  # read where a config's is
    extra = [RawUpstream(name=f"upstream-{i}", base_url=url, discover_models=True, api_key=key)
             for i, url in enumerate(settings.upstreams, start=1)]
    return [*raw, *extra]


async def build_state(settings: Settings, stack: AsyncExitStack, span_exporter: SpanExporter | None,
                      metric_reader: MetricReader | None = None) -> AppState:
    if not settings.database_url or not settings.redis_url:
        raise StartupError("TOLLWAY_DATABASE_URL and TOLLWAY_REDIS_URL must be set "
                           "(`tollway serve` starts embedded ones when they are not).")
    raw_config = load_config(settings.config)
    raw_upstreams = upstream_configs(settings)
    if not raw_upstreams:
        raise StartupError("No upstream is configured: give --upstream URL, TOLLWAY_UPSTREAMS or a config file.")

    session_url = settings.session_database_url  # LISTEN and advisory locks: straight to PostgreSQL
    assert session_url is not None
    await migrate(session_url)
    telemetry = build_telemetry(otlp_endpoint=settings.otlp_endpoint, span_exporter=span_exporter,
                                metric_reader=metric_reader)
    stack.callback(telemetry.shutdown)

    fresh = Freshness()
    pool = AsyncConnectionPool(settings.database_url, min_size=4, max_size=16, open=False, timeout=5,
                               check=fresh.check, reset=fresh.returned, kwargs=settings.pool_kwargs)
    await pool.open(wait=True, timeout=10)
    stack.push_async_callback(pool.close)
    redis_client = await connect_redis(settings.redis_url, settings.redis_max_connections, settings.redis_cluster)
    if (risk := await eviction_risk(settings.redis_url)) is not None:
        log.warning("%s", risk)
    stack.push_async_callback(redis_client.aclose)
    session = new_session()
    stack.push_async_callback(session.close)

    specs = [resolve_upstream(u, timeout_s=settings.upstream_timeout_s,
                              connect_timeout_s=settings.upstream_connect_timeout_s) for u in raw_upstreams]
    upstreams = {s.name: build_upstream(s, session) for s in specs}
    discovered = await discover(list(upstreams.values()), settings.discovery_timeout_s)
    catalog = build_catalog(raw_config, discovered, specs)

    hasher = load_key_hasher(settings.key_secret, settings.key_secret_previous, settings.data_dir)
    async with pool.connection() as conn:  # rows from before the keyed hash (one UPDATE each, once)
        await rekey_legacy(conn, hasher)
        keyed = await rekey_status(conn, hasher)
        ids = await load_public_ids(conn)
    if keyed["other_secret"] and not keyed["current_secret"] and hasher.previous is None:
        raise StartupError("Every API key in this database is stored under another key secret: set "
                           "TOLLWAY_KEY_SECRET to the one the other replicas use (or, rotating, the old one in "
                           "TOLLWAY_KEY_SECRET_PREVIOUS). See docs/security.md.")
    keys = KeyStore(pool, cache_ttl_s=settings.auth_cache_ttl_s, hasher=hasher,
                    stale_max_s=settings.auth_stale_max_s)
    ledger = Ledger(pool, settings.spill_dir, queue_size=settings.ledger_queue_size,
                    batch_size=settings.ledger_batch_size, flush_interval_s=settings.ledger_flush_interval_s,
                    retry_interval_s=settings.ledger_retry_interval_s)
    try:
        await ledger.start()
    except OSError as exc:
        raise StartupError(f"The ledger's spill folder {settings.spill_dir} cannot be written ({exc}): rows would "
                           "have nowhere to go while PostgreSQL does not answer. Give TOLLWAY_DATA_DIR a "
                           "writable volume.") from exc
    stack.push_async_callback(ledger.stop)  # runs first on shutdown: the ledger drains while the pool is open

    if settings.bootstrap:
        async with pool.connection() as conn:
            created = await bootstrap_default_tenant(conn, hasher)
        if created is not None:
            print(f"\nTollway created tenant 'default' with an app key (shown once, store it now):\n\n"
                  f"    {created.secret}\n", file=sys.stderr, flush=True)

    policies = PolicyStore(pool, cache_ttl_s=settings.policy_cache_ttl_s,
                           default_parallel=settings.default_max_parallel_requests)
    renderer = RenderPool()  # started on the first template that needs it
    stack.callback(renderer.close)
    prompts = Registry(pool, renderer)
    await prompts.load()
    set_default_prices(catalog, {LOCAL_MODEL_NAME: RawPrice(  # the local CPU model: by the machine time it uses
        cpu_hour_usd=settings.local_cpu_hour_usd, prefill_tokens_per_s=settings.local_prefill_tokens_per_s,
        decode_tokens_per_s=settings.local_decode_tokens_per_s)})
    if LOCAL_MODEL_NAME in catalog.models:
        try:
            catalog.prompt_counters[LOCAL_MODEL_NAME] = await asyncio.to_thread(local_prompt_counter)
        except (ImportError, EmbeddedError, ValueError, OSError) as exc:  # streams then count with tiktoken
            log.warning("the local model's prompt counter is unavailable (%s): streams are estimated", exc)
    async with pool.connection() as conn:  # the config's rollouts are the starting point; the table wins
        await seed_rollouts(conn, catalog)
        await load_rollouts(conn, catalog)
        await load_prices(conn, catalog)
    # A new budget counts its window's spend at once: seeded off the listener (which goes on applying other
    # changes meanwhile), drained for at most 5 s at shutdown, before the ledger and the pool close.
    seeding = Background("budget seeding", drain_s=5)
    stack.push_async_callback(seeding.stop)

    async def seed(tenant_id: int, budget_id: int) -> None:
        try:
            await ledger.flush()
            await seed_budget(pool, redis_client, tenant_id, budget_id)
        except SEED_FAULTS as exc:  # the periodic reconciliation catches up
            log.warning("could not seed budget %s from the ledger: %s", budget_id, exc)

    def start_seed(tenant_id: int, budget_id: int) -> None:
        seeding.spawn(seed(tenant_id, budget_id), name=f"seed-budget-{budget_id}")

    changes = await _listen_for_changes(session_url, keys, policies, prompts, pool, catalog, start_seed)
    stack.push_async_callback(changes.stop)
    events = BreakerEvents(pool, telemetry)
    stack.push_async_callback(events.drain)
    quota = QuotaService(redis_client, lease_s=settings.lease_s, fail_open_share=settings.fail_open_share,
                         on_trip=events.trip, script_channel=settings.redis_script_channel)
    stack.push_async_callback(quota.aclose)
    stack.push_async_callback(quota.drain)  # settlements still in flight finish before Redis closes
    ledger.on_durable = quota.ack
    lease_sweeper = Sweeper(pool, redis_client, ledger, interval_s=settings.sweep_interval_s,
                            grace_s=settings.lease_s)

    async def sweep() -> None:
        await lease_sweeper.run()

    sweeping = Periodic("lease-sweep", settings.sweep_interval_s, sweep, at_start=False)
    sweeping.start()
    stack.push_async_callback(sweeping.stop)
    if settings.alert_webhook_url:
        if not settings.alert_webhook_secret:
            raise StartupError("TOLLWAY_ALERT_WEBHOOK_URL needs TOLLWAY_ALERT_WEBHOOK_SECRET (alerts are signed).")
        delivery = Delivery(pool, session, Webhook(settings.alert_webhook_url, settings.alert_webhook_secret,
                                                   settings.alert_webhook_max_attempts))

        async def deliver() -> None:
            await delivery.sweep()

        sweeper = Periodic("alert-delivery", 2.0, deliver)
        sweeper.start()
        stack.push_async_callback(sweeper.stop)

    async def budget_check() -> None:  # budgets may set their own thresholds: runs even with no defaults
        await ledger.flush()
        await check_budgets(pool, (settings.budget_alert_thresholds, "forecast" in settings.budget_alerts),
                            on_alert=telemetry.alert)

    # not at start-up: each pass sums the ledger, and a restart has no alert to catch up on sooner
    budget_watch = Periodic("budget-alerts", settings.budget_alert_interval_s, budget_check, at_start=False)
    budget_watch.start()
    stack.push_async_callback(budget_watch.stop)
    reconciler = _reconciler(pool, redis_client, ledger, settings.reconcile_interval_s)
    quota.on_recovered = reconciler.wake  # settlements lost with a failed Redis node come back from the ledger
    reconciler.start()
    stack.push_async_callback(reconciler.stop)
    routing = build_router(catalog, upstreams, redis_client)
    shared = SharedBreakers(redis_client, routing.health)  # one process's breaker trips reach all of them
    shared.start()
    stack.push_async_callback(shared.stop)
    shadows = Shadows(routing, ledger, pool)  # always: rollouts change at run time
    telemetry.observe_replicas(routing.health.replicas)
    await _export_metrics(settings, stack, pool, telemetry.prometheus, routing.health.replicas, ledger)
    poller = SaturationPoller(routing.health, specs, session, catalog.routing.saturation.poll_interval_s)
    await poller.poll_once()  # the first routing decisions already see the queues
    poller.start()
    stack.push_async_callback(poller.stop)
    stack.push_async_callback(shadows.drain)  # before the ledger stops: shadow rows are written
    try:
        quality_conf = quality_settings(raw_config.quality)
    except ConfigError as exc:
        raise StartupError(f"{settings.config or 'config'}: {exc}") from None
    quality = LiveQuality(pool, routing, ledger, telemetry, quality_conf)
    await quality.refresh_rates()
    quality.start()
    stack.push_async_callback(quality.stop)  # before the ledger stops: judge rows are written
    monitor = Monitor(pool, session_url, quality_conf, quality, telemetry)
    stack.push_async_callback(monitor.close)
    if quality_conf.enabled:
        for job in (Periodic("quality-monitor", quality_conf.interval_s, monitor.tick, at_start=False),
                    Periodic("content-retention", quality_conf.retention_interval_s, _retention(pool))):
            job.start()
            stack.push_async_callback(job.stop)
    stack.push_async_callback(routing.drain)  # before Redis closes: finished streams are cached
    git = GitHTTP(pool, prompts.load)
    stack.callback(git.close)
    calls = Calls(catalog, ledger, telemetry,
                  Limits(max_messages=settings.max_messages, max_tokens=settings.max_tokens_limit,
                         media_urls=settings.media_urls, media_part_tokens=settings.media_part_tokens),
                  policies=policies, quota=quota)
    local = (LocalEmbedder(query_model=settings.embedder_query_model, models=settings.models_dir)
             if settings.embedder == "local" or settings.local_embedder else None)
    if local is not None:
        try:
            local.check()  # its packages are installed: a bad install fails here, not in a request
        except EmbedderError as exc:
            raise StartupError(f"the packaged embedding model: {exc}") from None
        local.prepare_soon()  # the query model's file, where it is missing, before the first search needs it
        if settings.preload_embedder:
            await asyncio.to_thread(local.load)  # here, not in the first request that embeds
        stack.callback(local.close)
    try:
        guarding = Guarding.from_config(raw_config.guardrails)
    except PolicyError as exc:
        raise StartupError(f"{settings.config or 'config'}: {exc}") from None
    parser = ParsePool()  # worker processes started with the first ingestion
    stack.callback(parser.close)
    rag = Rag(pool, calls, routing, local, RagSettings(
        default_embedder=settings.embedder, context_tokens=settings.context_tokens,
        max_context_tokens=settings.max_context_tokens, max_document_tokens=settings.max_document_tokens,
        search_concurrency=settings.search_concurrency,
        on_failure=settings.retrieval_failure), ids, screen_for=guarding.passage_screen, parser=parser)
    if settings.embedder != "local":
        try:
            rag.entry(settings.embedder)
        except TollwayError as exc:
            raise StartupError(f"TOLLWAY_EMBEDDER: {exc.message}") from None
    parts = Parts(prompts=RegistryPrompts(prompts), input_guards=(guarding,), retriever=rag, output=(guarding,))
    service = CompletionService(calls, routing, parts=parts, shadows=shadows, local=local, quality=quality,
                                moderator=guarding.moderate, stored=ResponseStore(pool, settings.max_body_bytes))
    evals = Evals(pool, service, prompts, eval_settings(raw_config.evals), ids)
    stack.push_async_callback(evals.background.drain)
    base = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    log.info("tollway ready: %d models on %d upstreams; the API at %s/v1, the console at %s/console",
             len(catalog.models), len(upstreams), base, base)
    return AppState(settings=settings, pool=pool, redis=redis_client, session=session, telemetry=telemetry,
                    catalog=catalog, upstreams=upstreams, keys=keys, ledger=ledger, service=service,
                    policies=policies, quota=quota, events=events, routing=routing, shadows=shadows,
                    changes=changes, prompts=prompts, rag=rag, guarding=guarding, evals=evals, git=git,
                    prompt_gate=EvalGate(evals, pool), quality=quality, monitor=monitor, seed_budget=seed,
                    drain=Drain(settings.drain_pause_s))


def _retention(pool: AsyncConnectionPool) -> Callable[[], Awaitable[None]]:
    """The content policy's retention: stored prompts and answers older than their tenant allows go."""

    async def run() -> None:
        async with pool.connection() as conn:
            removed = await apply_retention(conn)
        if any(removed.values()):
            log.info("content retention: %s", removed)

    return run


async def _export_metrics(settings: Settings, stack: AsyncExitStack, pool: AsyncConnectionPool, metrics: Metrics,
                          replicas: Mapping[str, Any], ledger: Ledger) -> None:
    """Gauges read from this process's state every few seconds (and at each scrape it serves), budget use
    every ``TOLLWAY_METRICS_BUDGET_INTERVAL_S``; the unauthenticated metrics port when one is set (with
    --workers N the parent serves it)."""

    async def gauges() -> None:
        metrics.observe(replicas, ledger)

    async def budgets() -> None:
        now = datetime.now(UTC)
        async with pool.connection() as conn:
            highest: dict[tuple[str, int, str, str], float] = {}
            async for use in budget_uses(conn, now):
                key = (use.tenant, use.budget.id, use.budget.scope, use.budget.period)
                highest[key] = max(highest.get(key, 0.0), use.share)
        metrics.budgets((*key, share) for key, share in highest.items())

    for job in (Periodic("metrics-gauges", 5.0, gauges), Periodic("metrics-budgets",
                                                                  settings.metrics_budget_interval_s, budgets)):
        job.start()
        stack.push_async_callback(job.stop)
    if settings.metrics_port and not multiprocess():
        from prometheus_client import start_http_server

        server, _ = start_http_server(settings.metrics_port, settings.host, registry=metrics.registry)
        stack.callback(server.shutdown)
