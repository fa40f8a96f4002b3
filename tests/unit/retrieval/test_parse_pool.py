"""Documents parsed in worker processes: the same parse as in process, a document's error named, a parse over
its time limit stopped (a 413's error) and a dead worker replaced, each with the pool still serving."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tollway.retrieval import (
    DocumentError,
    DocumentTooLarge,
    NewDocument,
    ParseLimit,
    ParsePool,
    Splitting,
    parse_documents,
)

SMALL = [NewDocument("a.md", "# Fees\n\nThe overdraft fee is $5.\n\n## Waivers\n\nStudents pay nothing.", "markdown"),
         NewDocument("b.txt", "Wire transfers clear the same day. " * 200, "text")]
LIST = NewDocument("list.md", "# T\n" + "- x\n" * 67_000, "markdown")  # seconds of markdown-it's list rules


async def _with(pool: ParsePool, work: object) -> object:
    try:
        return await work  # type: ignore[misc]
    finally:
        pool.close()


def test_a_worker_parses_what_the_process_would_and_names_a_bad_document() -> None:
    pool = ParsePool(workers=1)

    async def run() -> tuple[object, ...]:
        got = await pool.parse(Splitting(), SMALL, max_tokens=200_000, owner=1)
        with pytest.raises(DocumentError, match=r"documents\[1\]: source 'a.md' appears twice"):
            await pool.parse(Splitting(), [SMALL[0], SMALL[0]], max_tokens=200_000, owner=1)
        with pytest.raises(DocumentTooLarge, match=r"documents\[1\] \(b.txt\) has \d+ tokens; at most 100"):
            await pool.parse(Splitting(), SMALL, max_tokens=100, owner=1)
        return tuple(got)

    got = asyncio.run(_with(pool, run()))  # type: ignore[arg-type]
    assert [doc for doc, _ in got] == SMALL  # type: ignore[misc]
    assert [parsed for _, parsed in got] == parse_documents(Splitting(), SMALL, max_tokens=200_000)  # type: ignore[misc]


def test_a_parse_over_its_time_limit_is_stopped_and_the_pool_goes_on() -> None:
    pool = ParsePool(workers=1, time_limit_s=0.5)

    async def run() -> object:
        with pytest.raises(ParseLimit, match=r"more than 0\.5 s to parse"):
            await pool.parse(Splitting(), [LIST], max_tokens=200_000, owner=1)
        return await pool.parse(Splitting(), SMALL[:1], max_tokens=200_000, owner=2)

    got = asyncio.run(_with(pool, run()))  # type: ignore[arg-type]
    assert len(got) == 1  # type: ignore[arg-type]
    assert isinstance(ParseLimit("x"), DocumentTooLarge)  # the API answers it as a 413


def test_a_worker_that_dies_mid_parse_is_replaced() -> None:
    pool = ParsePool(workers=1)

    async def run() -> object:
        await pool.parse(Splitting(), SMALL[:1], max_tokens=200_000)  # the worker is up
        running = asyncio.ensure_future(pool.parse(Splitting(), [LIST], max_tokens=200_000))
        await asyncio.sleep(0.5)
        assert pool._pool is not None
        for pid in list(pool._pool._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        with pytest.raises(ParseLimit, match="more memory"):
            await running
        return await pool.parse(Splitting(), SMALL[:1], max_tokens=200_000)

    got = asyncio.run(_with(pool, run()))  # type: ignore[arg-type]
    assert len(got) == 1  # type: ignore[arg-type]


def test_idle_workers_stop_and_the_next_parse_starts_them_again() -> None:
    pool = ParsePool(workers=1, idle_s=0.3)

    async def run() -> tuple[bool, bool, object]:
        await pool.parse(Splitting(), SMALL[:1], max_tokens=200_000)
        assert pool._pool is not None
        worker = next(iter(pool._pool._processes.values()))  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        kept = pool._pool is not None  # not idle long enough yet
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not worker.is_alive():
                break
        stopped = pool._pool is None and not worker.is_alive()
        return kept, stopped, await pool.parse(Splitting(), SMALL[:1], max_tokens=200_000)

    kept, stopped, again = asyncio.run(_with(pool, run()))  # type: ignore[arg-type, misc]
    assert kept and stopped  # its memory back to the machine
    assert len(again) == 1  # type: ignore[arg-type]
