"""The completion service: the chat path (``tollway.gateway.chat``, its stages) and embeddings, over the
shared steps in ``tollway.gateway.calls``. Built once in the lifespan; the hot endpoints call it."""

from __future__ import annotations

import base64
from typing import Any

from tollway.errors import InvalidRequest, PermissionDenied, ServiceUnavailable
from tollway.gateway.accounting import Tally, format_cost, usage_of
from tollway.gateway.calls import (
    INFERENCE_ROLES,
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
from tollway.gateway.rag import LOCAL_ENTRY
from tollway.gateway.shadow import Shadows
from tollway.gateway.streaming import BodyReader
from tollway.jsontypes import JSON
from tollway.retrieval import EmbedderError, LocalEmbedder
from tollway.routing import ChainFailed, Router, Usage, count_text

__all__ = ["INPUT_MARGIN", "INPUT_SLACK", "CallContext", "CompletionService", "JSONResult", "StreamResult",
           "reserved_output"]


class CompletionService:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None, local: LocalEmbedder | None = None) -> None:
        self.calls = calls
        self.router = router
        self.local = local  # the packaged embedding model, served in process
        self.chat = Chat(calls, router, parts=parts, shadows=shadows)

    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        calls = self.calls
        tally = calls.open(ctx, "embeddings")
        with tally.closed_on_error():
            body = await read_body()
            data = parse_json_object(body)
            req = validate(EmbeddingRequest, data)
            tally.row.end_user = ctx.header_user or req.user
            if self.local is not None and req.model == self.local.name:
                return await self._local_embeddings(ctx, tally, body, req, data.get("encoding_format"))
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

    async def _local_embeddings(self, ctx: CallContext, tally: Tally, body: bytes, req: EmbeddingRequest,
                                encoding: Any) -> JSONResult:
        """The packaged embedding model, in process: admitted, metered and answered like any other."""
        assert self.local is not None
        principal, calls = ctx.principal, self.calls
        if principal.role not in INFERENCE_ROLES:
            raise PermissionDenied(f"A {principal.role} key may not call models.", code="role_not_allowed")
        if not principal.may_use(self.local.name):
            raise PermissionDenied(f"This key may not use model '{req.model}'.", param="model", code="model_not_allowed")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequest(f"'{req.model}' embeds text: input must be a string or a list of strings.",
                                 param="input")
        if encoding not in (None, "float", "base64"):
            raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format")
        tally.bind(LOCAL_ENTRY, replica="local")
        rules = await calls.rules(principal.tenant_id)
        strings = [str(t) for t in texts]
        worst = Usage(input_tokens=reserved_input(sum(count_text(t) for t in strings)))
        admission = await calls.admit(ctx, tally, rules, body, [LOCAL_ENTRY],
                                      worst if calls.bounded(rules, principal) else None)
        try:
            embedded = await self.local.embed(strings)
        except EmbedderError as exc:
            raise ServiceUnavailable(f"The embedding model failed: {exc}", code="embedder_failed") from exc

        def encode(row: Any) -> Any:
            return base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding == "base64" else row.tolist()

        usage = {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}
        response = {"object": "list", "model": self.local.name, "usage": usage,
                    "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                             for i, v in enumerate(embedded.vectors)]}
        cost = tally.close(200, usage=Usage(input_tokens=embedded.tokens), usage_source="local")
        headers = {"x-tollway-model": self.local.name, "x-tollway-cost-usd": format_cost(cost)}
        if admission is not None:
            headers.update(admission.headers)
        return JSONResult(response, headers)

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
