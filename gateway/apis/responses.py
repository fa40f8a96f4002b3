"""``/v1/responses`` (OpenAI's Responses API, what the official SDK's quick start calls) through the chat
path so every part applies unchanged: budgets and their stream cuts, routing and fallback, prompts, retrieval,
guards, the ledger (endpoint ``responses``).

Translated, not passed through, even where an upstream speaks the Responses API itself (vLLM, OpenAI): the
fallback tiers (small models, other providers) speak chat completions, and the parts work on the chat stages
(the output guard on every stream chunk, the reservation cut, usage for the ledger), so one translation keeps
one path to get right. What the chat path has no equivalent for is a 400 naming the field.

Request: ``input`` (a string, or message, ``function_call`` and ``function_call_output`` items; a
``reasoning`` item from an earlier turn is dropped), ``instructions`` (a system message, not carried to the
next turn), function ``tools``, ``tool_choice``, ``text.format`` (``json_schema``, ``json_object``),
``max_output_tokens``, ``temperature``, ``top_p``, ``parallel_tool_calls``, ``metadata`` (echoed and stored),
``safety_identifier`` or ``user`` as the end user (per-user budgets), ``prompt`` ``{id, version, variables}``
as a Tollway prompt (``version``: a label of that prompt, or a version), ``retrieval`` as an extra field.
``store`` and ``previous_response_id``: see ``tollway.gateway.apis.stored``; a request that does not say
``store`` is stored when the tenant's content policy keeps content, and ``store: true`` under one that does not
is a 400 that says so.

Answer: a ``response`` object with ``message`` and ``function_call`` output items, ``status`` ``completed`` or
``incomplete`` (``max_output_tokens``, ``content_filter``), usage, and the ``tollway`` object. A stream is the
Responses event sequence (``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, function call argument deltas, and
``response.completed`` with usage and the ``tollway`` object); a stream cut (a budget's reservation, a guard,
the upstream) ends with an ``error`` event and ``response.failed``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from tollway.errors import InvalidRequest
from tollway.gateway.apis.completions import chat_stream
from tollway.gateway.apis.stored import ResponseStore
from tollway.gateway.chat.calls import CallContext, JSONResult, StreamResult
from tollway.gateway.http.protocol import parse_json_object
from tollway.gateway.http.streaming import BodyReader
from tollway.jsontypes import JSON

log = logging.getLogger("tollway.gateway")

# Fields the Responses API has that Tollway accepts only at the value that changes nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "truncation": ("disabled",), "include": ([],), "background": (False,), "reasoning": ({},),
    "service_tier": ("auto", "default"), "stream_options": ({}, {"include_obfuscation": False},
                                                              {"include_obfuscation": True}),
    "max_tool_calls": (), "conversation": (), "top_logprobs": (0,),
}
_FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
           "max_output_tokens", "metadata", "user", "safety_identifier", "temperature", "top_p", "stream",
           "store", "previous_response_id", "prompt", "retrieval", "prompt_cache_key", *_NEUTRAL}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A Responses request, parsed: the chat request it stands for (without earlier turns) and what the
    response object echoes."""

    chat: JSON  # the chat body; its messages are the instructions and this turn's input
    system: list[JSON]  # the instructions as a system message (not carried to the next turn)
    turn: list[JSON]  # this turn's input as chat messages (stored, carried to the next turn)
    store: bool | None
    previous_id: str | None
    echo: JSON = field(default_factory=dict)  # the request's own fields, as the response object repeats them

    def chat_body(self, history: list[JSON]) -> JSON:
        return {**self.chat, "messages": [*self.system, *history, *self.turn]}


def _text_of(content: Any, at: str, kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{at} must be a string or a list of content parts.", param=at)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise InvalidRequest(f"{at}[{j}]: a '{kind}' part is not served here ({', '.join(kinds)} only).",
                                 param=f"{at}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{at}[{j}]: an '{kind}' part holds its text (a string).", param=f"{at}[{j}].text")
        parts.append(part["text"])
    return "\n".join(parts)


