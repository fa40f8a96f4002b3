"""ASGI responses that notice a client leaving.

``EventStreamResponse`` sends server-sent events and, concurrently, waits for ``http.disconnect``: a
client that goes away cancels the producer (and with it the upstream call) at once, not at the next
write. ``until_disconnect`` does the same for a non-streaming call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
BodyReader = Callable[[], Awaitable[bytes]]


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Callable[[BodyReader], Awaitable[T]]) -> T:
    """Run ``work(read_body)``; if the client disconnects first, cancel it and raise ClientDisconnected.

    The disconnect watcher starts listening only once the body has been read, so it never takes a
    body message meant for the handler."""
    body_read = asyncio.Event()

    async def read_body() -> bytes:
        try:
            return await request.body()
        finally:
            body_read.set()

    async def watch() -> None:
        await body_read.wait()
        await _wait_for_disconnect(request.receive)

    task = asyncio.ensure_future(work(read_body))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


class EventStreamResponse(Response):
    def __init__(self, frames: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        self.frames = frames
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
        self.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump() -> None:
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        producer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await producer
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
