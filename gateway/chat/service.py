"""The completion service: the chat path (``tollway.gateway.chat.stages``) and the embeddings path
(``tollway.gateway.chat.embeddings``), each a list of stages over the shared steps in
``tollway.gateway.chat.calls``. Built once in the lifespan; the hot endpoints call it."""

from __future__ import annotations

from tollway.gateway.apis.completions import completions
from tollway.gateway.apis.messages import messages
from tollway.gateway.apis.responses import Responses
from tollway.gateway.apis.stored import ResponseStore
from tollway.gateway.chat.calls import (
    INPUT_MARGIN,
    INPUT_SLACK,
    CallContext,
    Calls,
    JSONResult,
    StreamResult,
    reserved_output,
)
from tollway.gateway.chat.embeddings import Embeddings
from tollway.gateway.chat.exchange import Parts
from tollway.gateway.chat.moderations import Moderations, Moderator
from tollway.gateway.chat.stages import PROMPT_ALIAS, Chat
from tollway.gateway.http.streaming import BodyReader
from tollway.gateway.quality.sampling import LiveQuality
from tollway.gateway.quality.shadow import Shadows
from tollway.gateway.tenancy.keys import Principal
from tollway.jsontypes import JSON
from tollway.retrieval import LocalEmbedder
from tollway.routing import Router

__all__ = ["INPUT_MARGIN", "INPUT_SLACK", "CallContext", "CompletionService", "JSONResult", "StreamResult",
           "reserved_output"]


class CompletionService:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None, local: LocalEmbedder | None = None,
                 quality: LiveQuality | None = None, moderator: Moderator | None = None,
                 stored: ResponseStore | None = None) -> None:
        self.calls = calls
        self.router = router
        self.local = local  # the packaged embedding model, served in process
        self.chat = Chat(calls, router, parts=parts, shadows=shadows, quality=quality)
        self._embeddings = Embeddings(calls, router, local)
        self._moderations = Moderations(calls, moderator)
        self.stored = stored  # the Responses API's stored responses (None: none are stored)
        self._responses = Responses(self.chat, stored)

    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        return await self._embeddings(ctx, read_body)

    async def completions(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        return await completions(self.chat, ctx, read_body)

    async def messages(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        return await messages(self.chat, ctx, read_body)

    async def responses(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        return await self._responses(ctx, read_body)

    async def moderations(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        return await self._moderations(ctx, read_body)

    def models(self, principal: Principal) -> JSON:
        catalog = self.router.catalog
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                for m in catalog.models.values() if principal.may_use(m.name)]
        if self.local is not None and principal.may_use(self.local.name):
            data.append({"id": self.local.name, "object": "model", "created": 0, "owned_by": "tollway"})
        aliases = sorted(catalog.auto_aliases)
        prompts = self.chat.parts.prompts
        if prompts is not None and prompts.offers(principal.tenant_id):
            aliases.append(PROMPT_ALIAS)  # "the model the prompt names", once the tenant has prompts
        data += [{"id": alias, "object": "model", "created": 0, "owned_by": "tollway"} for alias in aliases]
        return {"object": "list", "data": data}
