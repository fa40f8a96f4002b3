"""The cost ledger: one row per request, written off the hot path, never lost.

``Ledger.record`` only enqueues (bounded). A writer task inserts batches. When Postgres fails, the
batch is appended to a spill file (JSON lines, fsynced); when the queue is full, the row goes straight
to the spill file. A replay task moves spill files back into Postgres once it answers again. Inserts
are ``ON CONFLICT DO NOTHING`` on the request id, so a replay interrupted half-way and run again still
lands every row exactly once.

A row PostgreSQL refuses for what it holds (a data or integrity error, not an outage) must not hold the rows
beside it hostage: the batch is split until the refused rows stand alone, the rest are written, and the
refused ones are set aside in ``rejected/`` (JSON lines, fsynced, logged as errors, counted) instead of being
spilled and replayed for ever. Text PostgreSQL cannot store (a NUL character, from any client field) is
written with U+FFFD in its place, so it never gets that far.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.infra.db import storable, storable_json

log = logging.getLogger("tollway.ledger")


@dataclass(slots=True)
class LedgerRow:
    request_id: str
    created_at: datetime
    tenant_id: int
    key_id: int
    endpoint: str
    status: int = 200
    latency_ms: float = 0.0
    end_user: str | None = None
    model: str | None = None
    upstream: str | None = None
    upstream_model: str | None = None
    route_reason: str | None = None
    prompt_name: str | None = None
    prompt_version: str | None = None
    index_version: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    price_source: str | None = None
    usage_source: str | None = None
    ttft_ms: float | None = None
    stream: bool = False
    error_code: str | None = None
    session_id: str | None = None
    tags: list[str] | None = None
    tier: str | None = None
    # 'answer'; side rows: 'attempt' (a failed fallback attempt), 'retrieval', 'guard', 'shadow', 'eval'
    role: str = "answer"
    attempt: int = 1
    cache_hit: bool = False
    saved_usd: Decimal = Decimal(0)
    degraded: bool = False
    rollout: str | None = None
    guard_outcome: list[dict[str, Any]] | None = None  # [{validator, action, spans, ms}]
    baseline_usd: Decimal = Decimal(0)  # an answer a model served, at the top tier's prices (routing savings)

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["cost_usd"] = str(self.cost_usd)
        data["saved_usd"] = str(self.saved_usd)
        data["baseline_usd"] = str(self.baseline_usd)
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes) -> LedgerRow:
        data: dict[str, Any] = orjson.loads(raw)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        data["cost_usd"] = Decimal(data["cost_usd"])
        data["saved_usd"] = Decimal(data.get("saved_usd", "0"))
        data["baseline_usd"] = Decimal(data.get("baseline_usd", "0"))
        return cls(**data)


_COLUMNS = [f.name for f in dataclasses.fields(LedgerRow)]
_INSERT = (
    f"INSERT INTO ledger ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))})"
    " ON CONFLICT (request_id, created_at) DO NOTHING"
)


_GUARDS = _COLUMNS.index("guard_outcome")
_COPY = f"COPY ledger ({', '.join(_COLUMNS)}) FROM STDIN"


_TEXT = [i for i, f in enumerate(dataclasses.fields(LedgerRow)) if f.type in ("str", "str | None")]
_TAGS = _COLUMNS.index("tags")
# Errors that belong to a row's content rather than to the database's state: the row is set aside. TypeError
# and ValueError: a value that cannot be encoded at all (a bug upstream of the ledger).
_ROW_FAULTS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError)


def _values(row: LedgerRow) -> tuple[Any, ...]:
    """The row's columns as PostgreSQL takes them: text never holds a NUL (it refuses one in text and jsonb
    alike), so a client's ``user`` or tag holding one is stored with U+FFFD in its place."""
    values = [getattr(row, name) for name in _COLUMNS]
    for i in _TEXT:
        values[i] = storable(values[i])
    if row.tags is not None:
        values[_TAGS] = [storable(t) for t in row.tags]
    if row.guard_outcome is not None:
        values[_GUARDS] = storable_json(row.guard_outcome)
    return tuple(values)


@dataclass(slots=True)
class LedgerStats:
    recorded: int = 0
    written: int = 0
    spilled: int = 0
    replayed: int = 0
    write_failures: int = 0
    rejected: int = 0  # rows PostgreSQL refused for their content, set aside in rejected/
    logged: int = 0  # rows neither PostgreSQL nor the spill file took, written to the log whole


