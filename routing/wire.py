"""What a client may send to an upstream: an allow-list of body fields per endpoint.

Every body that reaches an upstream is built here (``upstream_body``, called by the fallback chain for each
attempt), so every endpoint, present and future, inherits the same rule: the OpenAI request fields, the
decoding extras the inference servers behind Tollway document (vLLM, llama.cpp), and the fields a model's
config entry adds for its own upstream (``forward_fields``). Nothing else is forwarded.

Transport and credential settings (``api_base``, ``base_url``, ``api_key``, ``extra_headers`` ...) never come
from a client: litellm reads them from its keyword arguments, so a body passed through would send the
provider's key wherever the client asked. ``check_client_fields`` refuses them, and any other field outside
the list, with a 400 naming the field before anything is reserved or sent.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from tollway.errors import InvalidRequest

# OpenAI's chat completions request (the fields the SDK sends; ``model`` is set per attempt).
OPENAI_CHAT = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})

# Decoding extras documented by vLLM's OpenAI server (sampling and structured output) and llama.cpp's
# server. Left out on purpose: vLLM's ``priority`` (one tenant would jump every other's queue),
# ``chat_template`` (a client-supplied template run on the shared server), ``logits_processors`` (names
# of classes the server imports), ``request_id``, ``kv_transfer_params`` and ``vllm_xargs``.
INFERENCE_EXTRAS = frozenset({
    # vLLM
    "top_k", "min_p", "repetition_penalty", "length_penalty", "best_of", "use_beam_search", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids",
    "bad_words", "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens", "documents",
    "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "return_tokens_as_token_ids",
    # llama.cpp
    "typical_p", "repeat_penalty", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta", "grammar",
    "json_schema", "n_probs", "cache_prompt", "dynatemp_range", "dynatemp_exponent", "dry_multiplier",
    "dry_base", "dry_allowed_length", "xtc_probability", "xtc_threshold",
})

OPENAI_EMBEDDINGS = frozenset({"input", "model", "dimensions", "encoding_format", "user"})
EMBEDDING_EXTRAS = frozenset({"truncate_prompt_tokens", "add_special_tokens"})
# The rerank API vLLM, Cohere, Jina and Infinity serve: the gateway builds these bodies itself (retrieval).
RERANK = frozenset({"model", "query", "documents", "top_n", "return_documents"})

ALLOWED: Mapping[str, frozenset[str]] = {
    "chat": OPENAI_CHAT | INFERENCE_EXTRAS,
    "embeddings": OPENAI_EMBEDDINGS | EMBEDDING_EXTRAS,
    "rerank": RERANK,
}

# Where the request goes and with which credentials: the operator's alone. Named so the 400 says why, and so
# a config entry cannot list them as body fields either.
TRANSPORT = frozenset({
    "api_base", "base_url", "api_key", "api_version", "extra_headers", "headers", "extra_body", "extra_query",
    "timeout", "request_timeout", "custom_llm_provider", "proxy", "proxies", "organization", "azure_ad_token",
    "azure_ad_token_provider", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "aws_region_name", "vertex_credentials", "vertex_project", "vertex_location", "num_retries", "max_retries",
    "mock_response", "input_cost_per_token", "output_cost_per_token", "litellm_logging_obj", "deployment_id",
    "client", "http_client", "callbacks", "api_type", "base_model",
})


# A chat message's content part types: OpenAI's chat parts and the media parts vLLM serves. Each holds a field
# named as its type; a part of another type, or without its field, is a 400 here rather than an upstream's error.
PARTS = ("text", "refusal", "image_url", "input_audio", "file", "audio_url", "video_url")
MEDIA_PARTS = frozenset({"image_url", "audio_url", "video_url"})  # {"url": ...} that the model server fetches

# Where a media part's URL may point (TOLLWAY_MEDIA_URLS): "public" (default): inline ``data:`` URLs, and http(s)
# URLs whose host is a name with a dot outside the local and internal suffixes or a global IP address: never
# the model server's own loopback, a cloud metadata address or a private network it can reach and the client
# cannot; "any": any http(s) or data URL; "inline": data URLs only.
MediaURLs = Literal["public", "any", "inline"]
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".lan", ".intranet")
MAX_PARTS = 1024  # per message


def check_content_parts(messages: list[Any], media: MediaURLs = "public") -> None:
    """A 400 naming the first content part an upstream must not receive: an unknown type, a part without the
    field its type needs (a string for text), or a media URL outside ``media``."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        if len(content) > MAX_PARTS:
            raise InvalidRequest(f"A message may hold at most {MAX_PARTS} content parts.",
                                 param=f"messages[{i}].content")
        for j, part in enumerate(content):
            at = f"messages[{i}].content[{j}]"
            field = part.get("type") if isinstance(part, dict) else None
            if field not in PARTS:
                raise InvalidRequest(f"'{at}.type' must be one of {', '.join(PARTS)}.", param=f"{at}.type",
                                     code="unsupported_content_part")
            value = part.get(field)
            if field in ("text", "refusal"):
                if not isinstance(value, str):
                    raise InvalidRequest(f"'{at}.{field}' must be a string.", param=f"{at}.{field}")
            elif not isinstance(value, dict):
                raise InvalidRequest(f"'{at}.{field}' must be an object.", param=f"{at}.{field}")
            elif field in MEDIA_PARTS:
                url = value.get("url")
                if not isinstance(url, str):
                    raise InvalidRequest(f"'{at}.{field}.url' must be a string.", param=f"{at}.{field}.url")
                if (why := media_url_refusal(url, media)) is not None:
                    raise InvalidRequest(f"'{at}.{field}.url' {why}.", param=f"{at}.{field}.url",
                                         code="media_url_not_allowed")


