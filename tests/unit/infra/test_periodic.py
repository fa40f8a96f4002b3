"""Periodic jobs: run at once and then every interval, survive a failed run, stop promptly."""

import asyncio
import logging
import time

from tollway.infra.periodic import Periodic


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
    with caplog.at_level(logging.ERROR, logger="tollway.infra.periodic"):
        job.start()
        await asyncio.wait_for(four.wait(), 30)
        await job.stop()
    assert job._task is not None and job._task.done()  # stopped: no further runs can happen
    assert [r.getMessage() for r in caplog.records] == ["test-job failed; it will run again"]


async def test_stop_does_not_wait_for_the_next_interval() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    job = Periodic("hourly", 3600, work)
    job.start()
    await asyncio.wait_for(ran.wait(), 30)
    await asyncio.wait_for(job.stop(), 30)  # an hour's interval: returning at all shows it did not wait
    assert job._task is not None
    assert job._task.done()


async def test_a_job_that_does_not_run_at_start_waits_one_interval_first() -> None:
    ran = asyncio.Event()
    started = time.monotonic()

    async def work() -> None:
        ran.set()

    job = Periodic("later", 0.2, work, at_start=False)
    job.start()
    await asyncio.wait_for(ran.wait(), 10)
    await job.stop()
    assert time.monotonic() - started >= 0.2
