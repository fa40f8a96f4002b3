"""``tollway sim-upstream``: a scripted OpenAI/vLLM-compatible upstream.

For tests, benchmarks, and load-testing a config without GPUs. It answers chat completions (stream
and not) with exact usage, embeddings, ``/v1/models`` and a Prometheus ``/metrics`` with vLLM's names.
Timing is configurable (TTFT, tokens/s, a concurrency limit with a queue). Faults are chosen by a
word in the model name (``sim-error``, ``big-overloaded``) or for every request by ``--fault``:

    error       500 with an OpenAI error body
    overloaded  429 with retry-after
    timeout     never answers (until the client gives up); embeddings and rerank too
    cut         a stream broken off half-way (connection dropped, no [DONE])
    malformed   invalid JSON (body, or one stream frame)
    ignoremax   keeps generating past max_tokens (for budget tests)
    flap        every other request fails with a 500 (a replica that flaps)
    reject      400: the upstream calls the request invalid (must not be retried elsewhere)

One behaviour is chosen the same way (``sim-echo``, or ``--echo`` for every request): the answer is the
last user message, word for word, streamed in pieces of ``--chunk-chars`` characters (default 3) so that
anything in it (an email address, a card number) is split across frames: guard tests plant exact output.

Another answers from a fixture file (``--fixture FILE``, or ``sim-fixture`` in the model name with
``--fixture``): a JSON object with an ``answer``, a ``wrong`` answer and an ``error_rate``, and ``rules``
that override them for requests of one ``model`` and/or whose messages contain a string (``contains``):
each request gets the wrong answer with the matching rule's error rate (seeded: ``seed``; a request with
a ``user`` draws from the seed, its model, user and messages, so its answer does not depend on what the upstream
served before it: a retry or a probe elsewhere in a test run never shifts another request's draw). The file is
re-read when it changes, so a test can plant a regression in a running upstream:

    {"answer": "Paris is the capital of France.", "wrong": "I'm sorry, I can't help with that.",
     "error_rate": 0.05, "seed": 7, "rules": [{"contains": "prompt v2", "error_rate": 0.5}]}

A model with ``tools`` in its name (``sim-tools``) calls the request's first function tool, with the last
user message as ``{"query": ...}``, unless the last message is already a tool result (then it answers
as usual): for agent loops through the gateway's APIs.

A model with ``reasons`` in its name (``sim-echo-reasons``) reasons first, as a model behind vLLM's reasoning
parser does: ``reasoning_content`` (streamed in ``--chunk-chars`` pieces before the answer) restates the last
user message, and its words count as completion tokens.

A request's predicted output (``prediction``) is billed as OpenAI bills a prediction it rejects: each of its
words one more completion token.

A model with ``nousage`` in its name (``sim-tools-nousage``) reports no usage, in answers or streams (as the
llama-cpp-python server's streams and some other OpenAI-compatible servers): the gateway estimates it.

It also serves ``/v1/rerank`` (vLLM's shape): relevance is the share of the query's words a document holds.

Token accounting is deliberately simple so tests can predict it: a prompt costs one token per
whitespace-separated word of every message's text (and of the tool calls and definitions a template renders),
1,024 per image, audio or video part; the answer is one word per token.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import struct
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

FAULTS = ("error", "overloaded", "timeout", "cut", "malformed", "ignoremax", "flap", "reject")
WORDS = ("the", "gateway", "keeps", "spend", "within", "budget", "and", "routes", "each", "request",
         "to", "a", "model", "that", "can", "serve", "it")


@dataclass
class SimConfig:
    models: list[str] = field(default_factory=lambda: ["sim-large", "sim-small", "sim-embed"])
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0: instant
    completion_tokens: int = 16
    max_concurrency: int = 0  # 0: unlimited
    fault: str | None = None
    embedding_dims: int = 16
    echo: bool = False
    chunk_chars: int = 3
    fixture: Path | None = None
    api_key: str | None = None  # as vLLM's --api-key: /v1/ requests without "Bearer KEY" get a 401


@dataclass
class Fixture:
    """The fixture behaviour's file, re-read when its modification time changes."""

    path: Path
    mtime: float = -1.0
    data: dict[str, Any] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def answer(self, model: str, messages: list[Any], user: object = None) -> str:
        mtime = self.path.stat().st_mtime
        if mtime != self.mtime:
            self.data, self.mtime = orjson.loads(self.path.read_bytes()), mtime
            self.rng = random.Random(self.data.get("seed"))
        text = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        rule = dict(self.data)
        for r in self.data.get("rules") or []:
            if r.get("model", model) == model and str(r.get("contains", "")) in text:
                rule.update(r)
                break
        rng = random.Random(f"{self.data.get('seed')}|{model}|{user}|{text}") if isinstance(user, str) else self.rng
        wrong = rng.random() < float(rule.get("error_rate") or 0)
        return str(rule.get("wrong") if wrong else rule.get("answer"))


