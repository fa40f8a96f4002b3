"""Server-sent events as the gateway and the scripted upstream send them: ``data: ...`` frames separated by a
blank line, ending with ``data: [DONE]``."""

from __future__ import annotations

from typing import Any

import orjson


def sse_frames(text: str) -> list[str]:
    """Every frame's payload, ``[DONE]`` included (a stream that did not end with it fails here)."""
    frames = [frame.removeprefix("data: ") for frame in text.split("\n\n") if frame]
    assert frames, "no frames"
    assert frames[-1] == "[DONE]", text[-200:]
    return frames


def sse_payloads(text: str) -> list[Any]:
    """The JSON of every frame before ``[DONE]``."""
    return [orjson.loads(frame) for frame in sse_frames(text)[:-1]]


def event_payloads(text: str) -> list[Any]:
    """The JSON of every ``data:`` line of a stream of named events (the Responses and Messages APIs', which
    end without ``[DONE]``)."""
    return [orjson.loads(line[6:]) for frame in text.split("\n\n") for line in frame.split("\n")
            if line.startswith("data: {")]