class Ledger:
    def __init__(self, pool: AsyncConnectionPool, spill_dir: Path, *, queue_size: int, batch_size: int,
                 flush_interval_s: float, retry_interval_s: float) -> None:
        self._pool = pool
        self._spill_dir = spill_dir
        self._queue: asyncio.Queue[LedgerRow] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._flush_interval = flush_interval_s
        self._retry_interval = retry_interval_s
        self._spill_path = spill_dir / f"spill-{os.getpid()}.jsonl"
        self._rejected_dir = spill_dir / "rejected"  # rows set aside for an operator (never replayed on their own)
        self._spill_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_hand: list[LedgerRow] = []  # taken off the queue by the writer, not yet written
        self._idle = asyncio.Event()
        self.stats = LedgerStats()
        # Called with each batch once it is on disk (inserted or spilled): the quota service lets go of
        # what it kept in Redis in case this process died first.
        self.on_durable: Callable[[list[LedgerRow]], None] = lambda rows: None

    # -- hot path -------------------------------------------------------------------------------
    def record(self, row: LedgerRow) -> None:
        self.stats.recorded += 1
        self._idle.clear()
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            try:
                self._spill_now([row])
            except OSError as exc:  # the queue full and the disk refusing: the log is all that is left
                self._log_lost([row], exc)
                return
            self.on_durable([row])

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Raises OSError where the spill folder cannot be written: rows would have nowhere to go the first
        time PostgreSQL does not answer."""
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        probe = self._spill_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        self._tasks = [asyncio.create_task(self._write_loop(), name="ledger-writer"),
                       asyncio.create_task(self._replay_loop(), name="ledger-replay")]

    async def stop(self) -> None:
        """Drain the queue into Postgres (or the spill file), then stop the tasks."""
        for task in self._tasks:
            task.cancel()
        # A bounded wait: a task whose cancellation a library swallowed must not hold up shutdown; the
        # rows are drained below either way.
        _, stuck = await asyncio.wait(self._tasks, timeout=5)
        for task in stuck:
            log.warning("ledger task %s did not stop; draining without it", task.get_name())
        # Rows the writer had taken but not yet written when it was stopped go first (if they did reach
        # Postgres, the idempotent path keeps them single).
        rest: list[LedgerRow] = self._in_hand
        self._in_hand = []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        for start in range(0, len(rest), self._batch_size):
            await self._write(rest[start:start + self._batch_size], hold=False)
        await self.replay()

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every row recorded so far has left the queue (written or spilled)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()  # set only by the writer, with the queue empty and no batch in hand

    @property
    def in_hand(self) -> int:
        """Rows the writer has taken off the queue and not yet written."""
        return len(self._in_hand)

    def pending_spill_files(self) -> list[Path]:
        return sorted(self._spill_dir.glob("*.jsonl")) if self._spill_dir.exists() else []

    def rejected_files(self) -> list[Path]:
        """Rows PostgreSQL refused, set aside for an operator (moved back into the spill folder as
        ``replay-<name>.jsonl`` once the cause is mended, they are replayed like any spill file)."""
        folder = self._rejected_dir
        return sorted(folder.glob("*.jsonl")) if folder.exists() else []

    # -- writer ---------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            if self._queue.empty():
                self._idle.set()
            batch = self._in_hand = [await self._queue.get()]
            self._idle.clear()
            # One deadline for the whole batch (not a timeout per row). asyncio.timeout, not wait_for: in 3.11
            # wait_for can swallow a cancellation that races with a queue item, and stop() would then wait on
            # this task forever. A get cut short by the deadline leaves its item in the queue.
            try:
                async with asyncio.timeout(self._flush_interval):
                    while len(batch) < self._batch_size:
                        batch.append(await self._queue.get())
            except TimeoutError:
                pass
            try:
                await self._write(batch)
            except Exception:  # a row that cannot even be encoded (a bug): logged whole, the writer goes on
                log.exception("ledger batch of %d rows failed unexpectedly", len(batch))
                for row in batch:
                    log.error("ledger row not written: %r", row)
                self.stats.logged += len(batch)
            self._in_hand = []

    async def _write(self, batch: list[LedgerRow], *, hold: bool = True) -> None:
        """Into PostgreSQL, else the spill file. Where neither takes the batch (the database down and the disk
        full or read-only), the writer holds it and tries both again every ``retry_interval_s`` (``hold``;
        the queue fills meanwhile, then overflows to the log), instead of dying with it; at shutdown
        (``hold`` False) the rows go to the log, and their leases stay in Redis for another gateway's sweeper."""
        while True:
            try:
                refused = await self._insert_or_set_aside(batch, fresh=True)
                self.stats.written += len(batch) - len(refused)
                break
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self.stats.write_failures += 1
                try:
                    self._spill_now(batch)
                except OSError as spill:
                    if not hold:
                        self._log_lost(batch, spill)
                        return
                    log.error("ledger write failed (%s) and the spill file cannot be written (%s); holding %d rows "
                              "and trying both again", type(exc).__name__, spill, len(batch))
                    await asyncio.sleep(self._retry_interval)
                    continue
                log.warning("ledger write failed (%s); spilled %d rows", type(exc).__name__, len(batch))
                break
        self.on_durable(batch)

    def _log_lost(self, rows: list[LedgerRow], exc: OSError) -> None:
        self.stats.logged += len(rows)
        for row in rows:
            log.error("ledger row neither written nor spilled (%s); kept here: %s", exc, row.to_json().decode())

    async def insert_now(self, rows: list[LedgerRow]) -> None:
        """Rows written at once, idempotently (a row already there is kept as it is); raises when
        PostgreSQL cannot take them. For rows recovered from Redis (``tollway.gateway.metering.sweeper``)."""
        await self._insert(rows)

    async def _insert_or_set_aside(self, rows: list[LedgerRow], *, fresh: bool = False) -> list[LedgerRow]:
        """``rows`` inserted, but for those PostgreSQL refuses for their content: found by halving the batch
        (a few more round trips, only when a batch fails so), set aside, and returned. An outage raises."""
        try:
            await self._insert(rows, fresh=fresh)
            return []
        except _ROW_FAULTS as exc:
            if len(rows) == 1:
                self._set_aside(rows[0], exc)
                return rows
        middle = len(rows) // 2
        return [*await self._insert_or_set_aside(rows[:middle], fresh=fresh),
                *await self._insert_or_set_aside(rows[middle:], fresh=fresh)]

    def _set_aside(self, row: LedgerRow, exc: Exception) -> None:
        try:
            line = row.to_json()
        except (TypeError, ValueError):
            line = orjson.dumps({"unencodable": repr(row)})
        _append_synced(self._rejected_dir / f"rejected-{os.getpid()}.jsonl", [line])
        self.stats.rejected += 1
        log.error("ledger row %s (tenant %s) refused by PostgreSQL (%s: %s); set aside in %s", row.request_id,
                  row.tenant_id, type(exc).__name__, str(exc).splitlines()[0][:200], self._rejected_dir)

    async def _insert(self, rows: list[LedgerRow], *, fresh: bool = False) -> None:
        """Fresh rows (never written before) go in by COPY, several times cheaper per row; rows that may
        already be there (replays) use INSERT ... ON CONFLICT DO NOTHING."""
        async with self._pool.connection(timeout=5) as conn:
            if fresh:
                try:
                    async with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY) as copy:
                        for row in rows:
                            await copy.write_row(_values(row))
                    return
                except psycopg.errors.UniqueViolation:
                    pass  # a row id seen before: fall through to the idempotent path
            async with conn.cursor() as cur:
                await cur.executemany(_INSERT, [_values(r) for r in rows])

    # -- spill and replay -----------------------------------------------------------------------
    def _spill_now(self, rows: list[LedgerRow]) -> None:
        """Append to the spill file and fsync. Synchronous on purpose: no await sits between open and
        close, so a replay (which renames the file first) never sees half a batch."""
        _append_synced(self._spill_path, [r.to_json() for r in rows])
        self.stats.spilled += len(rows)

    def _replayable(self) -> list[Path]:
        """Spill files of this process and of processes that are gone; never a live sibling's file."""
        files = []
        for path in self.pending_spill_files():
            if path.name.startswith("spill-") and path != self._spill_path:
                pid = int(path.stem.split("-")[1])
                if _alive(pid):
                    continue
            files.append(path)
        return files

    async def replay(self) -> int:
        replayed = 0
        async with self._spill_lock:
            for path in self._replayable():
                try:
                    if path.name.startswith("spill-"):
                        target = path.with_name(f"replay-{os.getpid()}-{time.time_ns()}.jsonl")
                        path.rename(target)
                        path = target
                    raw = path.read_bytes()
                except FileNotFoundError:
                    continue  # another worker took this file first (its inserts are idempotent anyway)
                rows = self._readable(raw, path)
                try:
                    for start in range(0, len(rows), self._batch_size):
                        await self._insert_or_set_aside(rows[start:start + self._batch_size])
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    log.warning("ledger replay deferred (%s: %s)", type(exc).__name__, exc)
                    break
                path.unlink(missing_ok=True)
                replayed += len(rows)
        self.stats.replayed += replayed
        if replayed:
            log.info("ledger replayed %d spilled rows", replayed)
        return replayed

    def _readable(self, raw: bytes, path: Path) -> list[LedgerRow]:
        """The rows of a spill file; a line that is not a row (torn by a crash in mid-write, or from a version
        whose rows had other fields) is set aside as it is, not left to stop the replay of every file."""
        rows, unreadable = [], []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(LedgerRow.from_json(line))
            except (ValueError, TypeError, KeyError):  # orjson's JSONDecodeError is a ValueError
                unreadable.append(line)
        if unreadable:
            _append_synced(self._rejected_dir / f"unreadable-{os.getpid()}.jsonl", unreadable)
            self.stats.rejected += len(unreadable)
            log.error("%d lines of %s are not ledger rows; set aside in %s", len(unreadable), path.name,
                      self._rejected_dir)
        return rows

    async def _replay_loop(self) -> None:
        while True:
            try:
                if self._replayable():
                    await self.replay()
            except Exception:  # the loop outlives any one file's surprise: the next pass tries again
                log.exception("ledger replay failed; trying again in %.1fs", self._retry_interval)
            await asyncio.sleep(self._retry_interval)


def _append_synced(path: Path, lines: list[bytes]) -> None:
    """``lines`` appended to ``path`` (its folder made if missing) and fsynced before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(b"".join(line + b"\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utcnow() -> datetime:
    return datetime.now(UTC)
