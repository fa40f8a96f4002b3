"""Work that runs after the answer (settling a reservation, caching a finished stream, a shadow call,
recording a breaker trip): kept in a set so shutdown can wait for it, and a failure is logged, not
left as an unretrieved task exception."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("tollway.infra.background")


class Background:
    def __init__(self, what: str, *, drain_s: float | None = None) -> None:
        self.what = what  # for the log line of a failure: "budget settlement", "shadow call", ...
        self.drain_s = drain_s  # how long shutdown waits for it; None: until it is done
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        if name is not None:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", self.what, exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the work in flight, and for work it starts meanwhile, for at most ``drain_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_s):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))

    async def stop(self) -> None:
        """``drain``, then cancel what is still running (shutdown must not wait on it any longer)."""
        await self.drain()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
