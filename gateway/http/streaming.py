"""ASGI responses that notice a client leaving.

A client that goes away cancels the work on its behalf (and with it the upstream call) at once, not
at the next write: a watcher task waits for ``http.disconnect`` and cancels the task serving the
request. The watcher starts only after the body has been read, so it never takes a body message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.types import Receive, Send

T = TypeVar("T")
BodyReader = Callable[[], Awaitable[bytes]]


class ClientDisconnected(Exception):
    """The client went away before the answer was complete."""


class DisconnectWatch:
    """Cancels the current task when the client disconnects; ``armed()`` starts listening."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    def arm(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._task is not None:
            self._task.cancel()

    def absorb(self) -> None:
        """The cancellation was ours and has been handled: the task may await again normally."""
        if self._task is not None:
            self._task.uncancel()

    def close(self) -> None:
        # Dropped as it is cancelled: the cancelled task keeps its CancelledError, whose traceback holds the
        # watcher's frame and so this object; a reference back to the task would make every request leave a
        # cycle of ~40 objects for the garbage collector.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def until_disconnect(receive: Receive, work: Callable[[BodyReader], Awaitable[T]]) -> T:
    """Run ``work(read_body)`` in this task; a disconnect after the body was read cancels it and
    raises ClientDisconnected."""
    watch = DisconnectWatch(receive)

    async def body() -> bytes:
        data = await read_body(receive)
        watch.arm()
        return data

    try:
        return await work(body)
    except asyncio.CancelledError:
        if watch.disconnected:
            watch.absorb()
            raise ClientDisconnected() from None
        raise
    finally:
        watch.close()


async def send_event_stream(send: Send, receive: Receive, frames: AsyncIterator[bytes],
                            headers: Mapping[str, str]) -> None:
    """Send server-sent events; a disconnect cancels the producer (its ``finally`` settles the cost)."""
    raw = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    watch = DisconnectWatch(receive)
    watch.arm()
    try:
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        async for frame in frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise
        watch.absorb()
    except OSError:
        pass  # the client went away between frames
    finally:
        watch.close()
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()
