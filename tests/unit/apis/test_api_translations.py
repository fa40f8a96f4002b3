"""The legacy completions, Anthropic Messages and Responses endpoints translate into the chat path and back:
request bodies, whole answers, and streams (tool calls, and a stream cut by a budget or a guard)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from tollway.errors import InvalidRequest
from tollway.gateway.apis import completions, messages, responses


def frames(*chunks: object) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk if isinstance(chunk, bytes) else b"data: " + orjson.dumps(chunk) + b"\n\n"
    return gen()


def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    async def run() -> list[bytes]:
        return [piece async for piece in stream]
    return asyncio.run(run())


def chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def test_a_messages_request_becomes_the_chat_request_it_stands_for():
    body = messages.chat_body({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "Be brief."}],
        "metadata": {"user_id": "ada"}, "stop_sequences": ["END"], "tool_choice": {"type": "any"},
        "tools": [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "fee?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                              {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "35"},
                                         {"type": "text", "text": "and?"}]}]})
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert body["messages"][2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":1}'}
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "35"}
    assert (body["user"], body["stop"], body["tool_choice"]) == ("ada", ["END"], "required")
    assert body["tools"][0]["function"]["parameters"] == {"type": "object"}


@pytest.mark.parametrize(("data", "param"), [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages[0].content[0].type"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "thinking": {}}, "thinking"),
])
def test_what_has_no_chat_equivalent_is_a_400_naming_the_field(data, param):
    with pytest.raises(InvalidRequest) as refused:
        messages.chat_body(data)
    assert refused.value.param == param


def test_a_stream_becomes_anthropic_events_with_tool_calls_and_usage():
    out = collect(messages.events(frames(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Looking"}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "lookup", "arguments": '{"q"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': 1}'}}]}),
        chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 7}},
        b"data: [DONE]\n\n")))
    events = [orjson.loads(e.split(b"\ndata: ", 1)[1]) for e in out]
    assert [e["type"] for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[4]["content_block"] == {"type": "tool_use", "id": "c1", "name": "lookup", "input": {}}
    assert "".join(e["delta"].get("partial_json", "") for e in events[5:7]) == '{"q": 1}'
    assert events[8]["delta"]["stop_reason"] == "tool_use"
    assert events[8]["usage"] == {"input_tokens": 4, "output_tokens": 7}


def test_a_cut_stream_ends_with_an_error_event():
    out = collect(messages.events(frames(
        chunk({"content": "Partial"}),
        {"error": {"message": "budget exhausted", "type": "insufficient_quota", "code": "budget_exceeded"}},
        b"data: [DONE]\n\n")))
    last = out[-1]
    assert last.startswith(b"event: error\n")
    assert orjson.loads(last.split(b"\ndata: ", 1)[1])["error"]["code"] == "budget_exceeded"


def test_a_completions_stream_keeps_text_errors_and_done():
    out = collect(completions.text_frames(frames(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}), chunk({}, "stop"),
        {"error": {"message": "cut"}}, b"data: [DONE]\n\n")))
    payloads = [orjson.loads(p[6:]) for p in out if p.startswith(b"data: {")]
    assert [p.get("object") for p in payloads] == ["text_completion", "text_completion", None]
    assert payloads[0]["choices"][0]["text"] == "Hi"
    assert payloads[1]["choices"][0]["finish_reason"] == "stop"
    assert out[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("field", ["api_base", "base_url", "extra_headers", "api_key"])
def test_transport_fields_never_pass_through_either_translation(field):
    """What a client sends to the legacy or Anthropic endpoint is an allow-list: a transport setting is a 400
    naming it, never a chat field that could reach an upstream."""
    with pytest.raises(InvalidRequest) as on_completions:
        completions.chat_body({"model": "m", "prompt": "x", field: "http://attacker.example"})
    with pytest.raises(InvalidRequest) as on_messages:
        messages.chat_body({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                            field: "http://attacker.example"})
    with pytest.raises(InvalidRequest) as on_responses:
        responses.parse({"model": "m", "input": "x", field: "http://attacker.example"})
    assert on_completions.value.param == on_messages.value.param == on_responses.value.param == field


def test_a_responses_request_becomes_the_chat_request_it_stands_for():
    req = responses.parse({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "safety_identifier": "ada",
        "user": "legacy-id", "temperature": 0.2, "parallel_tool_calls": False, "store": False,
        "tools": [{"type": "function", "name": "fee", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "fee"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "prompt": {"id": "greet", "version": "production", "variables": {"customer": "Ada"}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "fee?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "fee", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "fee", "arguments": "{\"q\": 1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "35"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 35."}]},
        ]})
    body = req.chat_body([{"role": "user", "content": "earlier"}])
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "earlier"},
        {"role": "user", "content": "fee?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "fee", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "fee", "arguments": "{\"q\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "35"},
        {"role": "assistant", "content": "It is 35."}]
    assert body["max_tokens"] == 9
    assert body["user"] == "ada"  # safety_identifier over the deprecated user
    assert body["tools"] == [{"type": "function", "function": {"name": "fee", "parameters": {"type": "object"},
                                                               "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "fee"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object"}, "strict": True}}
    assert body["prompt"] == {"name": "greet", "ref": "production", "variables": {"customer": "Ada"}}
    assert "store" not in body and "instructions" not in body
    assert req.turn == body["messages"][2:]  # what the next turn carries: no instructions, no history


@pytest.mark.parametrize(("data", "param"), [
    ({"model": "m"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"model": "m", "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"model": "m", "input": "x", "store": "yes"}, "store"),
    ({"model": "m", "input": "x", "truncation": "auto"}, "truncation"),
    ({"model": "m", "input": "x", "prompt": {"id": "p", "template": "{{x}}"}}, "prompt"),
])
def test_what_the_responses_translation_cannot_serve_is_a_400_naming_the_field(data, param):
    with pytest.raises(InvalidRequest) as refused:
        responses.parse(data)
    assert refused.value.param == param


def run_events(*chunks: object, after: list[str] | None = None) -> list[dict]:
    req = responses.parse({"model": "m", "input": "x"})
    saved = []

    async def save(response: dict, outcome: object) -> None:
        saved.append(response)

    async def source() -> AsyncIterator[bytes]:
        async for piece in frames(*chunks):
            yield piece
        if after is not None:
            after.append("drained")  # code after the chat stream's last frame (its ledger row) ran

    out = collect(responses.events(source(), responses._Events("resp_1", 0, req, True), save))
    events = [orjson.loads(p.split(b"\ndata: ", 1)[1]) for p in out]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_stream_becomes_responses_events_with_text_then_a_tool_call_and_usage():
    drained: list[str] = []
    events = run_events(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}), chunk({"content": "look."}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "fee", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}), chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6},
         "tollway": {"cost_usd": "0.1"}},
        b"data: [DONE]\n\n", after=drained)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    assert done["output"][0]["content"][0]["text"] == "Let me look."
    assert (done["output"][1]["call_id"], done["output"][1]["arguments"]) == ("c1", "{\"q\": 1}")
    assert done["usage"]["total_tokens"] == 10
    assert done["tollway"] == {"cost_usd": "0.1"}
    assert drained == ["drained"]


def test_a_cut_responses_stream_ends_with_error_and_failed_and_is_read_to_its_end():
    drained: list[str] = []
    events = run_events(
        chunk({"content": "Partial"}),
        {"error": {"message": "budget exhausted", "type": "insufficient_quota", "code": "budget_exceeded"}},
        b"data: [DONE]\n\n", after=drained)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "budget_exceeded"
    assert events[-1]["response"]["error"] == {"code": "budget_exceeded", "message": "budget exhausted"}
    assert not any(e["type"] == "response.completed" for e in events)
    assert drained == ["drained"]


def test_a_cut_messages_stream_is_read_to_its_end_too():
    drained: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        async for piece in frames({"error": {"message": "cut", "code": "reservation_exceeded"}}, b"data: [DONE]\n\n"):
            yield piece
        drained.append("drained")

    assert collect(messages.events(source()))[-1].startswith(b"event: error\n")
    assert drained == ["drained"]
