"""`tollway budgets ...`, `tollway tenants policy`, `tollway keys limits`: the admin API's operations
from a shell, straight against the database (and Redis where counters are touched)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from tollway.cli.common import audited, database, flag, run_with_conn, settings_of, with_conn
from tollway.keep import KEEP
from tollway.settings import Settings


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}") from None
    if not amount.is_finite():
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}")
    if amount < 0:
        raise argparse.ArgumentTypeError("amounts cannot be negative")
    from tollway.gateway.tenancy.policy import USD_BOUND, USD_PLACES

    if amount >= USD_BOUND:
        raise argparse.ArgumentTypeError(f"amounts are stored below {USD_BOUND:,} USD")
    if amount != amount.quantize(Decimal(1).scaleb(-USD_PLACES)):
        raise argparse.ArgumentTypeError(f"amounts have at most {USD_PLACES} decimal places")
    return amount


def _whole(noun: str, least: int, below: str) -> Callable[[str], int]:
    """A parser of whole numbers of at least ``least`` (``below``: what a smaller one is told)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {value!r}") from None
        if number < least:
            raise argparse.ArgumentTypeError(below)
        return number

    return parse


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, or None for 'none' (no limit: the flag removes it)."""
    return lambda value: None if value.lower() == "none" else parse(value)


_usd_or_none = _or_none(_usd)
_tokens_or_none = _or_none(_whole("a number of tokens", 0, "limits cannot be negative"))
_count_or_none = _or_none(_whole("a whole number", 1, "a limit is at least 1 ('none' removes it)"))  # a positive count
_text_or_none = _or_none(str)


# the policy's limits a flag may also remove ('none'); absent, each keeps its value
CLEARABLE = ("rpm", "tpm", "max_parallel_requests", "velocity_soft_usd_per_min", "velocity_hard_usd_per_min",
             "quality_floor")


def _alerts(value: str) -> list[str] | None:
    return None if value.lower() == "default" else value.split(",")


def _redis_url(settings: Settings) -> str | None:
    from tollway.local.embedded import EmbeddedRedis

    return settings.redis_url or EmbeddedRedis.running_url(settings.data_dir / "redis")


def _scope(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.key is not None:
        return "key", args.key
    if args.user is not None:
        return "user", args.user
    if args.session is not None:
        return "session", args.session
    return "tenant", None


def cmd_set(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.policy import set_budget, unpriced_models, unpriced_warning

    settings = settings_of(args)

    async def action(conn: Any, database_url: str) -> int:
        scope, subject = _scope(args)
        budget = await set_budget(conn, args.tenant, scope=scope, subject=subject, period=args.window,
                                  limit_usd=args.usd, limit_tokens=args.tokens, alerts=args.alerts,
                                  author=args.author, reason=args.reason)
        out = budget.as_json()
        if budget.limit_usd is not None and (models := await unpriced_models(conn, budget.tenant_id)):
            out["warnings"] = [warning := unpriced_warning(models)]
            print(f"tollway: warning: {warning['message']}", file=sys.stderr)
        out["seeded"] = await _seed(settings, database_url, budget.tenant_id, budget.id)
        print(json.dumps(out))
        return 0

    with database(settings) as url:
        return int(asyncio.run(with_conn(url, lambda conn: action(conn, url))))


async def _seed(settings: Settings, database_url: str, tenant_id: int, budget_id: int) -> bool:
    """Raise the budget's counters to what the ledger says its window has spent before the command returns,
    as `PUT /v1/admin/budgets` does before it answers (each gateway does it again when the change reaches it,
    with its rows not yet written). False where no Redis is reachable from here."""
    from psycopg_pool import AsyncConnectionPool

    from tollway.gateway.metering.reconcile import seed_budget
    from tollway.infra.redisclient import REDIS_FAULTS
    from tollway.infra.redisclient import connect as connect_redis

    url = _redis_url(settings)
    if url is None:
        return False
    try:
        client = await connect_redis(url, 4, settings.redis_cluster)
        try:
            async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
                await seed_budget(pool, client, tenant_id, budget_id)
        finally:
            await client.aclose()
    except REDIS_FAULTS as exc:  # Redis or PostgreSQL: either way the gateways seed it
        print(f"tollway: the budget's counters were not seeded from here ({exc}); each gateway seeds them when "
              "the change reaches it", file=sys.stderr)
        return False
    return True


def cmd_delete(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.policy import delete_budget

    async def action(conn: Any, settings: Settings) -> int:
        if not await delete_budget(conn, args.tenant, args.id, author=args.author, reason=args.reason):
            print(f"tollway: tenant {args.tenant!r} has no budget {args.id}", file=sys.stderr)
            return 1
        print(json.dumps({"deleted": args.id}))
        return 0

    return run_with_conn(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from tollway.gateway.metering.budget_alerts import budget_uses
    from tollway.gateway.tenancy.keys import tenant_id
    from tollway.gateway.tenancy.policy import list_budgets, load_rules, policy_json

    async def action(conn: Any, settings: Settings) -> int:
        tid = await tenant_id(conn, args.tenant)
        budgets = await list_budgets(conn, args.tenant)
        policy = (await load_rules(conn, tid)).policy
        uses: dict[int, list[Any]] = {}
        async for use in budget_uses(conn, datetime.now(UTC), [tid]):  # from the ledger, like the console
            uses.setdefault(use.budget.id, []).append(
                {**use.evidence(), "usd": str(use.usd), "tokens": use.tokens, "from": use.start.isoformat(),
                 "to": use.end.isoformat()})
        print(json.dumps({"tenant": args.tenant, "policy": policy_json(policy, settings.default_max_parallel_requests),
                          "budgets": [{**b.as_json(), "use": uses.get(b.id, [])} for b in budgets]}, indent=2))
        return 0

    return run_with_conn(args, action)


def cmd_reset(args: argparse.Namespace) -> int:
    from tollway.gateway.metering.quota import clear_counters
    from tollway.gateway.tenancy.policy import mark_reset
    from tollway.infra.redisclient import connect as connect_redis

    async def action(conn: Any, settings: Settings) -> int:
        url = _redis_url(settings)
        cleared = 0
        async with conn.transaction():  # a Redis that fails to clear the counters leaves the reset unrecorded too
            budgets = await mark_reset(conn, args.tenant, args.id, author=args.author, reason=args.reason)
            if url is not None:
                client = await connect_redis(url, 4, settings.redis_cluster)
                try:
                    cleared = await clear_counters(client, budgets)
                finally:
                    await client.aclose()
        if url is None:
            print("no Redis reachable: the reset is recorded and applies when the counters are next "
                  "reconciled", file=sys.stderr)
        print(json.dumps({"reset": [b.id for b in budgets], "counters_cleared": cleared}))
        return 0

    return run_with_conn(args, action)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from psycopg_pool import AsyncConnectionPool

    from tollway.gateway.metering.reconcile import reconcile
    from tollway.infra.redisclient import connect as connect_redis

    settings = settings_of(args)
    url = _redis_url(settings)
    if url is None:
        print("tollway: no Redis to reconcile (set TOLLWAY_REDIS_URL or start `tollway serve`)", file=sys.stderr)
        return 2

    async def go(database_url: str) -> int:
        client = await connect_redis(url, 4, settings.redis_cluster)
        try:
            async with AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False) as pool:
                report = await reconcile(pool, client, allow_decrease=args.allow_decrease)
        finally:
            await client.aclose()
        print(json.dumps(report.as_json(), indent=2))
        return 0

    with database(settings) as database_url:
        return asyncio.run(go(database_url))


def cmd_policy(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.policy import policy_json, set_policy
    from tollway.routing import load_config

    fields = {name: getattr(args, name) for name in (
        "redis_failure", "default_max_tokens", "retry_storm_limit", "retry_storm_window_s", "route_threshold",
        "degraded_answers", "response_cache", "store_content", "content_retention_days")
        if getattr(args, name) is not None}
    fields.update({name: getattr(args, name) for name in CLEARABLE if getattr(args, name) is not KEEP})
    if args.allowed_models is not None:
        fields["allowed_models"] = [m for m in args.allowed_models.split(",") if m] or None

    async def action(conn: Any, settings: Settings) -> int:
        tiers = [t.name for t in load_config(settings.config).routing.tiers]
        policy = await set_policy(conn, args.tenant, tiers=tiers, author=args.author, reason=args.reason, **fields)
        print(json.dumps(policy_json(policy, settings.default_max_parallel_requests)))
        return 0

    return run_with_conn(args, action)


def cmd_key_limits(args: argparse.Namespace) -> int:
    from tollway.gateway.tenancy.policy import set_key_limits

    async def action(conn: Any, settings: Settings) -> int:
        limits = await set_key_limits(conn, args.id, rpm=args.rpm, tpm=args.tpm,
                                      max_parallel_requests=args.max_parallel_requests, author=args.author,
                                      reason=args.reason)
        print(json.dumps(limits))
        return 0

    return run_with_conn(args, action)


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None], tenants: Any, keys: Any) -> None:
    budgets = sub.add_parser("budgets", help="manage budgets").add_subparsers(dest="action", required=True)
    bset = budgets.add_parser("set", help="create or change a budget (every running gateway applies it at once)")
    common(bset)
    bset.add_argument("--tenant", required=True)
    who = bset.add_mutually_exclusive_group()
    who.add_argument("--key", help="a key id, or * for each key")
    who.add_argument("--user", help="an end user (OpenAI `user` or x-tollway-user), or * for each user")
    who.add_argument("--session", help="a session (x-tollway-session), or * for each session")
    bset.add_argument("--window", required=True, choices=["minute", "hour", "day", "month", "lifetime"])
    bset.add_argument("--usd", type=_usd_or_none, default=KEEP,
                      help="the USD limit, or 'none' to remove it (absent: unchanged)")
    bset.add_argument("--tokens", type=_tokens_or_none, default=KEEP,
                      help="the token limit, or 'none' to remove it (absent: unchanged)")
    bset.add_argument("--alerts", type=_alerts, default=KEEP,
                      help="alert once per window at these shares of the limit and/or on a forecast past it, e.g. "
                           "0.5,0.9,1,forecast; 'default' for TOLLWAY_BUDGET_ALERTS (absent: unchanged)")
    audited(bset)
    bset.set_defaults(func=cmd_set)

    bdel = budgets.add_parser("delete", help="delete a budget by id (`budgets show` lists them)")
    common(bdel)
    bdel.add_argument("--tenant", required=True)
    bdel.add_argument("--id", type=int, required=True)
    audited(bdel)
    bdel.set_defaults(func=cmd_delete)

    bshow = budgets.add_parser("show", help="a tenant's budgets with their use in the current window, and its policy")
    common(bshow)
    bshow.add_argument("--tenant", required=True)
    bshow.set_defaults(func=cmd_show)

    breset = budgets.add_parser("reset", help="a fresh allowance for the rest of the current window")
    common(breset)
    breset.add_argument("--tenant", required=True)
    breset.add_argument("--id", type=int, help="one budget (default: all of the tenant's)")
    audited(breset)
    breset.set_defaults(func=cmd_reset)

    brec = budgets.add_parser("reconcile", help="compare Redis counters with the ledger; correct and report")
    common(brec)
    brec.add_argument("--allow-decrease", action="store_true",
                      help="also lower counters that are ahead of the ledger (only when no ledger rows are pending)")
    brec.set_defaults(func=cmd_reconcile)

    policy = tenants.add_parser("policy", help="a tenant's Redis failure mode, default cap, rate limits, breakers")
    common(policy)
    policy.add_argument("--tenant", required=True)
    policy.add_argument("--redis-failure", choices=["closed", "open"])
    policy.add_argument("--default-max-tokens", type=int)
    policy.add_argument("--rpm", type=_count_or_none, default=KEEP, help="requests per minute ('none' removes it)")
    policy.add_argument("--tpm", type=_count_or_none, default=KEEP, help="tokens per minute ('none' removes it)")
    policy.add_argument("--max-parallel-requests", type=_count_or_none, default=KEEP, help="the tenant's requests "
                        "in flight at once, across every gateway (more: 429 parallel_requests_exceeded; 'none' "
                        "removes the cap)")
    policy.add_argument("--velocity-soft-usd-per-min", type=_usd_or_none, default=KEEP, help="('none' removes it)")
    policy.add_argument("--velocity-hard-usd-per-min", type=_usd_or_none, default=KEEP, help="('none' removes it)")
    policy.add_argument("--retry-storm-limit", type=int)
    policy.add_argument("--retry-storm-window-s", type=int)
    policy.add_argument("--route-threshold", type=float, help="model 'auto': difficulty at or above it goes to "
                        "the top tier (0 always, 1 never)")
    policy.add_argument("--allowed-models", help="comma-separated models the router may pick ('' for all)")
    policy.add_argument("--quality-floor", type=_text_or_none, default=KEEP,
                        help="the lowest tier this tenant may be routed or fall back to ('none' removes it)")
    policy.add_argument("--degraded-answers", type=flag, help="on/off: a marked degraded answer when every tier failed")
    policy.add_argument("--response-cache", type=flag, help="on/off: exact-match cache for deterministic requests")
    policy.add_argument("--store-content", type=flag, help="on/off: keep prompts and answers of live and shadow "
                        "samples and eval items, and Responses API responses (off: scores and metadata only)")
    policy.add_argument("--content-retention-days", type=int, help="how long stored content is kept (default 30)")
    audited(policy)
    policy.set_defaults(func=cmd_policy)

    limits = keys.add_parser("limits", help="a key's requests and tokens per minute, requests in flight at once "
                             "(each absent one: no limit)")
    common(limits)
    limits.add_argument("id", type=int)
    limits.add_argument("--rpm", type=_count_or_none)
    limits.add_argument("--tpm", type=_count_or_none)
    limits.add_argument("--max-parallel-requests", type=_count_or_none)
    audited(limits)
    limits.set_defaults(func=cmd_key_limits)
