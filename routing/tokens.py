"""Token counting with tiktoken, for estimates when an upstream reports no usage.

tiktoken normally downloads its encodings; litellm's wheel ships the cl100k_base file in tiktoken's
cache layout, so the cache directory is pointed there and nothing is fetched.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import tiktoken

_PER_MESSAGE = 4  # role and separators, as in OpenAI's accounting for chat formats
# A request whose texts are longer than this is counted (and assessed, and guarded) in a worker thread:
# tiktoken on 4 MB takes a third of a second, which on the event loop every other request would wait for.
OFF_LOOP_CHARS = 32_000
T = TypeVar("T")


def _point_cache_at_litellm() -> None:
    if "TIKTOKEN_CACHE_DIR" in os.environ or "DATA_GYM_CACHE_DIR" in os.environ:
        return
    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
        if folder.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


@cache
def encoding() -> tiktoken.Encoding:
    _point_cache_at_litellm()
    return tiktoken.get_encoding("cl100k_base")


def count_text(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0


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
