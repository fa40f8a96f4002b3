"""`tollway reports costs`: the cost report (the API's ``GET /v1/reports/costs``) from a shell, straight
against the database, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from tollway.cli.common import database, settings_of, table
from tollway.gateway.metering import GROUPS

_COLUMNS = ("group", "spend_usd", "requests", "errors", "input_tokens", "output_tokens", "cache_hits",
            "cache_saved_usd", "routing_saved_usd", "failed_attempts", "guard_blocked")


def report_table(report: dict[str, Any]) -> str:
    head = f"costs by {report['group_by']}, {report['from']} .. {report['to']} ({report['currency']})"
    rows = [*report["groups"], {**report["totals"], "group": "TOTAL"}]
    return head + "\n" + table(rows, _COLUMNS, right=_COLUMNS[1:], cut=None)


def cmd_costs(args: argparse.Namespace) -> int:
    from psycopg_pool import AsyncConnectionPool

    from tollway.gateway.metering.reports import build_query, cost_report, to_csv
    from tollway.gateway.tenancy.keys import Principal
    from tollway.infra.db import migrate
    from tollway.routing import load_config

    operator = Principal(key_id=0, tenant_id=0, tenant="", role="admin", allowed_models=None)

    async def go(url: str) -> int:
        await migrate(url)
        async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
            await pool.open(wait=True)
            query = await build_query(pool, operator, start=args.start, end=args.end, group_by=args.group_by,
                                      tenant=args.tenant, top_tier=top)
            report = await cost_report(pool, query)
        if args.format == "json":
            print(json.dumps(report, indent=2))
        elif args.format == "csv":
            print(to_csv(report), end="")
        else:
            print(report_table(report))
        return 0

    settings = settings_of(args)
    top = load_config(settings.config).routing.tiers[0].name  # route kind 'auto' splits by the top tier
    with database(settings) as url:
        return asyncio.run(go(url))


def add_commands(sub: Any, common: Any) -> None:
    reports = sub.add_parser("reports", help="cost reports from the ledger").add_subparsers(dest="action",
                                                                                          required=True)
    costs = reports.add_parser("costs", help="spend, tokens and requests per group (the API's cost report)")
    common(costs)
    costs.add_argument("--tenant", help="one tenant (default: every tenant)")
    costs.add_argument("--group-by", default="day", choices=GROUPS)
    costs.add_argument("--from", dest="start", help="ISO date or date-time (default: the first of this month, UTC)")
    costs.add_argument("--to", dest="end", help="ISO date (that whole day) or date-time (default: today)")
    costs.add_argument("--format", default="table", choices=["table", "csv", "json"])
    costs.set_defaults(func=cmd_costs)