def _turn(value: Any) -> list[JSON]:
    """The ``input`` as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be a string or a non-empty list of items.", param="input")
    out: list[JSON] = []
    for i, item in enumerate(value):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{at} must be an object.", param=at)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{at}.role must be user, assistant, system or developer.", param=f"{at}.role")
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            out.append({"role": role, "content": _text_of(item.get("content"), f"{at}.content", kinds)})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(arguments, str) or not isinstance(item.get("call_id"), str):
                raise InvalidRequest(f"{at}: a function_call needs call_id, name and arguments (strings).", param=at)
            call = {"id": item["call_id"], "type": "function", "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequest(f"{at}.call_id must be a string.", param=f"{at}.call_id")
            text = _text_of(item.get("output", ""), f"{at}.output", ("input_text",))
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning summary: chat models take none
        else:
            raise InvalidRequest(f"{at}: a '{kind}' item is not served here (messages, function calls and their "
                                 "outputs).", param=f"{at}.type")
    return out


def _tools(value: Any) -> list[JSON]:
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list.", param="tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"tools[{i}]: a '{kind}' tool is not served (function tools only).",
                                 param=f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequest(f"tools[{i}]: a function tool needs a name.", param=f"tools[{i}].name")
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
        for name in ("description", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> Any:
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise InvalidRequest("tool_choice must be auto, none, required or a function {type, name}.", param="tool_choice")


def _response_format(text: Any) -> JSON | None:
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise InvalidRequest("text must be an object with 'format'.", param="text")
    if text.get("verbosity") not in (None, "medium"):
        raise InvalidRequest("text.verbosity is not served.", param="text.verbosity")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict) and isinstance(fmt.get("name"), str):
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest("text.format must be text, json_object or json_schema {name, schema}.",
                         param="text.format")


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise InvalidRequest("metadata must map at most 16 keys (64 characters) to strings (512 characters).",
                             param="metadata")
    return dict(value)


def _prompt(value: Any) -> JSON:
    """The Responses API's ``prompt`` as Tollway's: id = name, version = a label of that prompt or a version."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), str) or set(value) - {"id", "version",
                                                                                            "variables"}:
        raise InvalidRequest("prompt must be {id, version, variables}.", param="prompt")
    ref: JSON = {"name": value["id"]}
    if value.get("version") is not None:
        ref["ref"] = str(value["version"])
    if value.get("variables") is not None:
        ref["variables"] = value["variables"]
    return ref


def parse(data: JSON) -> ResponsesRequest:
    """A Responses request as the chat request it stands for; a 400 naming the field for what cannot be."""
    data = {k: v for k, v in data.items() if v is not None}
    unknown = sorted(k for k in data if k not in _FIELDS)
    if unknown:
        raise InvalidRequest(f"Unsupported field '{unknown[0]}' on /v1/responses.", param=unknown[0],
                             code="unsupported_field")
    for name, neutral in _NEUTRAL.items():
        if name in data and data[name] not in neutral:
            raise InvalidRequest(f"'{name}' is not served on /v1/responses (leave it out).", param=name,
                                 code="unsupported_field")
    key = data.get("prompt_cache_key")  # a hint for OpenAI's prompt cache: accepted, and not sent on
    if key is not None and not (isinstance(key, str) and len(key) <= 64):
        raise InvalidRequest("prompt_cache_key must be a string of at most 64 characters.", param="prompt_cache_key")
    chat: JSON = {}
    if "prompt" in data:
        chat["prompt"] = _prompt(data["prompt"])
    model = data.get("model", "prompt" if "prompt" in data else None)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required (or a prompt that names one).", param="model")
    chat["model"] = model
    if "input" not in data and "prompt" not in data:
        raise InvalidRequest("input is required.", param="input")
    turn = _turn(data["input"]) if "input" in data else []
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("instructions must be a string.", param="instructions")
    if "max_output_tokens" in data:
        chat["max_tokens"] = data["max_output_tokens"]
    for name in ("temperature", "top_p", "retrieval"):
        if name in data:
            chat[name] = data[name]
    if "tools" in data:
        chat["tools"] = _tools(data["tools"])
        if "parallel_tool_calls" in data:
            chat["parallel_tool_calls"] = bool(data["parallel_tool_calls"])
    if "tool_choice" in data:
        chat["tool_choice"] = _tool_choice(data["tool_choice"])
    if "text" in data and (fmt := _response_format(data["text"])) is not None:
        chat["response_format"] = fmt
    end_user = data.get("safety_identifier", data.get("user"))
    if end_user is not None:
        chat["user"] = end_user
    if data.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    store, previous = data.get("store"), data.get("previous_response_id")
    if store is not None and not isinstance(store, bool):
        raise InvalidRequest("store must be true or false.", param="store")
    if previous is not None and not (isinstance(previous, str) and 0 < len(previous) <= 128
                                     and set(previous) <= _ID_CHARS):
        raise InvalidRequest("previous_response_id must be a response id.", param="previous_response_id")
    echo: JSON = {
        "model": model, "instructions": instructions, "max_output_tokens": data.get("max_output_tokens"),
        "temperature": data.get("temperature", 1.0), "top_p": data.get("top_p", 1.0),
        "tools": data.get("tools", []), "tool_choice": data.get("tool_choice", "auto"),
        "parallel_tool_calls": data.get("parallel_tool_calls", True),
        "text": data.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        "metadata": _metadata(data["metadata"]) if "metadata" in data else {},
        "previous_response_id": previous, "user": data.get("user"),
        "safety_identifier": data.get("safety_identifier"),
    }
    system = [{"role": "system", "content": instructions}] if instructions else []
    return ResponsesRequest(chat=chat, system=system, turn=turn, store=store, previous_id=previous, echo=echo)


