"""The OpenAI wire, in one place: the shapes of the answers the gateway writes itself (a chat completion,
a stream chunk, a usage object) as TypedDicts mypy checks where they are built, and the helpers that read
any answer (``choice_text``, ``produced_text``, ``usage_of``) or name a request (``new_request_id``).

Answers from upstreams stay plain ``JSON``: they are the upstream's, read defensively."""

from __future__ import annotations

import os
import re
from typing import Any, Literal, NotRequired, TypedDict, cast

from tollway.jsontypes import JSON
from tollway.routing import Usage, call_texts


class UsageJSON(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Message(TypedDict):
    role: Literal["assistant"]
    content: str


class Choice(TypedDict):
    index: int
    message: Message
    finish_reason: str | None


class ChatCompletion(TypedDict):
    id: str | None
    object: Literal["chat.completion"]
    created: int | None
    model: str
    choices: list[Choice]
    usage: UsageJSON
    system_fingerprint: NotRequired[str]


class ChunkChoice(TypedDict):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None


class ChatCompletionChunk(TypedDict):
    id: Any
    object: Literal["chat.completion.chunk"]
    created: Any
    model: Any
    choices: list[ChunkChoice]
    usage: NotRequired[Any]


def plain(answer: ChatCompletion | ChatCompletionChunk) -> JSON:
    """A checked shape handed on as the plain JSON the rest of the path reads and edits."""
    return cast(JSON, answer)


def new_request_id() -> str:
    """A request's id, as clients see it in ``x-request-id`` and the ledger keys it (also for the requests
    the gateway makes itself, such as eval items)."""
    return "req_" + os.urandom(12).hex()


# Every id ``new_request_id`` makes (and the 32 hex digits of the project's first commit): a string of
# another shape was never a request of this gateway's.
REQUEST_ID = re.compile(r"req_[0-9a-f]{24}(?:[0-9a-f]{8})?")


def choice_text(payload: JSON, part: str) -> str:
    """The text content of every choice: ``part`` is "delta" for stream chunks, "message" for answers."""
    texts = []
    for choice in payload.get("choices") or []:
        body = choice.get(part) if isinstance(choice, dict) else None
        if isinstance(body, dict) and isinstance(body.get("content"), str):
            texts.append(body["content"])
    return "".join(texts)


# The reasoning a model sends beside its answer, in a message or a delta (vLLM's reasoning parsers and
# DeepSeek's API: ``reasoning_content``; OpenRouter and newer vLLM: ``reasoning``): it reaches the user as the
# answer does, so output guards read it (``tollway.gateway.parts.guarding``) and it costs output tokens.
REASONING = ("reasoning_content", "reasoning")
# What a model generates as text into a message or a delta: its answer, its reasoning, a refusal.
_GENERATED = ("content", *REASONING, "refusal")


def produced_text(payload: JSON, part: str) -> str:
    """Everything every choice generated, as its output tokens are counted where an upstream reports no usage
    (and a stream is cut at its reservation): the text ``choice_text`` reads, the reasoning and refusals, and
    the names and arguments of the tool (or function) calls."""
    texts: list[str] = []
    for choice in payload.get("choices") or []:
        body = choice.get(part) if isinstance(choice, dict) else None
        if not isinstance(body, dict):
            continue
        texts += (value for field in _GENERATED if isinstance(value := body.get(field), str))
        texts += call_texts(body)
    return "".join(texts)


def usage_of(raw: object) -> Usage | None:
    """OpenAI ``usage`` object -> Usage; None when absent or unreadable."""
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    try:
        return Usage(input_tokens=int(raw.get("prompt_tokens") or 0),
                     output_tokens=int(raw.get("completion_tokens") or 0),
                     cached_tokens=int(cached or 0))
    except (TypeError, ValueError):
        return None


def usage_json(usage: Usage) -> UsageJSON:
    """Usage -> the OpenAI ``usage`` object (the inverse of ``usage_of``)."""
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}