@dataclass
class SimState:
    config: SimConfig
    running: int = 0
    waiting: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    recent: defaultdict[str, deque[dict[str, Any]]] = field(  # by model, its 20 newest request bodies, for tests
        default_factory=lambda: defaultdict(lambda: deque(maxlen=20)))
    semaphore: asyncio.Semaphore | None = None
    fixture: Fixture | None = None


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, code: str) -> Response:
    headers = {"retry-after": "1"} if status == 429 else None
    return _json({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                 status, headers)


MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "audio_url", "video_url"})
MEDIA_TOKENS = 1_024


def prompt_tokens(messages: list[dict[str, Any]], body: dict[str, Any] | None = None) -> int:
    """Words of the prompt as a chat template renders it: each message's text, the names and arguments of the
    tool calls it carries, and the body's tool (or function) definitions and documents as JSON; and
    ``MEDIA_TOKENS`` for each image, audio or video part, as a vision model charges a picture's patches."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(p.get("text", "").split()) for p in content if isinstance(p, dict))
            total += MEDIA_TOKENS * sum(1 for p in content if isinstance(p, dict) and p.get("type") in MEDIA_PARTS)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                total += len(f"{function.get('name', '')} {function.get('arguments', '')}".split())
    for name in ("tools", "functions", "documents"):
        if definitions := (body or {}).get(name):
            total += len(json.dumps(definitions).split())
    return total


def reports_usage(model: str) -> bool:
    return "nousage" not in model.replace("_", "-").split("-")


def echoes(model: str, config: SimConfig) -> bool:
    return config.echo or "echo" in model.replace("_", "-").split("-")


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def fault_of(model: str, config: SimConfig) -> str | None:
    if config.fault:
        return config.fault
    parts = set(model.replace("_", "-").split("-"))
    return next((f for f in FAULTS if f in parts), None)


class _Slot:
    """Concurrency limit with a visible queue, as vLLM's running/waiting gauges show it."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    async def __aenter__(self) -> None:
        sem = self.state.semaphore
        if sem is not None:
            self.state.waiting += 1
            try:
                await sem.acquire()
            finally:
                self.state.waiting -= 1
        self.state.running += 1

    async def __aexit__(self, *exc: object) -> None:
        self.state.running -= 1
        if self.state.semaphore is not None:
            self.state.semaphore.release()


