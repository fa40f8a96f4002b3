"""The answer on its way out, one small step per concern, the same for every answer (an upstream stream,
an upstream JSON answer, a cached one, the degraded one):

    account (what the upstream produced, charged whatever happens next; the output cap)
      -> output transformers, in order (each may rewrite or hold back chunks: the guard's window)
        -> emit (rename the model, keep or strip usage as asked, the final chunk carries ``tollway``)

The cache and shadows read the text after the transformers, as the client got it. A stream that
outgrows its reservation is cut with an error frame and ``[DONE]``; an unexpected failure after the
headers is an error frame too, and a 500 in the ledger; a client that leaves is a 499 charged for
what was produced.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, Protocol

import orjson

from tollway.errors import TollwayError
from tollway.gateway.chat.exchange import OutputFilter
from tollway.gateway.chat.wire import (
    REASONING,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    choice_text,
    plain,
    produced_text,
    usage_json,
    usage_of,
)
from tollway.gateway.metering.accounting import CLIENT_CLOSED, INTERNAL_ERROR, Tally
from tollway.jsontypes import JSON
from tollway.routing import Usage, count_text

log = logging.getLogger("tollway.gateway")
DONE = b"data: [DONE]\n\n"


def sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ReservationExceeded(TollwayError):
    status = 502
    type = "api_error"
    code = "reservation_exceeded"


# -- account --------------------------------------------------------------------------------------
class Accountant:
    """Counts what the upstream produced, before anything rewrites it: that is what it costs."""

    def __init__(self, tally: Tally, *, output_cap: int | None = None,
                 estimate: Callable[[str, int], Usage] | None = None, fixed: tuple[Usage, str] | None = None) -> None:
        self.tally = tally
        self.output_cap = output_cap  # output tokens reserved for this answer; None: not budgeted
        self.estimate = estimate
        self.fixed = fixed  # a cached or degraded answer: its usage is known and nothing is counted
        self.usage: Usage | None = None
        self.text: list[str] = []
        self.produced = 0  # output tokens counted so far (at least one per content chunk)
        self.finish_reason: str | None = None
        self.plain_text = True  # only text content so far (no tool calls): an answer the cache can replay

    def take(self, chunk: JSON) -> None:
        usage = usage_of(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0 or any(k not in ("role", "content") for k in choice.get("delta") or {}):
                self.plain_text = False
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        text = produced_text(chunk, "delta")  # a tool call's arguments and reasoning are output tokens too
        if not text:
            return
        self.tally.first_token()
        if self.fixed is not None:
            return
        tokens = max(1, count_text(text))
        if self.output_cap is not None and self.produced + tokens > self.output_cap:
            raise ReservationExceeded(
                f"The upstream kept generating past max_tokens ({self.output_cap}); the stream was cut at "
                "the reserved amount.")
        self.text.append(text)
        self.produced += tokens

    def settled(self) -> tuple[Usage, str]:
        if self.fixed is not None:
            return self.fixed
        if self.usage is not None:
            return self.usage, "upstream"
        assert self.estimate is not None
        return self.estimate("".join(self.text), self.produced), "estimated"


# -- transform --------------------------------------------------------------------------------------
async def through(filters: Sequence[OutputFilter], chunks: list[JSON]) -> list[JSON]:
    """Chunks through every filter in order (each may emit none, one or several for one it took)."""
    for f in filters:
        out: list[JSON] = []
        for chunk in chunks:
            out += await f.chunk(chunk)
        chunks = out
    return chunks


async def ended(filters: Sequence[OutputFilter]) -> list[JSON]:
    """The upstream is done: each filter releases what it held, and that goes through the filters after it."""
    pending: list[JSON] = []
    for f in filters:
        out: list[JSON] = []
        for chunk in pending:
            out += await f.chunk(chunk)
        pending = out + await f.end()
    return pending


def as_chunks(payload: JSON, *, include_usage: bool = False) -> list[JSON]:
    """A whole chat.completion as the chunks a stream of it would have: role and content per choice, the
    finish reasons, the usage chunk when asked for."""
    def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
        return {"id": payload.get("id"), "object": "chat.completion.chunk", "created": payload.get("created"),
                "model": payload.get("model"), "choices": choices}

    choices = [c for c in payload.get("choices") or [] if isinstance(c, dict)]
    chunks = [chunk([{"index": c.get("index", 0), "finish_reason": None,
                      "delta": {k: v for k, v in (c.get("message") or {}).items() if v is not None}}])
              for c in choices]
    chunks.append(chunk([{"index": c.get("index", 0), "delta": {}, "finish_reason": c.get("finish_reason")}
                         for c in choices]))
    if include_usage:
        chunks.append({**chunk([]), "usage": payload.get("usage")})
    return [plain(c) for c in chunks]


async def transform_whole(filters: Sequence[OutputFilter], payload: JSON) -> JSON:
    """A whole answer through the same filters a stream goes through: its text as one chunk per choice."""
    if not filters:
        return payload
    out = await through(filters, as_chunks(payload)) + await ended(filters)
    texts: dict[tuple[int, str], list[str]] = {}  # per choice and field: its content, its reasoning
    finish: dict[int, Any] = {}
    for chunk in out:
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            for name, value in (choice.get("delta") or {}).items():
                if name in GUARDED and isinstance(value, str):
                    texts.setdefault((index, name), []).append(value)
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    choices = []
    for choice in payload.get("choices") or []:
        index = choice.get("index", 0)
        message = dict(choice.get("message") or {})
        for name in GUARDED:
            if isinstance(message.get(name), str) or (index, name) in texts:
                message[name] = "".join(texts.get((index, name), []))
        choices.append({**choice, "message": message, "finish_reason": finish.get(index, choice.get("finish_reason"))})
    return {**payload, "choices": choices}


GUARDED = ("content", *REASONING)  # what output filters read and rewrite of a message


# -- emit -------------------------------------------------------------------------------------------
def _final(chunk: JSON) -> bool:
    """A chunk that may be the last one: it ends a choice, or it is the usage chunk."""
    if chunk.get("usage") is not None and not chunk.get("choices"):
        return True
    return any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices") or [])


class Emitter:
    """Shapes chunks for the client. A chunk that may be the last is held until the next one comes or the
    answer ends, so the ``tollway`` object rides on the final chunk (the one with ``finish_reason``, or the
    usage chunk when the client asked for usage), never as a frame of its own."""

    def __init__(self, model: str, *, wants_usage: bool) -> None:
        self.model = model
        self.wants_usage = wants_usage
        self.text: list[str] = []  # what reached the client
        self.held: JSON | None = None
        self.sent_usage = False
        self.last: JSON = {}

    def emit(self, chunk: JSON) -> bytes:
        chunk["model"] = self.model
        self.last = chunk
        if chunk.get("usage") is not None:
            if not self.wants_usage:
                chunk.pop("usage")
                if not chunk.get("choices"):
                    return b""
            else:
                self.sent_usage = True
        text = choice_text(chunk, "delta")
        if text:
            self.text.append(text)
        previous, frame = self.held, b""
        if previous is not None:
            self.held = None
            frame = sse(previous)
        if _final(chunk):
            self.held = chunk
            return frame
        return frame + sse(chunk)

    def finish(self, info: JSON, usage: Usage) -> bytes:
        """The last frames: the usage chunk the client was promised if the upstream sent none, with the
        ``tollway`` object on the final chunk."""
        frame = b""
        if self.wants_usage and not self.sent_usage:
            if self.held is not None:
                frame = sse(self.held)
            usage_chunk: ChatCompletionChunk = {
                "id": self.last.get("id"), "object": "chat.completion.chunk", "created": self.last.get("created"),
                "model": self.model, "choices": [], "usage": usage_json(usage)}
            self.held = plain(usage_chunk)
        if self.held is not None:
            self.held["tollway"] = info
            frame += sse(self.held)
            self.held = None
        return frame

    def answer(self, finish_reason: str, usage: Usage) -> JSON:
        """What the client got, as one chat.completion (the response cache keeps it)."""
        answer: ChatCompletion = {
            "id": self.last.get("id"), "object": "chat.completion", "created": self.last.get("created"),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                         "finish_reason": finish_reason}],
            "usage": usage_json(usage)}
        return plain(answer)


# -- the relay --------------------------------------------------------------------------------------
class RelayEnd(Protocol):
    """How a relayed answer ends, as the chat path decides it."""

    def settle(self, status: int, code: str | None, usage: Usage, source: str) -> Decimal:
        """Close the request's tally (idempotent); its cost."""
        ...

    def info(self, cost: Decimal) -> JSON:
        """The ``tollway`` object of the final chunk."""
        ...

    async def close_upstream(self) -> None: ...

    def closed(self, status: int) -> None:
        """Runs last: hand the replica back, then the work after the answer."""
        ...


