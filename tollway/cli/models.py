"""``tollway models price|prices``: model prices from a shell, straight against the database. A model found
through ``--upstream`` discovery has no price until one is set; every running gateway applies a change
before its next request (the change channel). ``GET /v1/admin/models`` lists every model a gateway serves
with its price and where the price comes from."""

from __future__ import annotations

import argparse
import json
from decimal import Decimal
from typing import Any

from tollway.cli.common import audited, run_with_conn, table
from tollway.settings import Settings

_FIELDS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "gpu_hour_usd", "cpu_hour_usd",
           "prefill_tokens_per_s", "decode_tokens_per_s", "litellm")


def cmd_price(args: argparse.Namespace) -> int:
    from tollway.errors import InvalidRequest
    from tollway.routing import delete_price, parse_price, set_price

    async def action(conn: Any, settings: Settings) -> int:
        if args.clear:
            removed = await delete_price(conn, None, args.model, author=args.author, reason=args.reason)
            print(json.dumps({"model": args.model, "deleted": removed}))
            return 0 if removed else 1
        given = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
        if not given:
            raise InvalidRequest("give a price: --input-per-mtok/--output-per-mtok, --cpu-hour-usd or --gpu-hour-usd "
                                 "with --prefill-tokens-per-s and --decode-tokens-per-s, or --litellm; or --clear")
        out = await set_price(conn, None, args.model, parse_price(given), author=args.author, reason=args.reason)
        print(json.dumps(out))
        return 0

    return run_with_conn(args, action)


def cmd_prices(args: argparse.Namespace) -> int:
    async def action(conn: Any, settings: Settings) -> int:
        cur = await conn.execute("SELECT model, price, updated_at FROM model_prices ORDER BY model")
        rows = [{"model": m, "price": json.dumps(p, sort_keys=True), "updated_at": at.isoformat(timespec="seconds")}
                for m, p, at in await cur.fetchall()]
        print(json.dumps(rows) if args.json else table(rows, ["model", "price", "updated_at"], cut=None))
        return 0

    return run_with_conn(args, action)


def add_commands(sub: Any, common: Any) -> None:
    models = sub.add_parser("models", help="model prices set at run time").add_subparsers(dest="action",
                                                                                        required=True)
    price = models.add_parser("price", help="set (or --clear) a model's price; every running gateway applies it")
    common(price)
    price.add_argument("model")
    for name in _FIELDS:
        flag = "--" + name.replace("_", "-")
        price.add_argument(flag, dest=name, type=str if name == "litellm" else Decimal)
    price.add_argument("--clear", action="store_true", help="remove the price set here (the config's applies)")
    audited(price)
    price.set_defaults(func=cmd_price)
    prices = models.add_parser("prices", help="the prices set at run time")
    common(prices)
    prices.add_argument("--json", action="store_true")
    prices.set_defaults(func=cmd_prices)
