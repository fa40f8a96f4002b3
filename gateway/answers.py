"""Answers the gateway makes itself: a cached answer replayed (as JSON or as a stream) and the
degraded last-resort answer, which says what it is."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tollway.gateway.accounting import usage_json
from tollway.gateway.relay import DONE, sse
from tollway.routing import Usage

JSON = dict[str, Any]
DEGRADED_MODEL = "tollway-degraded"


def degraded_completion(message: str) -> JSON:
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": DEGRADED_MODEL, "system_fingerprint": "tollway-degraded",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "stop"}],
            "usage": usage_json(Usage())}


async def replay(payload: JSON, *, include_usage: bool) -> AsyncIterator[bytes]:
    """A whole chat.completion as the stream of chunks a client expects: role and content per choice,
    the finish reasons, the usage chunk when asked for, ``[DONE]``."""
    base = {"id": payload.get("id"), "object": "chat.completion.chunk", "created": payload.get("created"),
            "model": payload.get("model")}
    choices = [c for c in payload.get("choices") or [] if isinstance(c, dict)]
    for choice in choices:
        message = choice.get("message") or {}
        delta = {k: v for k, v in message.items() if v is not None}
        yield sse({**base, "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}]})
    yield sse({**base, "choices": [{"index": c.get("index", 0), "delta": {}, "finish_reason": c.get("finish_reason")}
                                   for c in choices]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": payload.get("usage")})
    yield DONE