def media_url_refusal(url: str, media: MediaURLs) -> str | None:
    """Why the model server must not fetch ``url`` under ``media``, or None."""
    scheme = url[:8].partition(":")[0].lower()
    if scheme == "data":
        return None
    if media == "inline":
        return "must be a data: URL (this gateway sends no media URL for a model server to fetch)"
    if scheme not in ("http", "https"):
        return "must be an http(s) or data: URL"
    if media == "any":
        return None
    if "\\" in url or any(c.isspace() or not c.isprintable() for c in url):
        return "holds a backslash, a space or a control character (URL parsers disagree on where its host is)"
    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "names no host"
    address = _address(host)
    if address is not None:
        return None if address.is_global else "points at a loopback, private or reserved address"
    if "." not in host or host == "localhost" or host.endswith(_LOCAL_SUFFIXES):
        return "names a local or internal host"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as the address a resolver would take it for: IPv6 literals, and IPv4 in every form
    ``inet_aton`` reads (``127.1``, ``0x7f000001``, ``2130706433``), IPv4-mapped IPv6 as its IPv4."""
    if ":" in host:
        try:
            v6 = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
        return v6.ipv4_mapped or v6
    if not host.replace(".", "").replace("x", "").isalnum() or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def forbidden_config_fields(names: Iterable[str]) -> list[str]:
    """The transport settings among a config entry's ``forward_fields`` (refused at start-up)."""
    return sorted(set(names) & TRANSPORT)


# Structured output: what a model server compiles into a grammar before it decodes (vLLM's xgrammar or outlines,
# llama.cpp's GBNF), on the server every tenant shares. The compile's time and memory grow with the grammar's
# size and with the counts of its bounded repeats (``a{100000}`` is ten characters), so both are bounded here.
MAX_PATTERN_CHARS = 4_096  # guided_regex, guided_whitespace_pattern, a JSON schema's "pattern"
MAX_GRAMMAR_CHARS = 32_768  # guided_grammar, llama.cpp's grammar, structural_tag
MAX_SCHEMA_CHARS = 65_536  # guided_json, llama.cpp's json_schema, response_format, each tool's parameters
MAX_SCHEMA_DEPTH = 32
MAX_CHOICES, MAX_CHOICE_CHARS = 1_024, 1_024  # guided_choice
MAX_TOOLS = 128  # OpenAI's own limit
MAX_TOOL_NAME = 256  # a function tool's name (OpenAI's own: 64 of [a-zA-Z0-9_-])
MAX_REPEAT = 1_000  # the largest count of a bounded repeat ({n}, {n,m}) in a pattern or a grammar
# A schema's length and count bounds are bounded repeats too: a grammar compiler expands a minimum into as many
# copies, and a maximum into a counter the matcher walks for every token (xgrammar, llguidance, GBNF alike).
COUNT_KEYWORDS = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                            "minContains", "maxContains"})
# Keywords whose values are JSON data, not schemas: a "pattern" or a "maxItems" inside them is nobody's keyword.
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# Keywords whose values map names (a property's, a definition's) to schemas: a property named "default" or
# "maxItems" holds a schema like any other.
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA, _NAMES, _DATA = 0, 1, 2  # what a node of a schema is
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")  # linear: one start per brace, each digit run read once


def _repeats_within(text: str, param: str) -> None:
    for m in _REPEAT.finditer(text):
        before = m.start() - 1
        while before >= 0 and text[before] == "\\":
            before -= 1
        if (m.start() - 1 - before) % 2:  # an escaped brace: a literal, not a repeat
            continue
        over = [c for c in m.groups() if c and (len(c) > 6 or int(c) > MAX_REPEAT)]
        if over:
            raise InvalidRequest(f"'{param}' repeats something {over[0] if len(over[0]) <= 6 else 'millions of'} "
                                 f"times; a bounded repeat may count at most {MAX_REPEAT} (the model server "
                                 "compiles each count into its grammar).", param=param, code="structured_output_limit")


