"""Upstream clients behind one interface.

``OpenAIUpstream`` is the fast path for OpenAI-compatible servers (vLLM, llama.cpp, the scripted
upstream): one pooled aiohttp session, bodies as ``tollway.routing.wire`` built them. ``LiteLLMUpstream`` is for
providers that need translation. Foreign errors become ``tollway.errors`` here and nowhere else:
``map_upstream_errors`` for transport errors, ``raise_for_upstream_status`` for HTTP answers,
``_map_litellm_error`` for litellm's exception tree.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import aiohttp
import orjson

from tollway.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tollway.jsontypes import JSON
from tollway.routing.catalog import UpstreamSpec
from tollway.routing.wire import TRANSPORT


class UpstreamStream(Protocol):
    """An opened stream: the upstream answered 200; chunks are parsed JSON objects."""

    def __aiter__(self) -> AsyncIterator[JSON]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    spec: UpstreamSpec

    async def complete(self, body: JSON) -> JSON: ...

    async def open_stream(self, body: JSON) -> UpstreamStream: ...

    async def embed(self, body: JSON) -> JSON: ...

    async def rerank(self, body: JSON) -> JSON: ...

    async def list_models(self) -> list[str]: ...

    async def aclose(self) -> None: ...


@contextmanager
def map_upstream_errors(name: str) -> Iterator[None]:
    """Transport failures of the aiohttp client, mapped to the most specific domain error."""
    try:
        yield
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"upstream {name} timed out") from exc
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
        raise UpstreamUnavailable(f"upstream {name} is unreachable") from exc
    except aiohttp.ClientPayloadError as exc:
        raise UpstreamBadResponse(f"upstream {name} broke off its response") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"upstream {name} failed: {type(exc).__name__}") from exc


def _upstream_message(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:  # a page or plain text: on one line, as a log line and an error message are
        return " ".join(raw[:200].decode("utf-8", "replace").split())
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return raw[:200].decode("utf-8", "replace")


def raise_for_upstream_status(name: str, status: int, raw: bytes) -> None:
    if status < 400:
        return
    message = _upstream_message(raw)
    if status in (400, 413, 422):
        raise UpstreamRejected(f"upstream {name} rejected the request: {message}")
    if status in (408, 504):
        raise UpstreamTimeout(f"upstream {name} timed out ({status})")
    if status in (429, 503):
        raise UpstreamUnavailable(f"upstream {name} is overloaded ({status}): {message}")
    if status in (401, 403):
        raise UpstreamError(f"upstream {name} refused Tollway's credentials ({status})",
                            code="upstream_auth_failed")
    if status == 404:
        raise UpstreamError(f"upstream {name} does not serve this model: {message}",
                            code="upstream_model_not_found")
    raise UpstreamError(f"upstream {name} failed ({status}): {message}")


def _loads_object(name: str, raw: bytes) -> JSON:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UpstreamBadResponse(f"upstream {name} sent malformed JSON") from exc
    if not isinstance(data, dict):
        raise UpstreamBadResponse(f"upstream {name} sent JSON that is not an object")
    return data


class _SSEStream:
    """Server-sent events from an aiohttp response, parsed one ``data:`` line at a time."""

    def __init__(self, name: str, response: aiohttp.ClientResponse) -> None:
        self._name = name
        self._response = response

    async def __aiter__(self) -> AsyncIterator[JSON]:
        done = False
        with map_upstream_errors(self._name):
            async for line in self._response.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                yield _loads_object(self._name, payload)
        if not done:
            raise UpstreamBadResponse(f"upstream {self._name} ended the stream without [DONE]",
                                      code="upstream_stream_cut")

    async def aclose(self) -> None:
        self._response.close()


class OpenAIUpstream:
    """OpenAI-compatible HTTP upstream over a shared pooled aiohttp session."""

    def __init__(self, spec: UpstreamSpec, session: aiohttp.ClientSession) -> None:
        assert spec.base_url is not None
        self.spec = spec
        self._base: str = spec.base_url
        self._session = session
        self._headers = {"content-type": "application/json"}
        if spec.api_key:
            self._headers["authorization"] = f"Bearer {spec.api_key}"
        self._timeout = aiohttp.ClientTimeout(total=spec.timeout_s, sock_connect=spec.connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=spec.connect_timeout_s, sock_read=spec.timeout_s)

    async def _post_json(self, path: str, body: JSON) -> JSON:
        with map_upstream_errors(self.spec.name):
            async with self._session.post(self._base + path, data=orjson.dumps(body),
                                          headers=self._headers, timeout=self._timeout) as resp:
                raw = await resp.read()
        raise_for_upstream_status(self.spec.name, resp.status, raw)
        return _loads_object(self.spec.name, raw)

    async def complete(self, body: JSON) -> JSON:
        return await self._post_json("/chat/completions", body)

    async def embed(self, body: JSON) -> JSON:
        return await self._post_json("/embeddings", body)

    async def rerank(self, body: JSON) -> JSON:
        """``/rerank`` under the upstream's base URL (vLLM's ``/v1/rerank``; Jina's and Cohere's v1 shape)."""
        return await self._post_json("/rerank", body)

    async def open_stream(self, body: JSON) -> UpstreamStream:
        with map_upstream_errors(self.spec.name):
            resp = await self._session.post(self._base + "/chat/completions", data=orjson.dumps(body),
                                            headers=self._headers, timeout=self._stream_timeout)
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
                raise_for_upstream_status(self.spec.name, resp.status, raw)
        return _SSEStream(self.spec.name, resp)

    async def list_models(self) -> list[str]:
        with map_upstream_errors(self.spec.name):
            async with self._session.get(self._base + "/models", headers=self._headers,
                                         timeout=self._timeout) as resp:
                raw = await resp.read()
        if resp.status in (401, 403):
            raise UpstreamError(f"GET {self._base}/models answered {resp.status}: the upstream wants an API key, or "
                                "another one (TOLLWAY_UPSTREAM_API_KEY for --upstream; api_key: env::NAME in a config "
                                "file)",
                                code="upstream_auth_failed")
        not_a_base = f"is {self._base} the server's OpenAI-compatible base URL (most end in /v1)?"
        if resp.status in (404, 405):  # a page server or another API: the base URL is not an OpenAI-style one
            raise UpstreamBadResponse(f"GET {self._base}/models answered {resp.status}: {not_a_base}")
        raise_for_upstream_status(self.spec.name, resp.status, raw)
        try:
            data = _loads_object(self.spec.name, raw).get("data")
        except UpstreamBadResponse as exc:
            raise UpstreamBadResponse(f"{exc.message} at GET {self._base}/models: {not_a_base}") from None
        if not isinstance(data, list):
            raise UpstreamBadResponse(f"upstream {self.spec.name} sent a model list without 'data'")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def aclose(self) -> None:
        """The shared session is closed by its owner."""


def _map_litellm_error(name: str, exc: Exception) -> UpstreamError:
    import litellm

    if isinstance(exc, litellm.exceptions.Timeout):
        return UpstreamTimeout(f"upstream {name} timed out")
    if isinstance(exc, litellm.exceptions.RateLimitError | litellm.exceptions.ServiceUnavailableError):
        return UpstreamUnavailable(f"upstream {name} is overloaded: {exc.message}")
    if isinstance(exc, litellm.exceptions.APIConnectionError):
        return UpstreamUnavailable(f"upstream {name} is unreachable")
    if isinstance(exc, litellm.exceptions.BadRequestError):
        return UpstreamRejected(f"upstream {name} rejected the request: {exc.message}")
    if isinstance(exc, litellm.exceptions.AuthenticationError | litellm.exceptions.PermissionDeniedError):
        return UpstreamError(f"upstream {name} refused Tollway's credentials", code="upstream_auth_failed")
    if isinstance(exc, litellm.exceptions.NotFoundError):
        return UpstreamError(f"upstream {name} does not serve this model", code="upstream_model_not_found")
    return UpstreamError(f"upstream {name} failed: {type(exc).__name__}")


class _LiteLLMStream:
    def __init__(self, name: str, response: Any) -> None:
        self._name = name
        self._response = response

    async def __aiter__(self) -> AsyncIterator[JSON]:
        try:
            async for chunk in self._response:
                yield chunk.model_dump(exclude_none=True)
        except UpstreamError:
            raise
        except Exception as exc:
            raise _map_litellm_error(self._name, exc) from exc

    async def aclose(self) -> None:
        close = getattr(self._response, "aclose", None)
        if close is not None:
            await close()


class LiteLLMUpstream:
    """Providers that need request/response translation, through litellm."""

    def __init__(self, spec: UpstreamSpec) -> None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("LITELLM_TELEMETRY", "False")
        self.spec = spec

    def _kwargs(self, body: JSON) -> JSON:
        # The fallback chain built ``body`` from the allow-list; transport settings are dropped here as well,
        # since litellm would take them from its keyword arguments.
        kwargs = {k: v for k, v in body.items() if k not in TRANSPORT}
        kwargs["timeout"] = self.spec.timeout_s
        kwargs["num_retries"] = 0
        if self.spec.base_url:
            kwargs["api_base"] = self.spec.base_url
        if self.spec.api_key:
            kwargs["api_key"] = self.spec.api_key
        return kwargs

    async def complete(self, body: JSON) -> JSON:
        import litellm

        try:
            response = await litellm.acompletion(**self._kwargs(body))
        except Exception as exc:
            raise _map_litellm_error(self.spec.name, exc) from exc
        result: JSON = response.model_dump(exclude_none=True)
        return result

    async def open_stream(self, body: JSON) -> UpstreamStream:
        import litellm

        try:
            response = await litellm.acompletion(**self._kwargs(body))
        except Exception as exc:
            raise _map_litellm_error(self.spec.name, exc) from exc
        return _LiteLLMStream(self.spec.name, response)

    async def embed(self, body: JSON) -> JSON:
        import litellm

        kwargs = self._kwargs(body)
        try:
            response = await litellm.aembedding(**kwargs)
        except Exception as exc:
            raise _map_litellm_error(self.spec.name, exc) from exc
        result: JSON = response.model_dump(exclude_none=True)
        return result

    async def rerank(self, body: JSON) -> JSON:
        import litellm

        try:
            response = await litellm.arerank(**self._kwargs(body))
        except Exception as exc:
            raise _map_litellm_error(self.spec.name, exc) from exc
        result: JSON = response.model_dump(exclude_none=True) if hasattr(response, "model_dump") else dict(response)
        return result

    async def list_models(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None


def new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, read_bufsize=2**20, json_serialize=lambda o: orjson.dumps(o).decode())


def build_upstream(spec: UpstreamSpec, session: aiohttp.ClientSession) -> Upstream:
    if spec.kind == "litellm":
        return LiteLLMUpstream(spec)
    return OpenAIUpstream(spec, session)


async def discover(upstreams: list[Upstream], timeout_s: float) -> dict[str, list[str]]:
    """Ask each upstream that wants it for its model list, concurrently."""
    wanted = [u for u in upstreams if u.spec.discover_models]
    results = await asyncio.gather(*(asyncio.wait_for(u.list_models(), timeout_s) for u in wanted),
                                   return_exceptions=True)
    found: dict[str, list[str]] = {}
    for upstream, result in zip(wanted, results, strict=True):
        if isinstance(result, BaseException):
            raise UpstreamUnavailable(f"could not list models of upstream {upstream.spec.name} "
                                      f"({upstream.spec.base_url}): {result}") from result
        found[upstream.spec.name] = result
    return found
