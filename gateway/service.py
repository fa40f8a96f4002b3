"""The completion service: the chat path (``tollway.gateway.chat``, its stages) and embeddings, over the
shared steps in ``tollway.gateway.calls``. Built once in the lifespan; the hot endpoints call it."""

from __future__ import annotations

import base64
from typing import Any

from tollway.errors import InvalidRequest, ServiceUnavailable
from tollway.gateway.accounting import Tally, format_cost, usage_of
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
from tollway.gateway.quality import LiveQuality
from tollway.gateway.rag import LOCAL_ENTRY
from tollway.gateway.shadow import Shadows
from tollway.gateway.streaming import BodyReader
from tollway.jsontypes import JSON
from tollway.retrieval import EmbedderError, LocalEmbedder
from tollway.routing import ChainFailed, ModelEntry, Router, Usage, count_text

__all__ = ["INPUT_MARGIN", "INPUT_SLACK", "CallContext", "CompletionService", "JSONResult", "StreamResult",
           "reserved_output"]


class CompletionService:
    def __init__(self, calls: Calls, router: Router, *, parts: Parts | None = None,
                 shadows: Shadows | None = None, local: LocalEmbedder | None = None,
                 quality: LiveQuality | None = None) -> None:
        self.calls = calls
        self.router = router
        self.local = local  # the packaged embedding model, served in process
        self.chat = Chat(calls, router, parts=parts, shadows=shadows, quality=quality)

    async def embeddings(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        calls = self.calls
        tally = calls.open(ctx, "embeddings")
        with tally.closed_on_error():
            body = await read_body()
            data = parse_json_object(body)
            req = validate(EmbeddingRequest, data)
            self.router.check_fields("embeddings", data)
            tally.row.end_user = ctx.header_user or req.user
            entry = calls.resolve(ctx.principal, req.model, "embedding",
                                  also=LOCAL_ENTRY if self.local is not None else None)
            assert entry is not None
            local = entry is LOCAL_ENTRY
            texts = req.input if isinstance(req.input, list) else [req.input]
            if local:
                _check_local(req, texts, data.get("encoding_format"))
            tally.bind(entry, replica="local" if local else None)
            tokens = sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                         for t in texts)
            rules = await calls.rules(ctx.principal.tenant_id)
            worst = Usage(input_tokens=reserved_input(tokens)) if calls.bounded(rules, ctx.principal) else None
            admission = await calls.admit(ctx, tally, rules, body, [entry], worst)
            if local:
                response, usage, source = await self._embed_locally([str(t) for t in texts],
                                                                    data.get("encoding_format"))
            else:
                response, usage, source = await self._embed_upstream(entry, data, tally, tokens)
            response["model"] = entry.name
            cost = tally.close(200, usage=usage, usage_source=source)
            headers = {"x-tollway-model": entry.name, "x-tollway-cost-usd": format_cost(cost)}
            if admission is not None:
                headers.update(admission.headers)
            return JSONResult(response, headers)

    async def _embed_upstream(self, entry: ModelEntry, data: JSON, tally: Tally,
                              tokens: int) -> tuple[JSON, Usage, str]:
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
        usage = usage_of(response.get("usage"))
        return (response, usage, "upstream") if usage is not None else \
            (response, Usage(input_tokens=tokens), "estimated")

    async def _embed_locally(self, texts: list[str], encoding: Any) -> tuple[JSON, Usage, str]:
        """The packaged embedding model, in process, answered in the OpenAI shape."""
        assert self.local is not None
        try:
            embedded = await self.local.embed(texts)
        except EmbedderError as exc:
            raise ServiceUnavailable(f"The embedding model failed: {exc}", code="embedder_failed") from exc

        def encode(row: Any) -> Any:
            return base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding == "base64" else row.tolist()

        response = {"object": "list", "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens},
                    "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                             for i, v in enumerate(embedded.vectors)]}
        return response, Usage(input_tokens=embedded.tokens), "local"

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


def _check_local(req: EmbeddingRequest, texts: list[Any], encoding: Any) -> None:
    """The packaged model embeds text (not token ids) and answers floats or base64."""
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest(f"'{req.model}' embeds text: input must be a string or a list of strings.",
                             param="input")
    if encoding not in (None, "float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format")
