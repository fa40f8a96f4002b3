"""Documents parsed in processes of their own (``ParsePool``), limited in time and memory, tenant by tenant.

Parsing is pure Python for the most part (markdown-it's block rules, the HTML walk, the splitter): a megabyte of
list items costs seconds of CPU. In a thread of the gateway it holds the interpreter lock for those seconds in
slices, and every other request of the process waits for the lock each time it wakes; a tenant sending large
documents in a loop slowed every other tenant's requests. Here a parse runs in a worker process (started with
the first ingestion: no memory paid by a gateway that never ingests), stops itself after ``time_limit_s``
(a worker that cannot is killed), and holds at most ``memory`` bytes of address space; idle workers stop, so
the memory a large parse took (hundreds of megabytes for 4 MB of HTML) goes back to the machine. Tenants take
turns for the workers (``FairGate``, one worker a tenant at a time): with two, another tenant always finds one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import signal
from collections.abc import Hashable, Sequence
from typing import Any

from tollway.infra.fair import FairGate
from tollway.retrieval.documents import DocumentError, DocumentTooLarge, Parsed, Splitting
from tollway.retrieval.ingest import NewDocument, check_documents, parse_documents

log = logging.getLogger("tollway.retrieval")

PARSE_TIME_LIMIT_S = 60.0  # one request's documents; a 4 MiB body of the slowest markup measured: ~25 s
PARSE_MEMORY = 3 << 30  # a worker's address space (the documents, their chunks and the interpreter)
PARSE_IDLE_S = 60.0  # workers stopped after this long without a parse: their memory back (4 MB of HTML: ~400 MB)


class ParseLimit(DocumentTooLarge):
    """A request's documents took longer than the limit to parse, or more memory than a worker has."""


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def _worker_init(memory: int) -> None:
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C stops the gateway, which stops its workers
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ValueError, OSError):
        pass
    try:  # under a container's memory limit, the kernel stops this worker (a 413) rather than the gateway
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    from tollway.tokens import encoding

    encoding()  # the tokenizer's tables, read once per worker rather than in its first parse


def _parse_in_worker(splitting: Splitting, docs: Sequence[NewDocument], max_tokens: int,
                     time_limit_s: float) -> list[Parsed] | tuple[str, str]:
    """Runs in a worker: the documents parsed, or (kind, reason) where they could not be."""
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    try:
        return parse_documents(splitting, docs, max_tokens=max_tokens)
    except _Timeout:
        return "limit", f"the documents took more than {time_limit_s:g} s to parse; send them in smaller requests"
    except MemoryError:
        return "limit", "the documents need more memory to parse than a worker has; send them in smaller requests"
    except DocumentError as exc:
        return ("too large" if isinstance(exc, DocumentTooLarge) else "document"), str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class ParsePool:
    """``workers`` processes that parse documents, started with the first parse and stopped after ``idle_s``
    without one (a parse's memory stays with its worker until then); built and closed by the composition
    root."""

    def __init__(self, workers: int = 2, *, time_limit_s: float = PARSE_TIME_LIMIT_S,
                 memory: int = PARSE_MEMORY, idle_s: float = PARSE_IDLE_S) -> None:
        self.workers, self.time_limit_s, self.memory, self.idle_s = workers, time_limit_s, memory, idle_s
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._gate = FairGate(workers, per_owner=1)
        self._running = 0  # parses in the workers now
        self._idle: asyncio.TimerHandle | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(self.memory,))  # a worker starts with a parse that finds none idle: the second
            # only when two parses overlap
        return self._pool

    async def parse(self, splitting: Splitting, docs: Sequence[NewDocument], *, max_tokens: int,
                    owner: Hashable = None) -> list[tuple[NewDocument, Parsed]]:
        """Every document parsed and split, or ``DocumentError`` naming the one that cannot be (``ParseLimit``
        past the time or memory limit). ``owner`` (a tenant): whose parses take turns with each other. A caller
        that gives up does not stop the parse it started: its worker finishes (within the limit) first."""
        # refused here where the words alone are over (no copy of megabytes to a worker that would refuse them)
        await asyncio.to_thread(check_documents, docs, max_tokens=max_tokens)
        async with self._gate.slot(owner):
            work = asyncio.ensure_future(self._parse(splitting, docs, max_tokens))
            try:
                parsed = await asyncio.shield(work)
            finally:
                if not work.done():  # the slot stays taken until the worker is free again
                    await asyncio.wait({work})
                    if not work.cancelled():
                        work.exception()  # seen: the request that wanted it is gone
        return list(zip(docs, parsed, strict=True))

    async def _parse(self, splitting: Splitting, docs: Sequence[NewDocument], max_tokens: int) -> list[Parsed]:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._running += 1
        try:
            return await self._in_worker(splitting, docs, max_tokens)
        finally:
            self._running -= 1
            if not self._running and self._pool is not None:
                self._idle = asyncio.get_running_loop().call_later(self.idle_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle = None
        if not self._running:
            self.close()

    async def _in_worker(self, splitting: Splitting, docs: Sequence[NewDocument], max_tokens: int) -> list[Parsed]:
        pool = self._executor()
        future = asyncio.get_running_loop().run_in_executor(pool, _parse_in_worker, splitting, list(docs),
                                                            max_tokens, self.time_limit_s)
        try:
            # The worker stops itself at the limit; this is the backstop for one that cannot (inside a C call).
            result = await asyncio.wait_for(future, self.time_limit_s + 10)
        except TimeoutError:
            self._reset(pool)
            raise ParseLimit(f"the documents took more than {self.time_limit_s:g} s to parse; send them in "
                             "smaller requests") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._reset(pool)
            raise ParseLimit("the documents need more memory to parse than a worker has; send them in smaller "
                             "requests") from None
        if isinstance(result, tuple):
            kind, reason = result
            raise {"limit": ParseLimit, "too large": DocumentTooLarge}.get(kind, DocumentError)(reason)
        return result

    def _reset(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        """A worker that will not stop, or one that died, goes with its pool; the next parse starts a fresh one."""
        log.warning("a document parser's worker was stopped (over its time or memory limit); starting another")
        if self._pool is pool:
            self._pool = None
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (shutdown, or idle); the next parse starts them again."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
