"""A background job that runs every ``interval_s`` until stopped (budget reconciliation, vLLM
saturation polling). A failed run is logged and the job runs again at the next interval.

Stopped by an event as well as by cancellation: client libraries have been seen to swallow a
cancellation, and shutdown must not hang on that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("tollway.infra.periodic")


class Periodic:
    def __init__(self, name: str, interval_s: float, work: Callable[[], Awaitable[None]], *,
                 stop_s: float = 10, at_start: bool = True) -> None:
        self.name = name
        self.at_start = at_start  # False: the first run waits an interval (nothing to catch up on at start-up)
        self.interval_s = interval_s
        self.work = work
        self.stop_s = stop_s  # how long stop() waits for a run in progress
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.stop_s)

    def wake(self) -> None:
        """Run now (once the run in progress, if any, ends), then every interval again."""
        self._wake.set()

    async def _run(self) -> None:
        if not self.at_start:
            await self._pause()
        while not self._stop.is_set():
            try:
                await self.work()
            except Exception:
                log.exception("%s failed; it will run again", self.name)
            await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval_s):
                stop = asyncio.ensure_future(self._stop.wait())
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    wake.cancel()
        self._wake.clear()