def _text(value: Any, param: str, limit: int) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if len(text) > limit:
        raise InvalidRequest(f"'{param}' holds {len(text)} characters; at most {limit} are compiled into a "
                             "grammar.", param=param, code="structured_output_limit")
    return text


def _schema(value: Any, param: str, counts: bool = True) -> None:
    """A JSON schema (or its text): its size, its depth, each "pattern" in it and, where the model server compiles
    it (``counts``), each length and count bound (``COUNT_KEYWORDS``) at ``MAX_REPEAT``."""
    _text(value, param, MAX_SCHEMA_CHARS)
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return  # not JSON: the model server says so
    stack: list[tuple[Any, int, int]] = [(value, 1, _SCHEMA)]
    while stack:
        node, depth, kind = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"'{param}' nests deeper than {MAX_SCHEMA_DEPTH} levels.", param=param,
                                 code="structured_output_limit")
        if isinstance(node, dict):
            for key, item in node.items():
                if kind == _SCHEMA:
                    if key == "pattern" and isinstance(item, str):
                        _repeats_within(_text(item, param, MAX_PATTERN_CHARS), param)
                    elif counts and key in COUNT_KEYWORDS and _count_over(item):
                        shown = item if item < 1e9 else "a billion or more"
                        raise InvalidRequest(
                            f"'{param}' sets {key} to {shown}; a schema's length and count bounds may be at most "
                            f"{MAX_REPEAT} (the model server compiles each into its grammar, on a server every "
                            "tenant shares): leave the bound out or lower it.", param=param,
                            code="structured_output_limit")
                    child = _DATA if key in DATA_KEYWORDS else _NAMES if key in NAMED_SCHEMAS else _SCHEMA
                else:  # a map's values are schemas; data stays data
                    child = _SCHEMA if kind == _NAMES else _DATA
                stack.append((item, depth + 1, child))
        elif isinstance(node, list):
            stack.extend((item, depth + 1, _DATA if kind == _DATA else _SCHEMA) for item in node)


