"""OpenAI request shapes, validated once at the edge.

Models allow extra fields here: OpenAI fields Tollway does not act on (tools, response_format, logprobs,
seed, ...) and the inference servers' decoding extras pass validation, and ``tollway.routing.wire`` then
decides, by allow-list, which of them an upstream may receive (a transport or credential field such as
``api_base`` is a 400). Fields Tollway does act on are typed strictly, so ``"max_tokens": "5"`` is a 400,
not a silent coercion.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tollway.errors import InvalidJSON, InvalidRequest

USER_CHARS = 256  # an end user's id (OpenAI's ``user``, ``safety_identifier``; the gateway's own headers too)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str


class FunctionCall(_Open):
    """A call an assistant turn made: its arguments are the JSON text the model wrote (a string, as OpenAI's API
    and vLLM's take it), which the prompt holds and a budget counts."""

    name: str
    arguments: str


class ToolCall(_Open):
    type: str = "function"
    function: FunctionCall | None = None  # a function tool's call (another type, such as "custom", has its own)


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    # Empty only when the request names a prompt, whose messages come first (checked in the parse stage).
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    temperature: float | int | None = Field(default=None, ge=0, le=2)
    top_p: float | int | None = Field(default=None, ge=0, le=1)
    user: str | None = Field(default=None, max_length=USER_CHARS)


class CompletionRequest(_Open):
    """``/v1/completions`` as documented (the endpoint translates it into a chat request: gateway/apis/completions)."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=16)
    temperature: float | int | None = Field(default=None, ge=0, le=2)
    top_p: float | int | None = Field(default=None, ge=0, le=1)
    user: str | None = Field(default=None, max_length=USER_CHARS)


class ResponseRequest(_Open):
    """``/v1/responses`` as documented (translated into a chat request: gateway/apis/responses)."""

    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    prompt: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = Field(default=None, max_length=USER_CHARS)
    user: str | None = Field(default=None, max_length=USER_CHARS)


class MessagesRequest(_Open):
    """Anthropic's ``/v1/messages`` as documented (translated into a chat request: gateway/apis/messages)."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = Field(default=None, max_length=USER_CHARS)


class ModerationPart(_Open):
    type: str = Field(max_length=32)
    text: str | None = None


class ModerationRequest(_Open):
    input: str | list[str] | list[ModerationPart]
    model: str | None = Field(default=None, max_length=256)


def _param(loc: tuple[int | str, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[ContentPart]", "list[ModerationPart]", "list[str]", "list[int]", "list[list[int]]", "float", "int"):
            continue  # union branch names, not fields
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON("We could not parse the JSON body of your request: " + str(exc).split(":")[0]) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], *, at: str | None = None) -> M:
    """``data`` as ``model``, or the 400 naming the first bad field (under ``at`` for a nested object)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"])
        if at is not None:
            param = f"{at}.{param}" if param else at
        where = f"'{param}'" if param else "body"
        message = _INSTANCE_OF.sub("", first["msg"])  # "a valid dictionary or instance of ToolCall": a class name
        raise InvalidRequest(f"Invalid value for {where}: {message}.", param=param) from exc


_INSTANCE_OF = re.compile(r" or instance of \w+")
