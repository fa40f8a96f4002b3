"""The ``tollway`` command: serve, migrate, tenants, keys, budgets, prompts, ingest, search, sim-upstream, doctor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tollway.cli.common import (
    NoStore,
    Parser,
    audited,
    database,
    run_with_conn,
    settings_of,
    table,
    with_conn,
)
from tollway.failures import one_line
from tollway.gateway.tenancy.roles import ROLES

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": self.formatTime(record), "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _logging(level: str) -> dict[str, Any]:
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": _JSONFormatter}},
        "handlers": {"default": handler},
        "loggers": {"tollway": {"handlers": ["default"], "level": level.upper(), "propagate": False},
                    "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
                    "uvicorn.error": {"level": level.upper()},
                    "uvicorn.access": {"handlers": [], "propagate": False}},
    }


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tollway.app import SERVE_SETTINGS_ENV, create_app, upstream_configs
    from tollway.gateway.observability.prometheus import MULTIPROC_ENV, shared_registry
    from tollway.local.embedded import EmbeddedRedis, LocalModelServer

    settings = settings_of(args)
    upstream_configs(settings)  # a bad config file is a clear error now, before anything starts
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(database(settings, create=True, session=False))
        overrides: dict[str, Any] = {"database_url": database_url}
        if not settings.redis_url:
            redis_server = EmbeddedRedis(settings.data_dir / "redis")
            overrides["redis_url"] = redis_server.start()
            stack.callback(redis_server.stop)
        if not upstream_configs(settings) and settings.local_model:
            print("No upstream configured: starting the local SmolLM2-135M model (llama.cpp, CPU).",
                  file=sys.stderr, flush=True)
            local = LocalModelServer(settings.data_dir / "local-model")
            overrides["upstreams"] = [local.start()]
            stack.callback(local.stop)
        final = settings.model_copy(update=overrides)
        # uvicorn shuts down gracefully on SIGTERM and then re-raises it: turn that into SystemExit so
        # the embedded services started above are stopped too.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        common: dict[str, Any] = {"host": final.host, "port": final.port, "log_config": _logging(final.log_level),
                                  "loop": "uvloop", "http": "httptools", "access_log": False,
                                  "proxy_headers": bool(final.forwarded_allow_ips),
                                  "forwarded_allow_ips": ",".join(final.forwarded_allow_ips) or None,
                                  "timeout_graceful_shutdown": 30}
        if final.workers == 1:
            uvicorn.run(create_app(final), **common)
        else:
            # One scrape covers every worker: they write their metrics to one folder, any scrape sums it.
            prom_dir = final.data_dir / "prometheus"
            shutil.rmtree(prom_dir, ignore_errors=True)
            prom_dir.mkdir(parents=True)
            os.environ[MULTIPROC_ENV] = str(prom_dir.resolve())
            if final.metrics_port:
                from prometheus_client import start_http_server

                server, _ = start_http_server(final.metrics_port, final.host, registry=shared_registry())
                stack.callback(server.shutdown)
            # Workers are fresh processes: they get the resolved settings (embedded URLs included) whole.
            # The supervisor turns SIGTERM into a graceful stop of every worker and then returns here.
            os.environ[SERVE_SETTINGS_ENV] = final.model_dump_json()
            return _supervise(uvicorn.Config("tollway.app:create_app_from_env", factory=True, workers=final.workers,
                                             **common))
    return 0


def _supervise(config: Any) -> int:
    """uvicorn.run's workers branch, and its exit status: a worker that could not start stops the others and
    the parent, and the parent exits 3 as one process does (uvicorn.run returned normally, so 0)."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


