"""Work after the answer: drained at shutdown (including work it starts), bounded where asked, failures logged."""

import asyncio
import logging

from tollway.infra.background import Background


async def test_drain_waits_for_work_and_for_the_work_it_starts() -> None:
    done: list[str] = []
    work = Background("test work")

    async def second() -> None:
        await asyncio.sleep(0.02)
        done.append("second")

    async def first() -> None:
        await asyncio.sleep(0.02)
        done.append("first")
        work.spawn(second())

    work.spawn(first())
    assert len(work) == 1
    await work.drain()
    assert done == ["first", "second"]
    assert len(work) == 0


async def test_a_bounded_drain_gives_up_on_time_without_cancelling() -> None:
    work = Background("slow work", drain_s=0.05)
    slow = asyncio.Event()
    work.spawn(slow.wait())
    await work.drain()
    assert len(work) == 1  # still running: the drain stopped waiting, it did not cancel
    slow.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(work) == 0


async def test_a_failure_is_logged_with_what_failed(caplog) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    work = Background("budget settlement")
    with caplog.at_level(logging.ERROR, logger="tollway.infra.background"):
        work.spawn(broken())
        await work.drain()
    [record] = caplog.records
    assert record.getMessage() == "budget settlement failed"
    assert "boom" in str(record.exc_info[1])
