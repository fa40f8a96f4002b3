"""Relaying an opened upstream stream to the client, one small step per concern:

- framing: parse nothing twice, rename the model, keep or strip the usage chunk as the client asked;
- accounting: count what was produced, so a cut or a disconnect is charged for exactly that;
- guarding the reservation: an upstream that ignores ``max_tokens`` is cut off before the stream
  outgrows what was reserved, with a final error frame and ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from tollway.errors import TollwayError
from tollway.gateway.accounting import CLIENT_CLOSED, Tally, usage_json, usage_of
from tollway.routing import ModelEntry, UpstreamStream, Usage, count_text

JSON = dict[str, Any]
DONE = b"data: [DONE]\n\n"


def sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def choice_text(payload: JSON, part: str) -> str:
    """The text content of every choice: ``part`` is "delta" for stream chunks, "message" for answers."""
    texts = []
    for choice in payload.get("choices") or []:
        body = choice.get(part) if isinstance(choice, dict) else None
        if isinstance(body, dict) and isinstance(body.get("content"), str):
            texts.append(body["content"])
    return "".join(texts)


class ReservationExceeded(TollwayError):
    status = 502
    type = "api_error"
    code = "reservation_exceeded"


class StreamRelay:
    def __init__(self, tally: Tally, entry: ModelEntry, stream: UpstreamStream, chunks: AsyncIterator[JSON],
                 *, wants_usage: bool, output_cap: int | None, estimate: Callable[[str, int], Usage],
                 on_close: Callable[[StreamRelay, int], None] | None = None) -> None:
        self.tally, self.entry, self.stream, self.chunks = tally, entry, stream, chunks
        self.on_close = on_close  # after settlement: release the replica, feed shadow samples
        self.wants_usage = wants_usage
        self.output_cap = output_cap  # output tokens reserved for this stream; None: not budgeted
        self.estimate = estimate
        self.usage: Usage | None = None
        self.last: JSON = {}
        self.text: list[str] = []
        self.produced = 0  # output tokens counted so far (at least one per content chunk)
        self.finish_reason: str | None = None
        self.plain_text = True  # only text content so far (no tool calls): a stream the cache can replay

    def _frame(self, chunk: JSON) -> bytes | None:
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
        text = choice_text(chunk, "delta")
        if text:
            tokens = max(1, count_text(text))
            if self.output_cap is not None and self.produced + tokens > self.output_cap:
                raise ReservationExceeded(
                    f"The upstream kept generating past max_tokens ({self.output_cap}); the stream was cut at "
                    "the reserved amount.")
            self.tally.first_token()
            self.text.append(text)
            self.produced += tokens
        chunk["model"] = self.entry.name
        self.last = chunk
        if not self.wants_usage:
            chunk.pop("usage", None)
            if usage is not None and not chunk.get("choices"):
                return None
        return sse(chunk)

    def _settled_usage(self) -> tuple[Usage, str]:
        if self.usage is not None:
            return self.usage, "upstream"
        return self.estimate("".join(self.text), self.produced), "estimated"

    def answer(self) -> JSON | None:
        """The finished stream as one chat.completion (for the response cache), if it was plain text."""
        if not self.plain_text or self.finish_reason is None:
            return None
        usage, _ = self._settled_usage()
        return {"id": self.last.get("id"), "object": "chat.completion", "created": self.last.get("created"),
                "model": self.entry.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                             "finish_reason": self.finish_reason}],
                "usage": usage_json(usage)}

    def _usage_frame(self) -> bytes:
        usage, _ = self._settled_usage()
        return sse({"id": self.last.get("id"), "object": "chat.completion.chunk",
                    "created": self.last.get("created"), "model": self.entry.name, "choices": [],
                    "usage": usage_json(usage)})

    async def frames(self, head: list[JSON]) -> AsyncIterator[bytes]:
        """``head``: chunks already read from the upstream (up to its first token)."""
        status: int = CLIENT_CLOSED
        code: str | None = "client_disconnected"
        try:
            try:
                for chunk in head:
                    frame = self._frame(chunk)
                    if frame is not None:
                        yield frame
                async for chunk in self.chunks:
                    frame = self._frame(chunk)
                    if frame is not None:
                        yield frame
                status, code = 200, None
                if self.wants_usage and self.usage is None:
                    yield self._usage_frame()  # the client was promised a usage chunk
            except TollwayError as exc:
                status, code = exc.status, exc.code
                if isinstance(exc, ReservationExceeded):
                    self.usage = None  # charge what was relayed, not what the upstream claims it made
                yield sse(exc.body())
            yield DONE
        finally:
            await self.stream.aclose()
            usage, source = self._settled_usage()
            self.tally.close(status, code, usage=usage, usage_source=source)
            if self.on_close is not None:
                self.on_close(self, status)