# -- the answer ---------------------------------------------------------------------------------------
def _usage(usage: JSON | None) -> JSON | None:
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0)},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def message_item(item_id: str, text: str, status: str = "completed") -> JSON:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call: JSON, status: str = "completed") -> JSON:
    function = call.get("function") or {}
    return {"type": "function_call", "id": item_id, "call_id": call.get("id") or item_id,
            "name": function.get("name") or "", "arguments": function.get("arguments") or "", "status": status}


@dataclass(slots=True)
class Outcome:
    """What the answer was: output items, how it finished, usage, the ``tollway`` object."""

    output: list[JSON] = field(default_factory=list)
    finish: str | None = None
    usage: JSON | None = None
    extra: JSON = field(default_factory=dict)
    error: JSON | None = None

    def assistant(self) -> JSON:
        """The output as the chat message the next turn carries."""
        texts = [c["text"] for item in self.output if item["type"] == "message" for c in item["content"]]
        calls = [{"id": item["call_id"], "type": "function",
                  "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in self.output if item["type"] == "function_call"]
        return {"role": "assistant", "content": "".join(texts) or None, **({"tool_calls": calls} if calls else {})}


def outcome_of(answer: JSON) -> Outcome:
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    out = Outcome(finish=choice.get("finish_reason"), usage=answer.get("usage"))
    if message.get("content") or not message.get("tool_calls"):
        out.output.append(message_item(new_id("msg"), message.get("content") or ""))
    for call in message.get("tool_calls") or []:
        out.output.append(call_item(new_id("fc"), call))
    if "tollway" in answer:
        out.extra["tollway"] = answer["tollway"]
    return out


def response_object(rid: str, created: int, req: ResponsesRequest, outcome: Outcome | None, *, store: bool,
                    model: str | None = None) -> JSON:
    """The ``response`` object: in progress (``outcome`` None), completed, incomplete or failed."""
    status, incomplete = "in_progress", None
    if outcome is not None:
        reason = _INCOMPLETE.get(str(outcome.finish))
        status = "failed" if outcome.error else "incomplete" if reason else "completed"
        incomplete = {"reason": reason} if reason and not outcome.error else None
    out: JSON = {"id": rid, "object": "response", "created_at": created, "status": status,
                 "error": None if outcome is None else outcome.error, "incomplete_details": incomplete,
                 **req.echo, "model": model or req.echo["model"],
                 "output": [] if outcome is None else outcome.output,
                 "usage": None if outcome is None else _usage(outcome.usage), "store": store}
    if outcome is not None:
        out.update(outcome.extra)
    return out


# -- the stream ---------------------------------------------------------------------------------------
class _Events:
    """Chat chunks in, Responses events out: one output item per text run or tool call."""

    def __init__(self, rid: str, created: int, req: ResponsesRequest, store: bool) -> None:
        self.rid, self.created, self.req, self.store = rid, created, req, store
        self.seq = 0
        self.model: str | None = None
        self.outcome = Outcome()
        self.open: tuple[str, int] | None = None  # ('text', 0) or ('tool', the call's index)
        self.started = False

    def event(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def snapshot(self, outcome: Outcome | None) -> JSON:
        return response_object(self.rid, self.created, self.req, outcome, store=self.store, model=self.model)

    def start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [self.event("response.created", response=self.snapshot(None)),
                self.event("response.in_progress", response=self.snapshot(None))]

    def chunk(self, chunk: JSON) -> list[bytes]:
        self.model = self.model or chunk.get("model")
        out = self.start()
        if chunk.get("usage"):
            self.outcome.usage = chunk["usage"]
        if "tollway" in chunk:
            self.outcome.extra["tollway"] = chunk["tollway"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # the Responses API has one answer per request
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._open(("text", 0), partial(message_item, text="", status="in_progress"))
                item = self.outcome.output[-1]
                item["content"][0]["text"] += delta["content"]
                out.append(self.event("response.output_text.delta", item_id=item["id"], output_index=self.index,
                                      content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                started: JSON = {"id": call.get("id"), "function": {"name": function.get("name")}}
                out += self._open(("tool", int(call.get("index", 0))), partial(call_item, call=started,
                                                                               status="in_progress"))
                if function.get("arguments"):
                    item = self.outcome.output[-1]
                    item["arguments"] += function["arguments"]
                    out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=self.index, delta=function["arguments"]))
            if choice.get("finish_reason"):
                self.outcome.finish = choice["finish_reason"]
        return out

    @property
    def index(self) -> int:
        return len(self.outcome.output) - 1

    def _open(self, key: tuple[str, int], make: Callable[[str], JSON]) -> list[bytes]:
        if self.open == key:
            return []
        out = self._close()
        self.open = key
        item = make(new_id("msg" if key[0] == "text" else "fc"))
        self.outcome.output.append(item)
        added = {**item, "content": []} if item["type"] == "message" else item
        out.append(self.event("response.output_item.added", output_index=self.index, item=added))
        if item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                         "logprobs": []}))
        return out

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        item = self.outcome.output[-1]
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=self.index,
                                  content_index=0, text=part["text"], logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=self.index,
                                  content_index=0, part=part))
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=self.index, name=item["name"], arguments=item["arguments"]))
        out.append(self.event("response.output_item.done", output_index=self.index, item=item))
        return out

    def end(self) -> list[bytes]:
        return [*self.start(), *self._close()]

    def fail(self, error: JSON) -> list[bytes]:
        self.outcome.error = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        return [*self.start(), self.event("error", code=error.get("code"), message=error.get("message", ""),
                                          param=error.get("param")),
                self.event("response.failed", response=self.snapshot(self.outcome))]


