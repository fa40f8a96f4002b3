"""Periodic jobs: run at once and then every interval, survive a failed run, stop promptly."""

import asyncio
import logging
import time

from tollway.periodic import Periodic


async def test_runs_repeatedly_survives_a_failure_and_stops(caplog) -> None:
    runs: list[float] = []
    four = asyncio.Event()

    async def work() -> None:
        runs.append(time.monotonic())
        if len(runs) == 4:
            four.set()
        if len(runs) == 2:
            raise RuntimeError("flaky dependency")

    job = Periodic("test-job", 0.02, work)
    with caplog.at_level(logging.ERROR, logger="tollway.periodic"):
        job.start()
        await asyncio.wait_for(four.wait(), 5)
        started = time.monotonic()
        await job.stop()
    assert time.monotonic() - started < 1  # stop does not wait for the next interval
    count = len(runs)
    await asyncio.sleep(0.06)
    assert len(runs) == count  # stopped: no further runs
    assert [r.getMessage() for r in caplog.records] == ["test-job failed; it will run again"]