async def _migrate(url: str) -> list[str]:
    from tollway.infra.db import migrate

    return await migrate(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    with database(settings, create=True) as url:
        applied = asyncio.run(_migrate(url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_tenants_create(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import create_tenant

    with database(settings_of(args), create=True) as url:
        tenant_id = asyncio.run(with_conn(url, lambda c: create_tenant(c, args.name, author=args.author)))
    print(f"tenant {args.name} created (id {tenant_id})")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import create_key, load_key_hasher

    models = [m for m in args.models.split(",") if m] if args.models else None
    settings = settings_of(args)
    hasher = load_key_hasher(settings.key_secret, settings.key_secret_previous, settings.data_dir)
    with database(settings) as url:
        key = asyncio.run(with_conn(url, lambda c: create_key(c, args.tenant, hasher=hasher, role=args.role,
                                                              allowed_models=models, name=args.name,
                                                              author=args.author, ingest=args.ingest)))
    rights = f"role {key.role}" + (", may ingest documents" if key.ingest else "")
    print(f"key {key.id} for tenant {key.tenant} ({rights}); shown once, store it now:", file=sys.stderr)
    print(key.secret)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import revoke_key

    with database(settings_of(args)) as url:
        revoked = asyncio.run(with_conn(url, lambda c: revoke_key(c, args.id, author=args.author,
                                                                  reason=args.reason)))
    if not revoked:
        print(f"key {args.id} does not exist or is already revoked", file=sys.stderr)
        return 1
    print(f"key {args.id} revoked (every running gateway drops it at once)")
    return 0


def cmd_sim_upstream(args: argparse.Namespace) -> int:
    from tollway.local import sim

    sim.run(args)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tollway.cli.doctor import run_checks

    return run_checks(settings_of(args))


def cmd_tenants_list(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import list_tenants

    async def action(conn: Any, settings: Any) -> int:
        rows = await list_tenants(conn)
        print(json.dumps(rows, indent=2) if args.json else table(rows, ["id", "name", "active_keys", "created_at"]))
        return 0

    return run_with_conn(args, action)


def cmd_alerts_list(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import tenant_id
    from tollway.infra.alerts import list_alerts

    async def action(conn: Any, settings: Any) -> int:
        tid = None if args.tenant is None else await tenant_id(conn, args.tenant)
        rows = await list_alerts(conn, tid, args.limit)
        print(json.dumps(rows, indent=2, default=str) if args.json else table(
            rows, ["id", "kind", "subject", "message", "created_at", "delivered_at", "attempts", "last_error"]))
        return 0

    return run_with_conn(args, action)


def cmd_keys_rekey_status(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import load_key_hasher, rekey_legacy, rekey_status

    async def action(conn: Any, settings: Any) -> int:
        hasher = load_key_hasher(settings.key_secret, settings.key_secret_previous, settings.data_dir)
        await rekey_legacy(conn, hasher)
        print(json.dumps(await rekey_status(conn, hasher)))
        return 0

    return run_with_conn(args, action)


def cmd_keys_list(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.keys import list_keys

    async def action(conn: Any, settings: Any) -> int:
        rows = await list_keys(conn, args.tenant)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for row in rows:  # "rpm 60, parallel 4": the limits a key has, in one column
            row["limits"] = ", ".join(f"{name} {row[field]}" for name, field in (
                ("rpm", "rpm"), ("tpm", "tpm"), ("parallel", "max_parallel_requests")) if row[field] is not None) or None
        print(table(rows, ["id", "tenant", "name", "role", "models", "limits", "prefix", "created_at", "last_used_at",
                           "revoked_at"]))
        return 0

    return run_with_conn(args, action)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="routing config file (YAML); TOLLWAY_CONFIG")
    parser.add_argument("--data-dir", type=Path, help="where embedded PostgreSQL/Redis keep data; TOLLWAY_DATA_DIR")


def build_parser() -> argparse.ArgumentParser:
    from tollway.local import sim

    parser = Parser(prog="tollway", description="OpenAI-compatible LLM gateway with cost control")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (embedded Postgres, Redis and model when unset)")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--upstream", action="append", metavar="URL",
                       help="an OpenAI-compatible upstream; its models come from its /v1/models (repeatable)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=int, help="worker processes behind one port (TOLLWAY_WORKERS, default 1)")
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="apply database migrations")
    _common(mig)
    mig.set_defaults(func=cmd_migrate)

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    tcreate = tenants.add_parser("create", help="create a tenant")
    _common(tcreate)
    tcreate.add_argument("name")
    audited(tcreate)
    tcreate.set_defaults(func=cmd_tenants_create)

    alerts = sub.add_parser("alerts", help="alerts (budget thresholds, drift)").add_subparsers(dest="action",
                                                                                            required=True)
    alist = alerts.add_parser("list", help="alerts, newest first, with delivery state")
    _common(alist)
    alist.add_argument("--tenant")
    alist.add_argument("--limit", type=int, default=100)
    alist.add_argument("--json", action="store_true")
    alist.set_defaults(func=cmd_alerts_list)

    tlist = tenants.add_parser("list", help="tenants, with their active keys")
    _common(tlist)
    tlist.add_argument("--json", action="store_true")
    tlist.set_defaults(func=cmd_tenants_list)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    klist = keys.add_parser("list", help="keys (never their secrets): id, name, role, models, created, last used")
    _common(klist)
    klist.add_argument("--tenant")
    klist.add_argument("--json", action="store_true")
    klist.set_defaults(func=cmd_keys_list)
    kcreate = keys.add_parser("create", help="create a key (printed once)")
    _common(kcreate)
    kcreate.add_argument("--tenant", required=True)
    kcreate.add_argument("--role", choices=ROLES, default="app")
    kcreate.add_argument("--models", help="comma-separated models the key may use (default: all)")
    kcreate.add_argument("--name", help="a label for the key")
    kcreate.add_argument("--ingest", action="store_true",
                         help="an app key that may also write documents into its tenant's collections")
    audited(kcreate)
    kcreate.set_defaults(func=cmd_keys_create)
    krekey = keys.add_parser("rekey-status", help="active keys under the current key secret and under another "
                                                  "(during a rotation of TOLLWAY_KEY_SECRET)")
    _common(krekey)
    krekey.set_defaults(func=cmd_keys_rekey_status)
    krevoke = keys.add_parser("revoke", help="revoke a key by id")
    _common(krevoke)
    krevoke.add_argument("id", type=int)
    audited(krevoke)
    krevoke.set_defaults(func=cmd_keys_revoke)

    from tollway.cli import budgets as cli_budgets
    from tollway.cli import evals as cli_evals
    from tollway.cli import guards as cli_guards
    from tollway.cli import models as cli_models
    from tollway.cli import prompts as cli_prompts
    from tollway.cli import quality as cli_quality
    from tollway.cli import reports as cli_reports
    from tollway.cli import retrieval as cli_retrieval

    cli_budgets.add_commands(sub, _common, tenants, keys)
    cli_guards.add_commands(_common, tenants)
    cli_prompts.add_commands(sub, _common)
    cli_retrieval.add_commands(sub)
    cli_evals.add_commands(sub)
    cli_reports.add_commands(sub, _common)
    cli_models.add_commands(sub, _common)
    cli_quality.add_commands(sub, _common)

    simp = sub.add_parser("sim-upstream", help="run the scripted OpenAI/vLLM-compatible upstream")
    sim.add_arguments(simp)
    simp.set_defaults(func=cmd_sim_upstream)

    doctor = sub.add_parser("doctor", help="check every configured dependency and say what is wrong")
    _common(doctor)
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tollway.config import ConfigError
    from tollway.errors import TollwayError
    from tollway.local.embedded import EmbeddedError

    try:
        return int(args.func(args))
    except BrokenPipeError:  # `tollway ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValidationError as exc:
        print(f"tollway: invalid settings: {exc}", file=sys.stderr)
    except (ConfigError, EmbeddedError, NoStore) as exc:
        print(f"tollway: {exc}", file=sys.stderr)
    except TollwayError as exc:
        print(f"tollway: {exc.message}", file=sys.stderr)
    except Exception as exc:
        said = one_line(exc)
        if said is None:
            raise
        print(f"tollway: {said}", file=sys.stderr)
    return 2
