"""The scripted upstream's echo behaviour: exact planted output, split across stream frames."""

from __future__ import annotations

import httpx
from support import sse_payloads

PLANTED = "mail jane.doe@example.com or card 4111 1111 1111 1111"


def test_echo_answers_the_last_user_message_in_small_frames(sim):
    body = {"model": "sim-echo", "messages": [{"role": "user", "content": "first"},
                                               {"role": "assistant", "content": "x"},
                                               {"role": "user", "content": PLANTED}]}
    whole = httpx.post(sim.url + "/chat/completions", json=body).json()
    assert whole["choices"][0]["message"]["content"] == PLANTED
    assert whole["usage"]["completion_tokens"] == len(PLANTED.split())
    streamed = httpx.post(sim.url + "/chat/completions",
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}).text
    frames = sse_payloads(streamed)
    pieces = [f["choices"][0]["delta"].get("content") for f in frames if f["choices"]]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == PLANTED and {len(p) for p in pieces[:-1]} == {3}  # the address spans frames
    assert not any("jane.doe@example.com" in p for p in pieces)
    assert frames[-1]["usage"]["completion_tokens"] == len(PLANTED.split())
