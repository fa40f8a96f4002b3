"""The chat path's prompt stage, served by the prompts part's in-memory registry (no git or database read
on the request path)."""

from __future__ import annotations

from tollway.gateway.chat.exchange import ChatView, RenderedPrompt
from tollway.jsontypes import JSON
from tollway.prompts import Registry


class RegistryPrompts:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def offers(self, tenant_id: int) -> bool:
        return self.registry.has(tenant_id)

    async def render(self, view: ChatView, ref: JSON) -> RenderedPrompt:
        r = await self.registry.render(view.tenant_id, view.subject, ref)  # the subject's split bucket applies
        return RenderedPrompt(r.name, r.version, r.messages, r.model, r.params, r.guards, r.label)
