"""Model prices set at run time: a model found through ``--upstream`` discovery (or the local model) is
priced from the CLI or the API without a config file, and every replica applies the change before its
next request (the change channel). A stored price wins over the config file's; deleting it restores the
config's. The local CPU model has a default price by the machine time it uses (``LOCAL_PRICE``) until one
is stored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from tollway.config import RawPrice
from tollway.errors import InvalidRequest, NotFound
from tollway.infra import changes
from tollway.jsontypes import JSON
from tollway.routing.catalog import Catalog, Price, resolve_price

PRICE_KIND = "model_price"


def parse_price(data: Any) -> RawPrice:
    """A price object as the config file writes it; a 400 naming the problem otherwise."""
    try:
        return RawPrice.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"price: {first['msg']}", param="price") from None


def price_json(price: Price) -> JSON:
    """What a price is, for the API and the CLI."""
    out: JSON = {"source": price.source}
    if price.machine_second_usd is not None:
        out.update({"per_hour_usd": str((price.machine_second_usd * 3600).normalize()),
                    "prefill_tokens_per_s": str(price.prefill_tokens_per_s),
                    "decode_tokens_per_s": str(price.decode_tokens_per_s)})
    elif price.source != "unpriced":
        out.update({"input_per_mtok": str((price.input_per_token * 10**6).normalize()),
                    "output_per_mtok": str((price.output_per_token * 10**6).normalize())})
    return out


async def stored_prices(conn: psycopg.AsyncConnection[Any]) -> dict[str, RawPrice]:
    cur = await conn.execute("SELECT model, price FROM model_prices")
    return {model: RawPrice.model_validate(price) for model, price in await cur.fetchall()}


def set_default_prices(catalog: Catalog, defaults: dict[str, RawPrice]) -> None:
    """Prices for models that have no configured one (the local model's, by the machine time it uses);
    a stored price still wins (``load_prices``)."""
    catalog.default_prices = {name: _marked(resolve_price(raw), "default") for name, raw in defaults.items()
                              if name in catalog.models and catalog.configured_prices[name].source == "unpriced"}


async def load_prices(conn: psycopg.AsyncConnection[Any], catalog: Catalog) -> None:
    """The stored prices into the catalog, over the defaults and the config's."""
    stored = await stored_prices(conn)
    catalog.set_prices({**catalog.default_prices,
                        **{name: _marked(resolve_price(raw), "set") for name, raw in stored.items()}})


def _marked(price: Price, how: str) -> Price:
    """``set`` (stored over the API or CLI) or ``default``, with the scheme when it is not per token."""
    scheme = "" if price.source == "config" else f":{price.source}"
    return dataclasses.replace(price, source=how + scheme)


async def set_price(conn: psycopg.AsyncConnection[Any], catalog: Catalog | None, model: str, raw: RawPrice, *,
                    author: str, reason: str | None = None) -> JSON:
    """Store a model's price (a change in the change channel); a gateway's ``catalog`` applies it at once
    (the CLI has none: every running gateway applies it when the change reaches it)."""
    if catalog is not None and catalog.get(model) is None:
        raise NotFound(f"This gateway has no model '{model}'.", param="model", code="model_not_found")
    if not model or len(model) > 256:
        raise InvalidRequest("a model name is 1 to 256 characters", param="model")
    resolve_price(raw)  # a litellm key it does not know is refused here
    data = raw.model_dump(mode="json", exclude_none=True)
    async with conn.transaction():
        cur = await conn.execute("SELECT price FROM model_prices WHERE model = %s FOR UPDATE", (model,))
        before = await cur.fetchone()
        await conn.execute("INSERT INTO model_prices (model, price) VALUES (%s, %s) ON CONFLICT (model) DO UPDATE"
                           " SET price = EXCLUDED.price, updated_at = now()", (model, Jsonb(data)))
        await changes.record(conn, author=author, kind=PRICE_KIND, subject=model, action="set",
                             before=None if before is None else before[0], after=data, reason=reason)
    if catalog is None:
        return {"object": "model.price", "model": model, **price_json(_marked(resolve_price(raw), "set"))}
    await load_prices(conn, catalog)
    entry = catalog.models[model] if model in catalog.models else catalog.get(model)
    assert entry is not None
    return {"object": "model.price", "model": entry.name, **price_json(entry.price)}


async def delete_price(conn: psycopg.AsyncConnection[Any], catalog: Catalog | None, model: str, *, author: str,
                       reason: str | None = None) -> bool:
    async with conn.transaction():
        cur = await conn.execute("DELETE FROM model_prices WHERE model = %s RETURNING price", (model,))
        before = await cur.fetchone()
        if before is None:
            return False
        await changes.record(conn, author=author, kind=PRICE_KIND, subject=model, action="delete",
                             before=before[0], reason=reason)
    if catalog is not None:
        await load_prices(conn, catalog)
    return True


def model_prices(catalog: Catalog) -> list[JSON]:
    return [{"model": m.name, "kind": m.kind, "tier": m.tier, **price_json(m.price)}
            for m in sorted(catalog.models.values(), key=lambda m: m.name)]