def _count_over(value: Any) -> bool:
    """Whether a length or count bound (an integer, or a float JSON wrote for one) is past ``MAX_REPEAT``."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_REPEAT


def _tools_compiled(body: Mapping[str, Any]) -> bool:
    """Whether the model server compiles the tools' parameter schemas into a grammar: a call it must make
    (``tool_choice`` "required" or a named function) or a strict function. With ``auto`` it reads the calls the
    model wrote, and an agent's tool schemas (a file's ``content`` up to 100,000 characters) are only text."""
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        return True
    tools = body.get("tools")
    return isinstance(tools, list) and any(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("strict") is True
        for t in tools)


def check_structured_output(body: Mapping[str, Any]) -> None:
    """A 400 naming the first structured-output field past what a shared model server should be asked to
    compile: its size, a schema's depth, a bounded repeat's count (in a pattern, a grammar, or a schema's length
    and count bounds), the number of choices or tools; tools (or functions) that are not a list of objects, and a
    function tool without a name (read while its schema is)."""
    for name in ("guided_regex", "guided_whitespace_pattern"):
        if isinstance(value := body.get(name), str):
            _repeats_within(_text(value, name, MAX_PATTERN_CHARS), name)
    for name in ("guided_grammar", "grammar"):
        if isinstance(value := body.get(name), str):
            _repeats_within(_text(value, name, MAX_GRAMMAR_CHARS), name)
    if (value := body.get("structural_tag")) is not None:
        _text(value, "structural_tag", MAX_GRAMMAR_CHARS)
    for name in ("guided_json", "json_schema", "response_format"):
        if (value := body.get(name)) is not None:
            _schema(value, name)
    choices = body.get("guided_choice")
    if isinstance(choices, list) and (len(choices) > MAX_CHOICES or any(
            isinstance(c, str) and len(c) > MAX_CHOICE_CHARS for c in choices)):
        raise InvalidRequest(f"'guided_choice' may hold at most {MAX_CHOICES} choices of at most {MAX_CHOICE_CHARS} "
                             "characters each.", param="guided_choice", code="structured_output_limit")
    for name in ("tools", "functions"):  # shapes an upstream would refuse after a round trip: refused here
        listed = body.get(name)
        if listed is not None and not isinstance(listed, list):
            raise InvalidRequest(f"'{name}' must be a list of objects.", param=name)
        for i, item in enumerate(listed or ()):
            if not isinstance(item, dict):
                raise InvalidRequest(f"'{name}[{i}]' must be an object.", param=f"{name}[{i}]")
    tools = body.get("tools")
    if isinstance(tools, list):
        if len(tools) > MAX_TOOLS:
            raise InvalidRequest(f"At most {MAX_TOOLS} tools are allowed.", param="tools",
                                 code="structured_output_limit")
        compiled = _tools_compiled(body)
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(tool, dict) and tool.get("type", "function") == "function" and not (
                    isinstance(function, dict) and isinstance(function.get("name"), str)
                    and 0 < len(function["name"]) <= MAX_TOOL_NAME):
                raise InvalidRequest(f"tools[{i}]: a function tool needs a name of 1 to {MAX_TOOL_NAME} characters.",
                                     param=f"tools[{i}].function.name")
            if isinstance(function, dict) and function.get("parameters") is not None:
                _schema(function["parameters"], f"tools[{i}].function.parameters", counts=compiled)


# Lists a model server walks for every token it generates, on the server every tenant shares (vLLM checks each stop
# string against the new text, each stop token and bad word, each biased token, per step): bounded like the
# grammars above. OpenAI's own API takes 4 stop sequences; these bounds leave room for a vLLM client's.
MAX_STOPS, MAX_STOP_CHARS = 32, 1_024  # stop: sequences, characters each
MAX_TOKEN_LISTS = 1_024  # stop_token_ids, bad_words (each of MAX_STOP_CHARS at most), logit_bias entries
MAX_ALLOWED_TOKENS = 262_144  # allowed_token_ids: a vocabulary's size (a mask built once per request)


def _sampling_limit(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' {what} (the model server checks it at every token it generates, on a server "
                          "every tenant shares).", param=param, code="sampling_limit")


def check_sampling(body: Mapping[str, Any]) -> None:
    """A 400 naming the first per-token list past its bound (``MAX_STOPS`` ...), and ``best_of`` above ``n``: the
    sequences it generates and throws away are neither reserved in a budget nor reported in usage."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > MAX_STOPS:
        raise _sampling_limit("stop", f"holds {len(stops)} sequences; at most {MAX_STOPS} are allowed")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise _sampling_limit("stop", f"holds a sequence longer than {MAX_STOP_CHARS} characters")
    for name in ("stop_token_ids", "bad_words"):
        value = body.get(name)
        if isinstance(value, list) and len(value) > MAX_TOKEN_LISTS:
            raise _sampling_limit(name, f"holds {len(value)} entries; at most {MAX_TOKEN_LISTS} are allowed")
    words = body.get("bad_words")
    if isinstance(words, list) and any(isinstance(w, str) and len(w) > MAX_STOP_CHARS for w in words):
        raise _sampling_limit("bad_words", f"holds a word longer than {MAX_STOP_CHARS} characters")
    bias = body.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > MAX_TOKEN_LISTS:
        raise _sampling_limit("logit_bias", f"biases {len(bias)} tokens; at most {MAX_TOKEN_LISTS} are allowed")
    allowed = body.get("allowed_token_ids")
    if isinstance(allowed, list) and len(allowed) > MAX_ALLOWED_TOKENS:
        raise _sampling_limit("allowed_token_ids", f"holds {len(allowed)} tokens; at most {MAX_ALLOWED_TOKENS}")
    best_of, n = body.get("best_of"), body.get("n", 1)
    if isinstance(best_of, int) and not isinstance(best_of, bool) and isinstance(n, int) and best_of > max(n, 1):
        raise InvalidRequest("best_of above n is not served: the sequences it generates and discards would be "
                             "neither reserved in a budget nor billed. Use n.", param="best_of")


def check_client_fields(endpoint: str, body: Mapping[str, Any], extra: frozenset[str] = frozenset()) -> None:
    """A 400 naming the first field a client may not send to this endpoint's upstream, a structured-output field
    past its bounds (``check_structured_output``), or a per-token list past its bounds (``check_sampling``)."""
    if endpoint == "chat":
        check_structured_output(body)
        check_sampling(body)
    allowed = ALLOWED[endpoint]
    for name in body:
        if name in allowed or name in extra:
            continue
        if name in TRANSPORT:
            raise InvalidRequest(f"'{name}' is a transport or credential setting; where a request goes and with "
                                 "which credentials is set in the gateway's config, never by a client.",
                                 param=name, code="forbidden_field")
        raise InvalidRequest(f"Unsupported field '{name}': it is not an OpenAI request field, a documented "
                             "decoding extra, or a field this gateway's config forwards.", param=name,
                             code="unsupported_field")


def upstream_body(endpoint: str, body: Mapping[str, Any], model: str, extra: frozenset[str] = frozenset()) -> \
        dict[str, Any]:
    """The body one attempt sends: the allowed fields of ``body`` with the upstream's model name."""
    allowed = ALLOWED[endpoint]  # not merged with ``extra``: no set is built per attempt
    out = {k: v for k, v in body.items() if (k in allowed or k in extra) and k not in TRANSPORT}
    out["model"] = model
    return out
