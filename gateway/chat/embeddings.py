"""The embeddings path: named stages over one ``Embedding``, like the chat path's, and the same shared
steps (``tollway.gateway.chat.calls``):

    parse -> authorize -> admit -> embed -> respond

An embedding model is never swapped for another (their vectors are not comparable): only its replicas
are balanced and retried. The packaged local model (when configured) answers in process.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tollway.errors import InvalidRequest, ServiceUnavailable
from tollway.gateway.chat.calls import CallContext, Calls, JSONResult, reserved_input
from tollway.gateway.chat.wire import usage_of
from tollway.gateway.http.protocol import EmbeddingRequest, parse_json_object, validate
from tollway.gateway.http.streaming import BodyReader
from tollway.gateway.metering.accounting import Tally, format_cost
from tollway.gateway.metering.quota import Admission
from tollway.gateway.parts.rag import LOCAL_ENTRY
from tollway.jsontypes import JSON
from tollway.retrieval import LOCAL_DIMS, EmbedderError, LocalEmbedder
from tollway.routing import ChainFailed, ModelEntry, Router, Usage, count_text, off_loop_if_long


@dataclass(slots=True)
class Embedding:
    """One embeddings request on its way through the stages."""

    tally: Tally
    read_body: BodyReader
    ctx: CallContext
    body: bytes = b""
    data: JSON = field(default_factory=dict)
    request: EmbeddingRequest | None = None
    texts: list[Any] = field(default_factory=list)
    entry: ModelEntry | None = None
    tokens: int = 0  # the input as counted before the call (the reservation, and the estimate)
    admission: Admission | None = None
    answer: JSON | None = None
    usage: tuple[Usage, str] | None = None  # and its source
    result: JSONResult | None = None

    @property
    def local(self) -> bool:
        return self.entry is LOCAL_ENTRY

    def need_entry(self) -> ModelEntry:
        assert self.entry is not None, "the authorize stage runs first"
        return self.entry


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: Callable[[Embeddings, Embedding], Awaitable[None]]


class Embeddings:
    def __init__(self, calls: Calls, router: Router, local: LocalEmbedder | None) -> None:
        self.calls, self.router, self.local = calls, router, local

    async def __call__(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        em = Embedding(tally=self.calls.open(ctx, "embeddings"), read_body=read_body, ctx=ctx)
        with em.tally.closed_on_error():
            for stage in EMBEDDING_STAGES:
                await stage.run(self, em)
        assert em.result is not None
        return em.result

    async def parse(self, em: Embedding) -> None:
        em.body = await em.read_body()
        data = em.data = parse_json_object(em.body)
        req = em.request = validate(EmbeddingRequest, data)
        self.router.check_fields("embeddings", data)
        em.tally.request(end_user=em.ctx.header_user or req.user)
        em.texts = req.input if isinstance(req.input, list) else [req.input]
        _check_input(em.texts)

    async def authorize(self, em: Embedding) -> None:
        """The key may embed with this model (or the packaged local one)."""
        assert em.request is not None
        em.entry = self.calls.resolve(em.ctx.principal, em.request.model, "embedding",
                                      also=LOCAL_ENTRY if self.local is not None else None)
        if em.local:
            _check_local(em.request, em.texts, em.data.get("encoding_format"), em.data.get("dimensions"))
        em.tally.bind(em.need_entry(), replica="local" if em.local else None)
        def count() -> int:
            return sum(count_text(t) if isinstance(t, str) else (len(t) if isinstance(t, list) else 1)
                       for t in em.texts)

        em.tokens = await off_loop_if_long(sum(len(t) for t in em.texts if isinstance(t, str)), count)

    async def admit(self, em: Embedding) -> None:
        rules = await self.calls.rules(em.ctx.principal.tenant_id)
        worst = Usage(input_tokens=reserved_input(em.tokens)) if self.calls.bounded(rules, em.ctx.principal) else None
        em.admission = await self.calls.admit(em.ctx, em.tally, rules, em.body, [em.need_entry()], worst)

    async def embed(self, em: Embedding) -> None:
        if em.local:
            em.answer, usage = await self._locally([str(t) for t in em.texts], em.data.get("encoding_format"),
                                                   em.ctx.principal.tenant_id)
            em.usage = usage, "local"
            return
        entry = em.need_entry()
        try:
            served = await self.router.call(self.router.direct(entry), dict(em.data), stream=False,
                                            endpoint="embeddings")
        except ChainFailed as failed:
            raise failed.error from None
        served.release(True)
        em.tally.bind(entry, replica=served.replica)
        assert served.response is not None
        em.answer = served.response
        reported = usage_of(em.answer.get("usage"))
        em.usage = (reported, "upstream") if reported is not None else (Usage(input_tokens=em.tokens), "estimated")

    async def respond(self, em: Embedding) -> None:
        assert em.answer is not None and em.usage is not None
        entry = em.need_entry()
        usage, source = em.usage
        cost = em.tally.close(200, usage=usage, usage_source=source)
        headers = {"x-tollway-model": entry.name, "x-tollway-cost-usd": format_cost(cost),
                   "x-tollway-price-source": entry.price.source}
        if em.admission is not None:
            headers.update(em.admission.headers)
        em.result = JSONResult({**em.answer, "model": entry.name}, headers)

    async def _locally(self, texts: list[str], encoding: Any, owner: int) -> tuple[JSON, Usage]:
        """The packaged embedding model, in process (tenants served in turn: ``owner``), answered in the OpenAI
        shape."""
        assert self.local is not None
        try:
            embedded = await self.local.embed(texts, owner=owner)
        except EmbedderError as exc:
            raise ServiceUnavailable(f"The embedding model failed: {exc}", code="embedder_failed") from exc

        def encode(row: Any) -> Any:
            return base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding == "base64" else row.tolist()

        response = {"object": "list", "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens},
                    "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                             for i, v in enumerate(embedded.vectors)]}
        return response, Usage(input_tokens=embedded.tokens)


MAX_INPUTS = 2048  # OpenAI's bound on one request's inputs


def _check_input(texts: list[Any]) -> None:
    """What OpenAI's embeddings endpoint refuses, refused the same way for every model before anything is
    spent: no input, an empty string or token list, more than ``MAX_INPUTS`` inputs (an upstream would answer
    an empty list with no vectors, a 200 the SDK cannot read)."""
    if not texts:
        raise InvalidRequest("input may not be empty: give a string or a list of strings.", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"input may hold at most {MAX_INPUTS} items; this one holds {len(texts)}.",
                             param="input")
    for i, t in enumerate(texts):
        if isinstance(t, str | list) and not t:
            raise InvalidRequest("input may not hold an empty string or an empty list of tokens.",
                                 param=f"input[{i}]" if len(texts) > 1 or isinstance(t, list) else "input")


def _check_local(req: EmbeddingRequest, texts: list[Any], encoding: Any, dimensions: Any) -> None:
    """The packaged model embeds text (not token ids) and answers floats or base64, in its own dimensions
    (it cannot shorten its vectors: a client asking for fewer would store vectors of another size)."""
    if not all(isinstance(t, str) for t in texts):  # (an empty input never gets here: ``_check_input``)
        raise InvalidRequest(f"'{req.model}' embeds text: input must be a string or a list of strings.",
                             param="input")
    if encoding not in (None, "float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format")
    if dimensions is not None and dimensions != LOCAL_DIMS:
        raise InvalidRequest(f"'{req.model}' answers {LOCAL_DIMS}-dimensional vectors and cannot shorten them; "
                             f"leave dimensions out or set it to {LOCAL_DIMS}.", param="dimensions",
                             code="unsupported_parameter")


EMBEDDING_STAGES: tuple[Stage, ...] = (
    Stage("parse", Embeddings.parse),
    Stage("authorize", Embeddings.authorize),
    Stage("admit", Embeddings.admit),
    Stage("embed", Embeddings.embed),
    Stage("respond", Embeddings.respond),
)
