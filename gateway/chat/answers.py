"""The answers the gateway makes itself: the degraded last resort, which says what it is, and an input
guard's fallback. (A cached answer
is replayed through the same output chain as any other: ``tollway.gateway.chat.relay``.)"""

from __future__ import annotations

import time
import uuid

from tollway.gateway.chat.wire import ChatCompletion, plain, usage_json
from tollway.jsontypes import JSON
from tollway.routing import Usage

DEGRADED_MODEL = "tollway-degraded"


def gateway_completion(model: str, message: str) -> JSON:
    """An answer the gateway makes itself (no model was called): it costs nothing."""
    answer: ChatCompletion = {
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "stop"}],
        "usage": usage_json(Usage())}
    return plain(answer)


def degraded_completion(message: str) -> JSON:
    return gateway_completion(DEGRADED_MODEL, message)
