"""``/v1/messages`` (Anthropic's Messages API, as Claude-style clients and coding agents send it), through the
chat path so every part applies unchanged: budgets and their stream cuts, routing and fallback, retrieval,
guards (tool results included), the ledger (endpoint ``messages``).

Translation. ``system`` becomes the system message; a user turn's text blocks its content and its
``tool_result`` blocks ``tool`` messages before it; an assistant turn's ``tool_use`` blocks its
``tool_calls``; ``tools`` and ``tool_choice`` the OpenAI function tools; ``max_tokens`` (required, as
Anthropic's API has it), ``stop_sequences``, ``temperature``, ``top_p``, ``top_k``; ``metadata.user_id`` is
the end user (per-user budgets). The answer comes back as a ``message`` with text and ``tool_use`` blocks,
``stop_reason`` from the finish reason (``end_turn``, ``max_tokens``, ``tool_use``, ``refusal`` for a guard's
content filter); a stream as Anthropic's events (``message_start``, ``content_block_start``,
``content_block_delta`` with ``text_delta`` or ``input_json_delta``, ``content_block_stop``,
``message_delta`` with usage, ``message_stop``), a cut stream ending with an ``error`` event. Errors are in
Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``). Images and documents are refused
with a 400 naming the block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from tollway.errors import InvalidRequest
from tollway.gateway.apis.completions import chat_stream, through_chat
from tollway.gateway.chat.calls import CallContext, JSONResult, StreamResult
from tollway.gateway.http.streaming import BodyReader
from tollway.jsontypes import JSON
from tollway.routing import count_prompt

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}
_FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k",
           "stream", "metadata", "tools", "tool_choice", "retrieval"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of blocks.", param=where)
    parts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}[{i}] must be a text block.", param=f"{where}[{i}]")
        parts.append(block["text"])
    return "\n".join(parts)


def _turn(i: int, message: Any) -> list[JSON]:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role must be 'user' or 'assistant'.", param=f"{where}.role")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of blocks.", param=f"{where}.content")
    texts: list[str] = []
    calls: list[JSON] = []
    results: list[JSON] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            calls.append({"id": str(block.get("id", f"call_{j}")), "type": "function",
                          "function": {"name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            text = _text(result, f"{at}.content") if result else ""
            if block.get("is_error"):
                text = f"[error] {text}"
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text})
        else:
            raise InvalidRequest(f"{at}: a '{kind}' block is not served here (text, tool_use in assistant turns, "
                                 "tool_result in user turns).", param=f"{at}.type")
    out: list[JSON] = [*results]
    if role == "assistant":
        out.append({"role": "assistant", "content": "\n".join(texts) or None, **({"tool_calls": calls} if calls else {})})
    elif texts or not results:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def chat_body(data: JSON) -> JSON:
    """The chat request a Messages request stands for; a 400 naming the field for what cannot be."""
    unknown = sorted(k for k in data if k not in _FIELDS)
    if unknown:
        raise InvalidRequest(f"Unsupported field '{unknown[0]}' on /v1/messages.", param=unknown[0],
                             code="unsupported_field")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise InvalidRequest("model is required.", param="model")
    max_tokens = data.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens is required: a positive integer.", param="max_tokens")
    turns = data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    messages: list[JSON] = []
    if data.get("system"):
        messages.append({"role": "system", "content": _text(data["system"], "system")})
    for i, turn in enumerate(turns):
        messages += _turn(i, turn)
    body: JSON = {"model": data["model"], "max_tokens": max_tokens, "messages": messages}
    for name in ("temperature", "top_p", "top_k", "retrieval"):
        if name in data:
            body[name] = data[name]
    if data.get("stop_sequences") is not None:
        body["stop"] = data["stop_sequences"]
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        body["user"] = metadata["user_id"]
    if data.get("tools"):
        if not isinstance(data["tools"], list):
            raise InvalidRequest("tools must be a list.", param="tools")
        for i, t in enumerate(data["tools"]):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise InvalidRequest(f"tools[{i}] must be an object with a name.", param=f"tools[{i}].name")
        body["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}} for t in data["tools"]]
    choice = data.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            if not isinstance(choice.get("name"), str) or not choice["name"]:
                raise InvalidRequest("tool_choice of type tool names the tool.", param="tool_choice.name")
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        else:
            raise InvalidRequest("tool_choice.type is auto, any, tool or none.", param="tool_choice.type")
    elif choice is not None:
        raise InvalidRequest("tool_choice is an object such as {\"type\": \"auto\"}.", param="tool_choice")
    if data.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


_COUNTED = {"model", "messages", "system", "tools", "tool_choice"}  # what count_tokens takes, as Anthropic's does


def input_tokens(data: JSON, tenant_id: int | str = "") -> tuple[str, int]:
    """``POST /v1/messages/count_tokens``: the model named and the request's input tokens as a budget's
    reservation counts the chat request it becomes (``count_prompt``: tiktoken over the messages, the tool calls
    they carry and the tools' definitions); not the model's own tokenizer. A 400 naming the field for what a
    Messages request could not hold."""
    unknown = sorted(k for k in data if k not in _COUNTED)
    if unknown:
        raise InvalidRequest(f"Unsupported field '{unknown[0]}' on /v1/messages/count_tokens.", param=unknown[0],
                             code="unsupported_field")
    body = chat_body({**data, "max_tokens": 1})
    return body["model"], count_prompt(body["messages"], body, tenant_id)


def message_id(chat_id: Any) -> str:
    return "msg_" + str(chat_id or "").removeprefix("chatcmpl-")


def anthropic_message(answer: JSON) -> JSON:
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[JSON] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {"raw": function.get("arguments")}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    usage = answer.get("usage") or {}
    out: JSON = {"id": message_id(answer.get("id")), "type": "message", "role": "assistant",
                 "model": answer.get("model"), "content": content,
                 "stop_reason": _STOP.get(str(choice.get("finish_reason")), "end_turn"), "stop_sequence": None,
                 "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                           "output_tokens": usage.get("completion_tokens", 0)}}
    if "tollway" in answer:
        out["tollway"] = answer["tollway"]
    return out


def _event(kind: str, payload: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


class _Stream:
    """Chat chunks in, Anthropic events out: one content block per text run or tool call."""

    def __init__(self) -> None:
        self.started = False
        self.block: tuple[str, int] | None = None  # ('text', 0) or ('tool', tool index)
        self.index = -1
        self.stop: str | None = None
        self.usage: JSON = {}
        self.extra: JSON = {}

    def chunk(self, chunk: JSON) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            self.started = True
            out.append(_event("message_start", {"message": {
                "id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
                "model": chunk.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if "tollway" in chunk:
            self.extra["tollway"] = chunk["tollway"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # Anthropic has one answer per request
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._open(("text", 0), {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {"index": self.index, "delta": {
                    "type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                key = ("tool", int(call.get("index", 0)))
                if self.block != key:
                    out += self._open(key, {"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                                            "input": {}})
                if function.get("arguments"):
                    out.append(_event("content_block_delta", {"index": self.index, "delta": {
                        "type": "input_json_delta", "partial_json": function["arguments"]}}))
            if choice.get("finish_reason"):
                self.stop = _STOP.get(str(choice["finish_reason"]), "end_turn")
        return out

    def _open(self, key: tuple[str, int], block: JSON) -> list[bytes]:
        if self.block == key:
            return []
        out = self._close()
        self.block, self.index = key, self.index + 1
        out.append(_event("content_block_start", {"index": self.index, "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self.block is None:
            return []
        self.block = None
        return [_event("content_block_stop", {"index": self.index})]

    def end(self) -> list[bytes]:
        out = self._close()
        out.append(_event("message_delta", {"delta": {"stop_reason": self.stop or "end_turn", "stop_sequence": None},
                                            "usage": {"input_tokens": self.usage.get("prompt_tokens", 0),
                                                      "output_tokens": self.usage.get("completion_tokens", 0)},
                                            **self.extra}))
        out.append(_event("message_stop", {}))
        return out


async def events(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chat stream's frames as Anthropic's events (``chat_stream`` reads it to its end)."""
    stream = _Stream()
    async for kind, value in chat_stream(frames):
        if kind == "done":
            for out in stream.end():
                yield out
        elif kind == "error":
            error = value if isinstance(value, dict) else {}
            yield _event("error", {"error": {"type": "api_error" if error.get("type") != "invalid_request_error"
                                             else "invalid_request_error", "message": error.get("message", ""),
                                             "code": error.get("code")}})
        elif kind == "chunk":
            for out in stream.chunk(value):
                yield out


async def messages(chat: Any, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
    return await through_chat(chat, ctx, read_body, "messages", chat_body, anthropic_message, events)