class StreamRelay:
    """Chunks in (``head`` first: read before the first token), server-sent events out; ``end`` settles
    the request and runs what follows it."""

    def __init__(self, chunks: AsyncIterator[JSON] | None, head: Iterable[JSON], *, accountant: Accountant,
                 filters: Sequence[OutputFilter], emitter: Emitter, end: RelayEnd) -> None:
        self.chunks, self.head = chunks, head
        self.accountant, self.filters, self.emitter = accountant, filters, emitter
        self.end = end

    async def _source(self) -> AsyncIterator[JSON]:
        for chunk in self.head:
            yield chunk
        if self.chunks is not None:
            async for chunk in self.chunks:
                yield chunk

    async def _frames(self) -> AsyncIterator[bytes]:
        async for chunk in self._source():
            self.accountant.take(chunk)
            for out in await through(self.filters, [chunk]) if self.filters else (chunk,):
                if frame := self.emitter.emit(out):
                    yield frame
            if self.filters and any(getattr(f, "done", False) for f in self.filters):
                break  # a guard ended every choice: stop reading (and paying for) the upstream
        for out in await ended(self.filters):
            if frame := self.emitter.emit(out):
                yield frame

    async def frames(self) -> AsyncIterator[bytes]:
        status: int = CLIENT_CLOSED
        code: str | None = "client_disconnected"
        try:
            try:
                async for frame in self._frames():
                    yield frame
                usage, source = self.accountant.settled()
                cost = self.end.settle(200, None, usage, source)
                status, code = 200, None
                yield self.emitter.finish(self.end.info(cost), usage)
            except TollwayError as exc:
                status, code = exc.status, exc.code
                if isinstance(exc, ReservationExceeded):
                    self.accountant.usage = None  # charge what was relayed, not what the upstream claims it made
                yield sse(exc.body())
            except Exception:
                log.exception("stream of %s failed", self.accountant.tally.row.request_id)
                status, code = 500, INTERNAL_ERROR
                yield sse(TollwayError("The gateway failed while streaming; the request id identifies it in "
                                       "the logs.").body())
            yield DONE
        finally:
            await self.end.close_upstream()
            usage, source = self.accountant.settled()
            self.end.settle(status, code, usage, source)
            self.end.closed(status)
