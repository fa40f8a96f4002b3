"""The completion service: the chat path (``tollway.gateway.chat``, its stages) and embeddings, over the
shared steps in ``tollway.gateway.calls``. Built once in the lifespan; the hot endpoints call it."""

from __future__ import annotations

from tollway.gateway.accounting import format_cost, usage_of
from tollway.gateway.calls import (
    INPUT_MARGIN,
    INPUT_SLACK,
    CallContext,
    Calls,
    JSONResult,
    StreamResult,
    reserved_input,
    reserved_output,
)
from tollway.gateway.chat import PROMPT_ALIAS, Chat
from tollway.gateway.exchange import Parts
from tollway.gateway.keys import Principal
from tollway.gateway.protocol import EmbeddingRequest, parse_json_object, validate
from tollway.gateway.shadow import Shadows
from tollway.gateway.streaming import BodyReader
from tollway.jsontypes import JSON
from tollway.routing import ChainFailed, Router, Usage, count_text

__all__ = ["INPUT_MARGIN", "INPUT_SLACK", "CallContext", "CompletionService", "JSONResult", "StreamResult",
           "reserved_output"]


class CompletionService:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None) -> None:
        self.calls = calls
        self.router = router
        self.chat = Chat(calls, router, parts=parts, shadows=shadows)

    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        calls = self.calls
        tally = calls.open(ctx, "embeddings")
        with tally.closed_on_error():
            body = await read_body()
            data = parse_json_object(body)
            req = validate(EmbeddingRequest, data)
            tally.row.end_user = ctx.header_user or req.user
            entry = calls.resolve(ctx.principal, req.model, "embedding")
            assert entry is not None
            tally.bind(entry)
            texts = req.input if isinstance(req.input, list) else [req.input]
            tokens = sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                         for t in texts)
            rules = await calls.rules(ctx.principal.tenant_id)
            worst = Usage(input_tokens=reserved_input(tokens)) if calls.bounded(rules, ctx.principal) else None
            admission = await calls.admit(ctx, tally, rules, body, [entry], worst)
            # Embedding models are never swapped for one another (their vectors are not comparable):
            # only the replicas of this model are balanced and retried.
            try:
                served = await self.router.call(self.router.direct(entry), dict(data), stream=False,
                                                endpoint="embeddings")
            except ChainFailed as failed:
                raise failed.error from None
            served.release(True)
            tally.bind(entry, replica=served.replica)
            assert served.response is not None
            response = served.response
            usage, source = usage_of(response.get("usage")), "upstream"
            if usage is None:
                usage, source = Usage(input_tokens=tokens), "estimated"
            response["model"] = entry.name
            cost = tally.close(200, usage=usage, usage_source=source)
            headers = {"x-tollway-model": entry.name, "x-tollway-cost-usd": format_cost(cost)}
            if admission is not None:
                headers.update(admission.headers)
            return JSONResult(response, headers)

    def models(self, principal: Principal) -> JSON:
        catalog = self.router.catalog
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                for m in catalog.models.values() if principal.may_use(m.name)]
        aliases = sorted(catalog.auto_aliases)
        prompts = self.chat.parts.prompts
        if prompts is not None and prompts.offers(principal.tenant_id):
            aliases.append(PROMPT_ALIAS)  # "the model the prompt names", once the tenant has prompts
        data += [{"id": alias, "object": "model", "created": 0, "owned_by": "tollway"} for alias in aliases]
        return {"object": "list", "data": data}