Save = Callable[[JSON, Outcome], Awaitable[None]]


async def events(frames: AsyncIterator[bytes], state: _Events, save: Save | None) -> AsyncIterator[bytes]:
    """The chat stream's frames as Responses events (``chat_stream`` reads it to its end); ``save`` stores the
    completed response before ``response.completed`` goes out, so the client's next turn finds it."""
    async for kind, value in chat_stream(frames):
        if kind == "comment":
            yield value + b"\n\n"  # a keep-alive
        elif kind == "done":
            for out in state.end():
                yield out
            done = state.snapshot(state.outcome)
            if save is not None:
                await save(done, state.outcome)
            yield state.event("response.completed", response=done)
        elif kind == "error":
            for out in state.fail(value if isinstance(value, dict) else {"message": str(value)}):
                yield out
        else:
            for out in state.chunk(value):
                yield out


# -- the endpoint -------------------------------------------------------------------------------------
class Responses:
    """``POST /v1/responses``: parse, decide whether to store, load the conversation, call the chat path,
    translate back and store."""

    def __init__(self, chat: Any, store: ResponseStore | None) -> None:
        self.chat = chat  # Chat (tollway.gateway.chat.stages)
        self.store = store

    async def __call__(self, ctx: CallContext, read_body: BodyReader) -> JSONResult | StreamResult:
        req = parse(parse_json_object(await read_body()))
        tenant_id = ctx.principal.tenant_id
        policy = (await self.chat.calls.rules(tenant_id)).policy
        keeps = policy.store_content and self.store is not None
        if req.store and not keeps:
            raise InvalidRequest("store: this tenant's content policy keeps no prompts or answers, so responses "
                                 "are not stored (an admin can allow it: store_content in the tenant's policy).",
                                 param="store", code="store_not_allowed")
        store = keeps if req.store is None else req.store
        history: list[JSON] = []
        if req.previous_id is not None:
            if self.store is None:
                raise InvalidRequest("previous_response_id: this gateway stores no responses.",
                                     param="previous_response_id")
            history = await self.store.conversation(tenant_id, req.previous_id)
        body = orjson.dumps(req.chat_body(history))

        async def translated() -> bytes:
            return body

        result = await self.chat(ctx, translated, endpoint="responses")
        rid, created = new_id("resp"), int(time.time())
        end_user = ctx.header_user or req.chat.get("user")

        async def save(response: JSON, outcome: Outcome) -> None:
            if not store or self.store is None:
                return
            try:
                await self.store.save(tenant_id, response, [*req.turn, outcome.assistant()],
                                      previous_id=req.previous_id, end_user=end_user, request_id=ctx.request_id)
            except Exception:  # the answer is delivered and paid for; only the continuation is lost
                log.exception("could not store response %s of request %s", rid, ctx.request_id)

        if isinstance(result, JSONResult):
            outcome = outcome_of(result.payload)
            response = response_object(rid, created, req, outcome, store=store, model=result.payload.get("model"))
            await save(response, outcome)
            return JSONResult(response, result.headers)
        return StreamResult(events(result.frames, _Events(rid, created, req, store), save), result.headers)
