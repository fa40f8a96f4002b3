"""The chat path's prompt stage, served by the prompts part's in-memory registry (no git or database read
on the request path)."""

from __future__ import annotations

from tollway.gateway.exchange import Exchange, RenderedPrompt
from tollway.jsontypes import JSON
from tollway.prompts import Registry


class RegistryPrompts:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def offers(self, tenant_id: int) -> bool:
        return self.registry.has(tenant_id)

    async def render(self, ex: Exchange, ref: JSON) -> RenderedPrompt:
        subject = ex.tally.row.end_user or f"key:{ex.ctx.principal.key_id}"  # whose split bucket applies
        r = await self.registry.render(ex.ctx.principal.tenant_id, subject, ref)
        return RenderedPrompt(r.name, r.version, r.messages, r.model, r.params, r.guards, r.label)
