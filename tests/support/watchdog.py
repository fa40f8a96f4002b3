"""A watchdog for an await that should be quick (an in-process gateway's start-up or shutdown): past its
time it writes every task's await chain to stderr, so a hang names the await it hangs on in the test's report
instead of ending, minutes later, in pytest-timeout's dump of an idle event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any


def await_chain(coro: Any) -> list[str]:
    """Where a suspended coroutine waits: its frame, then the frame of what it awaits, and so on down (a
    task's own stack shows only the outermost frame of a suspended coroutine)."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
        if awaited is not None and type(awaited).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # an ``async with`` of an @asynccontextmanager awaits its generator through one of these, which
            # names the generator only to the garbage collector
            awaited = next((r for r in gc.get_referents(awaited) if inspect.isasyncgen(r)), awaited)
        coro = awaited
    return lines


def describe_tasks() -> str:
    out = []
    for task in asyncio.all_tasks():
        out.append(f"task {task.get_name()}:")
        out += await_chain(task.get_coro())
    return "\n".join(out)


@contextlib.asynccontextmanager
async def watchdog(what: str, seconds: float = 60) -> AsyncIterator[None]:
    async def bark() -> None:
        await asyncio.sleep(seconds)
        sys.stderr.write(f"\n{what} has taken over {seconds:g} s; every task's await chain:\n{describe_tasks()}\n")

    dog = asyncio.create_task(bark(), name=f"watchdog: {what}")
    try:
        yield
    finally:
        dog.cancel()


@contextlib.asynccontextmanager
async def watched(inner: AbstractAsyncContextManager[Any], what: str, seconds: float = 60) -> AsyncIterator[None]:
    """``inner`` entered and left as ``async with`` would, each under its own watchdog."""
    async with watchdog(f"{what}'s start-up", seconds):
        await inner.__aenter__()
    try:
        yield
    except BaseException as exc:
        async with watchdog(f"{what}'s shutdown", seconds):
            if not await inner.__aexit__(type(exc), exc, exc.__traceback__):
                raise
    else:
        async with watchdog(f"{what}'s shutdown", seconds):
            await inner.__aexit__(None, None, None)