def _state(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


async def chat(request: Request) -> Response:
    state = _state(request)
    try:
        body = orjson.loads(await request.body())
        model, messages = str(body["model"]), list(body["messages"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return _error(400, "body must be JSON with model and messages", "invalid_request")
    state.requests[model] += 1
    state.recent[model].append(body)
    config = state.config
    fault = fault_of(model, config)
    if fault == "error" or (fault == "flap" and sum(state.requests.values()) % 2 == 1):
        return _error(500, "scripted failure", "internal_error")
    if fault == "reject":
        return _error(400, "scripted rejection: this request is invalid here", "invalid_request")
    if fault == "overloaded":
        return _error(429, "scripted overload", "rate_limit_exceeded")
    if fault == "timeout":
        await asyncio.sleep(3600)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    n = config.completion_tokens
    if isinstance(max_tokens, int) and fault != "ignoremax":
        n = min(n, max_tokens)
    p_tokens = prompt_tokens(messages, body)
    if state.fixture is not None and fault is None:
        echoed = state.fixture.answer(model, messages, body.get("user"))
        n = len(echoed.split())
        pieces = [("" if i == 0 else " ") + w for i, w in enumerate(echoed.split())]
    elif echoes(model, config):
        echoed = _last_user_text(messages)
        n = len(echoed.split())
        step = max(config.chunk_chars, 1)
        pieces = [echoed[i:i + step] for i in range(0, len(echoed), step)]
    else:
        echoed = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        pieces = [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n)]
    call = _tool_call(model, body, messages)
    if call is not None:
        n = len(call["function"]["arguments"].split())
    thought = f"The user wrote: {_last_user_text(messages)}" if "reasons" in model.split("-") else None
    if thought is not None:
        n += len(thought.split())
    choices = body.get("n") if isinstance(body.get("n"), int) and 1 <= body["n"] <= 16 else 1  # each the same answer
    rejected = _prediction_words(body.get("prediction"))
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and reports_usage(model)
        return StreamingResponse(_stream(state, model, pieces, n + rejected, p_tokens, include_usage, fault, call,
                                         choices, thought), media_type="text/event-stream")
    async with _Slot(state):
        await _pace(config.ttft_ms / 1000)
        await _pace(n / config.tokens_per_s if config.tokens_per_s else 0)
    if fault == "malformed":
        return Response(b'{"id": "broken", "choices": [', media_type="application/json")
    message: dict[str, Any] = {"role": "assistant", "content": echoed}
    if thought is not None:
        message["reasoning_content"] = thought
    finish = "length" if n == max_tokens else "stop"
    if call is not None:
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    answer: dict[str, Any] = {
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": message, "finish_reason": finish} for i in range(choices)],
    }
    if reports_usage(model):
        answer["usage"] = {"prompt_tokens": p_tokens, "completion_tokens": n * choices + rejected,
                           "total_tokens": p_tokens + n * choices + rejected}
    return _json(answer)


def _prediction_words(prediction: Any) -> int:
    """A predicted output's words, every one rejected: OpenAI bills rejected prediction tokens as completion
    tokens, beyond ``max_tokens``."""
    content = prediction.get("content") if isinstance(prediction, dict) else None
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return len(content.split()) if isinstance(content, str) else 0


async def _pace(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _tool_call(model: str, body: dict[str, Any], messages: list[Any]) -> dict[str, Any] | None:
    """The tool call a ``tools`` model makes (see the module's docstring), or None."""
    tools = body.get("tools")
    if "tools" not in model.split("-") or not isinstance(tools, list) or not tools:
        return None
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    name = ((tools[0] or {}).get("function") or {}).get("name") or "tool"
    return {"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
            "function": {"name": name, "arguments": orjson.dumps({"query": _last_user_text(messages)}).decode()}}


async def _stream(state: SimState, model: str, pieces: list[str], n: int, p_tokens: int, include_usage: bool,
                  fault: str | None, call: dict[str, Any] | None = None, choices: int = 1,
                  thought: str | None = None) -> AsyncIterator[bytes]:
    """``pieces``: the answer's content deltas, one frame each (per choice, interleaved as vLLM sends ``n``
    choices); ``n``: its completion tokens; ``call``: a tool call to stream instead (its arguments in pieces of
    three characters); ``thought``: reasoning streamed before the answer."""
    config = state.config
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    async with _Slot(state):
        await _pace(config.ttft_ms / 1000)
        for index in range(choices):
            yield _frame(chunk({"role": "assistant", "content": ""}, index=index))
        step = max(config.chunk_chars, 1)
        for i in range(0, len(thought or ""), step):
            for index in range(choices):
                yield _frame(chunk({"reasoning_content": (thought or "")[i:i + step]}, index=index))
        if call is not None:
            function = call["function"]
            for index in range(choices):
                yield _frame(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                    "function": {"name": function["name"], "arguments": ""}}]},
                                   index=index))
            arguments = function["arguments"]
            for i in range(0, len(arguments), 3):
                for index in range(choices):
                    yield _frame(chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + 3]}}]},
                                       index=index))
            pieces = []
        per_token = 1 / config.tokens_per_s if config.tokens_per_s else 0
        for i, piece in enumerate(pieces):
            if fault == "cut" and i == len(pieces) // 2:
                await asyncio.sleep(0.2)  # let what was sent arrive, as a real network would
                raise ConnectionAbortedError("scripted cut")  # the server drops the connection
            if fault == "malformed" and i == len(pieces) // 2:
                yield b"data: {not json\n\n"
            await _pace(per_token)
            for index in range(choices):
                yield _frame(chunk({"content": piece}, index=index))
        for index in range(choices):
            yield _frame(chunk({}, "stop" if call is None else "tool_calls", index=index))
        if include_usage:
            yield _frame({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [], "usage": {"prompt_tokens": p_tokens, "completion_tokens": n * choices,
                                                   "total_tokens": p_tokens + n * choices}})
        yield b"data: [DONE]\n\n"


