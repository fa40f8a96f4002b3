"""The gateway side of prompts: the chat path's prompt stage, served by the prompts part's in-memory
registry (no git or database read on the request path), and a rendered prompt's dry run (what it costs on
each chat model at its recent traffic), for the API and the CLI alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tollway.gateway.chat.exchange import ChatView, RenderedPrompt
from tollway.gateway.metering.accounting import format_cost
from tollway.jsontypes import JSON
from tollway.prompts import Registry
from tollway.routing import Catalog, Usage, count_messages


class RegistryPrompts:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def offers(self, tenant_id: int) -> bool:
        return self.registry.has(tenant_id)

    async def render(self, view: ChatView, ref: JSON) -> RenderedPrompt:
        r = await self.registry.render(view.tenant_id, view.subject, ref)  # the subject's split bucket applies
        return RenderedPrompt(r.name, r.version, r.messages, r.model, r.params, r.guards, r.label)


async def requests_per_day(conn: Any, tid: int, name: str) -> float:
    """The prompt's traffic over the last 7 days, from the ledger."""
    since = datetime.now(UTC) - timedelta(days=7)
    cur = await conn.execute("SELECT count(*) FROM ledger WHERE tenant_id = %s AND prompt_name = %s"
                             " AND role = 'answer' AND created_at >= %s", (tid, name, since))
    row = await cur.fetchone()
    return float(row[0]) / 7 if row else 0.0


def dry_run(catalog: Catalog, name: str, ver: str, messages: list[JSON], params: JSON, per_day: float) -> JSON:
    """What a request with this prompt costs on each chat model: its prompt tokens (tiktoken) plus, at most,
    its ``max_tokens``; and per day at the prompt's recent traffic."""
    tokens = count_messages(messages)
    cap = params.get("max_completion_tokens") or params.get("max_tokens") or 0
    models = []
    for m in catalog.models.values():
        if m.kind != "chat":
            continue
        low = m.price.cost(Usage(input_tokens=tokens))
        high = m.price.cost(Usage(input_tokens=tokens, output_tokens=int(cap)))
        daily = Decimal(str(per_day))
        models.append({"model": m.name, "tier": m.tier, "price_source": m.price.source, "input_tokens": tokens,
                       "max_output_tokens": cap,
                       "usd_per_request": {"prompt_only": format_cost(low), "at_max_tokens": format_cost(high)},
                       "usd_per_day": {"prompt_only": format_cost(low * daily),
                                       "at_max_tokens": format_cost(high * daily)}})
    return {"prompt": name, "version": ver, "messages": messages, "params": params,
            "requests_per_day_7d": round(per_day, 2), "models": models}
