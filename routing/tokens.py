"""Token counting with tiktoken, for reservations, context windows and estimates when an upstream reports no
usage: a request's prompt (its messages, the tool calls they carry, and the definitions a chat template renders
into the prompt: tools, functions, documents), and texts off the event loop when long. The encoding itself and
``count_text`` live in ``tollway.tokens`` (a leaf module: a document parser's worker counts tokens without
importing routing)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson

from tollway.routing.wire import PARTS
from tollway.tokens import count_text

_PER_MESSAGE = 4  # role and separators, as in OpenAI's accounting for chat formats
# A request whose texts are longer than this is counted (and assessed, and guarded) in a worker thread:
# tiktoken on 4 MB takes a third of a second, which on the event loop every other request would wait for.
OFF_LOOP_CHARS = 32_000
T = TypeVar("T")


def content_texts(content: Any) -> Iterable[str]:
    """The text of a message's content: a plain string, or the text parts of a list of parts."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


# Body fields a model server's chat template renders into the prompt beside the messages (OpenAI bills tool and
# function definitions as input tokens; vLLM's templates render ``tools`` and ``documents``): counted as their
# JSON, which is at least as long as the usual renderings.
DEFINITIONS = ("tools", "functions", "documents")


def call_texts(message: Mapping[str, Any]) -> Iterable[str]:
    """The names and arguments of the tool (or function) calls in an assistant message, or in a stream's delta
    of one."""
    calls = message.get("tool_calls")
    functions = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    functions.append(message.get("function_call"))
    for function in functions:
        if isinstance(function, dict):
            for field in ("name", "arguments"):
                if isinstance(value := function.get(field), str):
                    yield value


def _message_texts(message: dict[str, Any]) -> Iterable[str]:
    """Every text of a message that reaches the prompt: its content, its name, and its calls (``call_texts``)."""
    yield from content_texts(message.get("content"))
    if isinstance(name := message.get("name"), str):
        yield name
    yield from call_texts(message)


def count_messages(messages: list[dict[str, Any]]) -> int:
    total = 3  # every reply is primed with the assistant header
    for message in messages:
        total += _PER_MESSAGE + sum(count_text(t) for t in _message_texts(message))
    return total


def _definitions(params: Mapping[str, Any]) -> str:
    present = {k: params[k] for k in DEFINITIONS if params.get(k)}
    return orjson.dumps(present).decode() if present else ""


class _DefinitionCounts:
    """Token counts of definitions seen lately, by a digest of the tenant and the definitions' JSON: an agent
    sends the same tools with every request, and counting 5 KB of them takes tiktoken about 0.6 ms, about a
    request's own CPU (bench/budgets/prompt_count.py). Per tenant, so that how fast a count comes back says
    nothing about another tenant's tools; bounded in entries (digests and counts only)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._counts: dict[bytes, int] = {}
        self._lock = threading.Lock()  # counted on the event loop and in worker threads

    def count(self, scope: int | str, text: str) -> int:
        digest = hashlib.blake2b(text.encode(), digest_size=16, key=str(scope).encode()[:64]).digest()
        with self._lock:
            tokens = self._counts.get(digest)
        if tokens is None:
            tokens = count_text(text)
            with self._lock:
                if len(self._counts) >= self._size:
                    del self._counts[next(iter(self._counts))]  # the oldest entry
                self._counts[digest] = tokens
        return tokens


_definition_counts = _DefinitionCounts()


def count_prompt(messages: list[dict[str, Any]], params: Mapping[str, Any], scope: int | str = "") -> int:
    """A request's prompt tokens: its messages (``count_messages``) and the definitions in its other fields
    (``params``: the body less its messages) that a template renders into the prompt; ``scope`` (the tenant)
    keys the definitions' cached count."""
    definitions = _definitions(params)
    return count_messages(messages) + (_definition_counts.count(scope, definitions) if definitions else 0)


# Content parts whose tokens the model computes from the media (an image's size, an audio's length): nothing in
# the request says how many; a budget reserves a set figure for each (TOLLWAY_MEDIA_PART_TOKENS).
MEDIA_PART_TYPES = frozenset(PARTS) - {"text", "refusal"}


def media_parts(messages: list[dict[str, Any]]) -> int:
    """How many image, audio, video and file parts the messages hold."""
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(parts := m.get("content"), list)
               for p in parts if isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES)


def _prediction(params: Mapping[str, Any]) -> list[str]:
    prediction = params.get("prediction")
    return list(content_texts(prediction.get("content"))) if isinstance(prediction, dict) else []


def prediction_tokens(params: Mapping[str, Any]) -> int:
    """The tokens of a predicted output (OpenAI's ``prediction``: its content, a string or text parts): those the
    answer does not use are billed as output beyond ``max_tokens``."""
    return sum(count_text(t) for t in _prediction(params))


def prediction_chars(params: Mapping[str, Any]) -> int:
    return sum(len(t) for t in _prediction(params))


def message_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(t) for m in messages if isinstance(m, dict) for t in _message_texts(m))


def prompt_chars(messages: list[dict[str, Any]], params: Mapping[str, Any]) -> int:
    """How long the texts ``count_prompt`` counts are, to decide whether they are counted off the event loop."""
    return message_chars(messages) + len(_definitions(params))


async def off_loop_if_long(chars: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)``: here if the texts it reads hold at most ``OFF_LOOP_CHARS`` characters, else
    in a worker thread (tiktoken and the regexes of the guards release the GIL while they run)."""
    if chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)