def _vector(text: str, dims: int) -> list[float]:
    digest = b""
    counter = 0
    while len(digest) < dims * 4:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = struct.unpack(f"<{dims}I", digest[: dims * 4])
    return [v / 2**32 - 0.5 for v in raw]


async def _scripted_fault(model: str, config: SimConfig) -> Response | None:
    """The faults embeddings and rerank play: ``error`` answers a 500, ``timeout`` never answers."""
    fault = fault_of(model, config)
    if fault == "timeout":
        await asyncio.sleep(3600)
    return _error(500, "scripted failure", "internal_error") if fault == "error" else None


async def embeddings(request: Request) -> Response:
    state = _state(request)
    body = orjson.loads(await request.body())
    model = str(body.get("model"))
    state.requests[model] += 1
    if (failed := await _scripted_fault(model, state.config)) is not None:
        return failed
    inputs = body.get("input")
    if isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs):
        inputs = [inputs]  # one input of token ids, as OpenAI's API takes it
    texts = inputs if isinstance(inputs, list) else [inputs]
    texts = [t if isinstance(t, str) else " ".join(map(str, t)) for t in texts]
    data = [{"object": "embedding", "index": i, "embedding": _vector(t, state.config.embedding_dims)}
            for i, t in enumerate(texts)]
    tokens = sum(len(t.split()) for t in texts)
    return _json({"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


_WORD = re.compile(r"\w+")


async def rerank(request: Request) -> Response:
    """``/v1/rerank`` as vLLM serves it: a document's relevance is the share of the query's words it holds
    (ties: the shorter first); usage counts words, as chat does."""
    state = _state(request)
    try:
        body = orjson.loads(await request.body())
        model, query, documents = str(body["model"]), str(body["query"]), list(body["documents"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return _error(400, "body must be JSON with model, query and documents", "invalid_request")
    state.requests[model] += 1
    state.recent[model].append(body)
    if (failed := await _scripted_fault(model, state.config)) is not None:
        return failed
    words = set(_WORD.findall(query.lower()))
    texts = [d if isinstance(d, str) else str((d or {}).get("text", "")) for d in documents]
    scores = [len(words & set(_WORD.findall(t.lower()))) / max(len(words), 1) - len(t) * 1e-9 for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:body.get("top_n") or len(texts)]
    tokens = len(query.split()) * len(texts) + sum(len(t.split()) for t in texts)
    return _json({"id": "rerank-" + uuid.uuid4().hex, "model": model,
                  "results": [{"index": i, "relevance_score": round(scores[i], 6)} for i in order],
                  "usage": {"total_tokens": tokens}})


async def models(request: Request) -> Response:
    names = _state(request).config.models
    return _json({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "sim"}
                                              for m in names]})


async def metrics(request: Request) -> Response:
    state = _state(request)
    limit = state.config.max_concurrency
    usage = state.running / limit if limit else 0.0
    lines = []
    for model in state.config.models[:1] or ["sim"]:
        label = f'{{model_name="{model}"}}'
        lines += [f"vllm:num_requests_running{label} {state.running}",
                  f"vllm:num_requests_waiting{label} {state.waiting}",
                  f"vllm:gpu_cache_usage_perc{label} {usage}"]
    lines += [f'tollway_sim_requests_total{{model="{m}"}} {c}' for m, c in sorted(state.requests.items())]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def stats(request: Request) -> Response:
    state = _state(request)
    return _json({"requests": dict(state.requests), "total": sum(state.requests.values()),
                  "running": state.running, "waiting": state.waiting})


async def last_request(request: Request) -> Response:
    """The last request body for ``model``; with ``contains``, the last of its 20 newest whose messages hold that
    text (a test that shares the upstream with other tests' late requests finds its own)."""
    bodies = _state(request).recent.get(request.query_params.get("model", ""), ())
    text = request.query_params.get("contains")
    body = next((b for b in reversed(bodies) if text is None or text in orjson.dumps(b.get("messages")).decode()),
                None)
    return _json(body) if body is not None else _error(404, "no request for that model yet", "not_found")


class _KeyRequired:
    """vLLM's --api-key: every /v1/ path wants ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") \
                and dict(scope["headers"]).get(b"authorization") != self.expected:
            await _error(401, "Unauthorized", "invalid_api_key")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_sim_app(config: SimConfig) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/sim/last-request", last_request, methods=["GET"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/sim/stats", stats, methods=["GET"]),
        Route("/health", lambda request: Response("ok"), methods=["GET"]),
    ])
    if config.api_key is not None:
        app.add_middleware(_KeyRequired, key=config.api_key)
    state = SimState(config)
    if config.max_concurrency:
        state.semaphore = asyncio.Semaphore(config.max_concurrency)
    if config.fixture is not None:
        state.fixture = Fixture(config.fixture)
    app.state.sim = state
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--models", default="sim-large,sim-small,sim-embed",
                        help="comma-separated model ids listed at /v1/models (any id is served)")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0 answers at once")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=0, help="0 is unlimited; above it requests queue")
    parser.add_argument("--fault", choices=FAULTS, default=None, help="inject this fault into every request")
    parser.add_argument("--embedding-dims", type=int, default=16)
    parser.add_argument("--echo", action="store_true", help="every answer is the last user message (see sim-echo)")
    parser.add_argument("--chunk-chars", type=int, default=3, help="echo: characters per streamed frame")
    parser.add_argument("--fixture", type=Path, help="answer from this JSON file with its error rates (see above)")
    parser.add_argument("--api-key", help="as vLLM's --api-key: /v1/ requests must send 'Authorization: Bearer KEY'")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    config = SimConfig(models=[m for m in args.models.split(",") if m], ttft_ms=args.ttft_ms,
                       tokens_per_s=args.tokens_per_s, completion_tokens=args.completion_tokens,
                       max_concurrency=args.max_concurrency, fault=args.fault, embedding_dims=args.embedding_dims,
                       echo=args.echo, chunk_chars=args.chunk_chars, fixture=args.fixture, api_key=args.api_key)
    # It stops within a second of SIGTERM, even holding requests open on purpose (``sim-timeout`` never
    # answers): without the bound uvicorn waited for them, and a test session's end waited 20 s to kill it.
    uvicorn.run(create_sim_app(config), host=args.host, port=args.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", timeout_graceful_shutdown=1)
