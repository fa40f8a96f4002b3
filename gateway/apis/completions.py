"""``/v1/completions`` (OpenAI's legacy text completions, as vLLM-style clients send them), through the chat
path so every part applies unchanged: budgets and their stream cuts, routing and fallback, retrieval,
guards, the ledger (endpoint ``completions``).

The prompt becomes the one user message of a chat request and the answer is translated back: ``text``
instead of ``message.content``, ``text_completion`` chunks instead of ``chat.completion.chunk``. So the
upstream applies its chat template: a client that sends a prompt already laid out in a model's template
gets it wrapped once more (send those to the upstream's own ``/v1/completions``). What has no chat
equivalent is refused with a 400 naming the field: several prompts in one request, token-id prompts,
``suffix``, ``echo``, ``best_of`` above 1, ``logprobs``. OpenAI's default ``max_tokens`` for this endpoint
(16) applies when the request names none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from tollway.errors import InvalidRequest
from tollway.gateway.chat.calls import CallContext, JSONResult, StreamResult
from tollway.gateway.http.protocol import parse_json_object
from tollway.gateway.http.streaming import BodyReader
from tollway.jsontypes import JSON

DEFAULT_MAX_TOKENS = 16  # OpenAI's default on /v1/completions (chat has none)
_CHAT_FIELDS = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user", "metadata",
                "retrieval")


def chat_body(data: JSON) -> JSON:
    """The chat request a completions request stands for; a 400 for what has no chat equivalent."""
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest("Tollway serves one prompt per completions request: send the others separately.",
                                 param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string (token-id prompts are not served).", param="prompt")
    if data.get("suffix"):
        raise InvalidRequest("suffix (insertion) is not served.", param="suffix")
    if data.get("echo"):
        raise InvalidRequest("echo is not served.", param="echo")
    if data.get("best_of") not in (None, 1):
        raise InvalidRequest("best_of above 1 is not served; use n.", param="best_of")
    if data.get("logprobs") is not None:
        raise InvalidRequest("logprobs is not served on completions.", param="logprobs")
    unknown = sorted(k for k in data if k not in (*_CHAT_FIELDS, "prompt", "suffix", "echo", "best_of", "logprobs"))
    if unknown:
        raise InvalidRequest(f"Unsupported field '{unknown[0]}' on /v1/completions.", param=unknown[0],
                             code="unsupported_field")
    body = {k: data[k] for k in _CHAT_FIELDS if k in data}
    body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    body["messages"] = [{"role": "user", "content": prompt}]
    return body


def _choice(choice: JSON) -> JSON:
    text = (choice.get("message") or choice.get("delta") or {}).get("content") or ""
    return {"index": choice.get("index", 0), "text": text, "logprobs": None,
            "finish_reason": choice.get("finish_reason")}


def text_completion(answer: JSON) -> JSON:
    """A chat completion as a text completion (its usage and ``tollway`` object kept)."""
    out = {k: v for k, v in answer.items() if k not in ("object", "choices", "system_fingerprint")}
    out["object"] = "text_completion"
    out["id"] = str(answer.get("id", "")).replace("chatcmpl-", "cmpl-", 1)
    out["choices"] = [_choice(c) for c in answer.get("choices") or []]
    return out


async def text_frames(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A chat stream's SSE frames as a text completion stream's: chunks translated, a chunk that only
    announces the role dropped, errors and ``[DONE]`` as they are."""
    async for event in sse_frames(frames):
        out = _event(event)
        if out is not None:
            yield out


async def chat_stream(frames: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, Any]]:
    """A chat stream for another API's translation, one item per frame: ``("chunk", dict)``, ``("done", None)``
    at ``[DONE]``, ``("error", value)`` when the stream was cut (a budget, a guard, the upstream; ``value``: the
    frame's ``error``), ``("comment", frame)`` for a keep-alive. Nothing follows a done or an error, but the chat
    stream is still read to its end: its ledger row is written there."""
    ended = False
    async for frame in sse_frames(frames):
        if ended:
            continue
        if frame.startswith(b":"):
            yield "comment", frame
            continue
        if not frame.startswith(b"data: "):
            continue
        if frame.startswith(b"data: [DONE]"):
            ended = True
            yield "done", None
            continue
        try:
            chunk = orjson.loads(frame[6:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(chunk, dict) and "error" in chunk:
            ended = True
            yield "error", chunk["error"]
        elif isinstance(chunk, dict):
            yield "chunk", chunk


async def sse_frames(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Server-sent events, one whole frame at a time (without its blank line), from pieces cut anywhere."""
    pending = b""
    async for piece in frames:
        pending += piece
        while b"\n\n" in pending:
            frame, pending = pending.split(b"\n\n", 1)
            yield frame
    if pending.strip():
        yield pending


def _event(event: bytes) -> bytes | None:
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return event + b"\n\n"
    try:
        chunk = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return event + b"\n\n"
    if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
        return event + b"\n\n"
    choices = chunk.get("choices") or []
    announces = choices and all(not (c.get("delta") or {}).get("content") and c.get("finish_reason") is None
                                for c in choices)
    if announces and "usage" not in chunk and "tollway" not in chunk:
        return None
    return b"data: " + orjson.dumps(text_completion(chunk)) + b"\n\n"


async def through_chat(chat: Any, ctx: CallContext, read_body: BodyReader, endpoint: str,
                       request: Callable[[JSON], JSON], answer: Callable[[JSON], JSON],
                       stream: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]) -> JSONResult | StreamResult:
    """Another API's request through the chat path (``chat``: ``Chat``, whose ledger row names ``endpoint``):
    ``request`` makes the chat body of its JSON, ``answer`` and ``stream`` translate the result back."""
    body = orjson.dumps(request(parse_json_object(await read_body())))

    async def translated() -> bytes:
        return body

    result = await chat(ctx, translated, endpoint=endpoint)
    if isinstance(result, JSONResult):
        return JSONResult(answer(result.payload), result.headers)
    return StreamResult(stream(result.frames), result.headers)


async def completions(chat: Any, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
    return await through_chat(chat, ctx, read_body, "completions", chat_body, text_completion, text_frames)
