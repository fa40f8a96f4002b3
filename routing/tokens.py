"""Token counting with tiktoken, for estimates when an upstream reports no usage: messages, and texts off the
event loop when long. The encoding itself and ``count_text`` live in ``tollway.tokens`` (a leaf module: a
document parser's worker counts tokens without importing routing)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

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


def count_messages(messages: list[dict[str, Any]]) -> int:
    total = 3  # every reply is primed with the assistant header
    for message in messages:
        total += _PER_MESSAGE + sum(count_text(t) for t in content_texts(message.get("content")))
    return total


def message_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(t) for m in messages if isinstance(m, dict) for t in content_texts(m.get("content")))


async def off_loop_if_long(chars: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)``: here if the texts it reads hold at most ``OFF_LOOP_CHARS`` characters, else
    in a worker thread (tiktoken and the regexes of the guards release the GIL while they run)."""
    if chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)
