"""The ledger never loses a row: Postgres stopped mid-traffic, spill files replayed exactly once."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from support.config import PRICES
from support.tenants import key_hasher, ledger_rows

from tollway.gateway.metering.ledger import Ledger, LedgerRow

MSG = [{"role": "user", "content": "count me"}]


async def test_postgres_down_mid_traffic_loses_no_row(app_factory, own_pg, tmp_path):
    import psycopg

    from tollway.gateway.tenancy.keys import create_key, create_tenant
    from tollway.infra.db import migrate

    await migrate(own_pg.url)
    async with await psycopg.AsyncConnection.connect(own_pg.url, autocommit=True) as conn:
        await create_tenant(conn, "outage")
        key = await create_key(conn, "outage", hasher=key_hasher())
    headers = {"authorization": f"Bearer {key.secret}"}

    async with app_factory(database_url=own_pg.url, auth_cache_ttl_s=600) as gw:
        ids: list[str] = []

        async def send(n: int) -> None:
            for _ in range(n):
                messages = [{"role": "user", "content": f"count me {len(ids)}"}]  # distinct: no retry storm
                resp = await gw.client.post("/v1/chat/completions", headers=headers,
                                            json={"model": "sim-small", "messages": messages, "max_tokens": 2})
                assert resp.status_code == 200, resp.text
                ids.append(resp.headers["x-request-id"])
                await asyncio.sleep(0.005)

        await send(20)
        await asyncio.to_thread(own_pg.stop)  # Postgres goes away mid-traffic
        await send(40)
        await gw.state.ledger.flush()
        assert gw.state.ledger.stats.spilled > 0, "the outage must have forced rows into the spill file"
        assert gw.state.ledger.pending_spill_files()
        await asyncio.to_thread(own_pg.start)
        await send(20)
        for _ in range(100):  # the replay task retries every 0.2 s
            await asyncio.sleep(0.1)
            if not gw.state.ledger.pending_spill_files():
                break
        await gw.state.ledger.flush()
        assert not gw.state.ledger.pending_spill_files()

    rows = ledger_rows(own_pg.url, "request_id = ANY(%s)", (ids,))
    assert len(ids) == 80
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # every row, exactly once
    price_in, price_out = (Decimal(p) for p in PRICES["sim-small"])
    assert all(r["cost_usd"] == (3 * price_in + 2 * price_out) / 10**6 for r in rows)


def _row(i: int, prefix: str = "req_replay_") -> LedgerRow:
    return LedgerRow(request_id=f"{prefix}{i}", created_at=datetime.now(UTC), tenant_id=1, key_id=1,
                     endpoint="chat.completions", latency_ms=1.0, cost_usd=Decimal("0.000001"))


async def test_replaying_a_spill_file_twice_inserts_once(pg, tmp_path):
    spill = tmp_path / "spill"
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, spill, queue_size=10, batch_size=7, flush_interval_s=0.01, retry_interval_s=60)
        spill.mkdir()
        rows = [_row(i) for i in range(25)]
        ledger._spill_now(rows)
        copy = tmp_path / "copy.jsonl"
        shutil.copy(ledger.pending_spill_files()[0], copy)
        assert await ledger.replay() == 25
        # A crash between insert and unlink leaves the file behind: replay it again.
        shutil.copy(copy, spill / "replay-crashed.jsonl")
        assert await ledger.replay() == 25
        assert ledger.pending_spill_files() == []
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_replay_%",))
    assert sorted(r["request_id"] for r in found) == sorted(r.request_id for r in rows)


async def test_full_queue_spills_instead_of_blocking(pg, tmp_path):
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, tmp_path / "spill", queue_size=3, batch_size=100, flush_interval_s=0.01,
                        retry_interval_s=0.05)
        rows = [LedgerRow(request_id=f"req_full_{i}", created_at=datetime.now(UTC), tenant_id=1, key_id=1,
                          endpoint="chat.completions") for i in range(10)]
        for row in rows:  # recorded before the writer task exists: the queue overflows
            ledger.record(row)
        assert ledger.stats.spilled == 7
        await ledger.start()
        await ledger.stop()  # drains the queue and replays the spill
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_full_%",))
    assert len(found) == 10


async def test_a_row_written_twice_lands_once(pg, tmp_path):
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, tmp_path / "spill", queue_size=10, batch_size=10, flush_interval_s=0.01,
                        retry_interval_s=60)
        await ledger.start()
        row = LedgerRow(request_id="req_twice", created_at=datetime.now(UTC), tenant_id=1, key_id=1,
                        endpoint="chat.completions")
        ledger.record(row)
        await ledger.flush()
        ledger.record(row)  # COPY refuses the duplicate; the idempotent INSERT takes over
        ledger.record(_row(999))
        await ledger.flush()
        await ledger.stop()
        assert ledger.stats.spilled == 0
    assert len(ledger_rows(pg.url, "request_id = ANY(%s)", (["req_twice", "req_replay_999"],))) == 2


async def test_rows_in_the_writers_hands_survive_shutdown(pg, tmp_path):
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        # A long flush interval: the writer holds the batch, waiting for more, when stop() arrives.
        ledger = Ledger(pool, tmp_path / "spill", queue_size=100, batch_size=50, flush_interval_s=30,
                        retry_interval_s=60)
        await ledger.start()
        rows = [LedgerRow(request_id=f"req_inhand_{i}", created_at=datetime.now(UTC), tenant_id=1, key_id=1,
                          endpoint="chat.completions") for i in range(5)]
        for row in rows:
            ledger.record(row)
        async with asyncio.timeout(30):
            while ledger.in_hand != 5:  # noqa: ASYNC110 (the writer has taken them off the queue and holds them)
                await asyncio.sleep(0.001)
        await ledger.stop()
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_inhand_%",))
    assert len(found) == 5


async def test_workers_replaying_the_same_dead_process_files_land_each_row_once(pg, tmp_path):
    """`serve --workers N`: every worker's replay loop sees a dead process's spill files; whichever takes a
    file first replays it, the others skip it, and no row is lost or doubled."""
    spill = tmp_path / "spill"
    spill.mkdir()
    rows = [_row(i, prefix="req_workers_") for i in range(30)]
    (spill / "spill-999999.jsonl").write_bytes(b"".join(r.to_json() + b"\n" for r in rows[:15]))  # a dead pid
    (spill / "replay-999999-1.jsonl").write_bytes(b"".join(r.to_json() + b"\n" for r in rows[15:]))
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=4, open=False) as pool:
        workers = [Ledger(pool, spill, queue_size=10, batch_size=4, flush_interval_s=0.01, retry_interval_s=60)
                   for _ in range(3)]
        replayed = await asyncio.gather(*(w.replay() for w in workers))
    assert sum(replayed) >= 30
    assert list(spill.iterdir()) == []
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_workers_%",))
    assert sorted(r["request_id"] for r in found) == sorted(r.request_id for r in rows)


async def test_a_row_postgres_refuses_is_set_aside_and_its_batch_lands(pg, tmp_path):
    """One row PostgreSQL refuses for its content (a cost beyond the column's precision: a bug or a price set
    absurdly high) must not take the rows written beside it into the spill file, to be refused again on every
    replay: it is set aside, the others are written, fresh or replayed."""
    import orjson

    bad = LedgerRow(request_id="req_aside_bad", created_at=datetime.now(UTC), tenant_id=1, key_id=1,
                    endpoint="chat.completions", cost_usd=Decimal("1e12"))
    spill = tmp_path / "spill"
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, spill, queue_size=100, batch_size=50, flush_interval_s=0.05, retry_interval_s=60)
        await ledger.start()
        for i in range(20):
            ledger.record(_row(i, "req_aside_"))
            if i == 7:
                ledger.record(bad)
        await ledger.flush()
        spill_files = ledger.pending_spill_files()
        replayed = [_row(i, "req_aside_replayed_") for i in range(9)]
        ledger._spill_now([*replayed[:4], bad, *replayed[4:]])  # a spill file written before this fix
        assert await ledger.replay() == 10
        await ledger.stop()
    assert spill_files == []
    assert ledger.pending_spill_files() == []
    assert ledger.stats.rejected == 2  # once written, once replayed
    written = ledger_rows(pg.url, "request_id LIKE %s", ("req_aside_%",))
    assert sorted(r["request_id"] for r in written) == sorted(
        [f"req_aside_{i}" for i in range(20)] + [r.request_id for r in replayed])
    [aside] = ledger.rejected_files()
    assert [orjson.loads(line)["request_id"] for line in aside.read_bytes().splitlines()] == ["req_aside_bad"] * 2


async def test_a_nul_in_any_client_field_is_stored_not_refused(app_factory, make_tenant, ledger):
    """PostgreSQL refuses a NUL in text and jsonb; a client's `user`, session or tag holding one once sent
    its whole batch of ledger rows (every tenant's) to a spill file whose replay failed for ever."""
    tenant = make_tenant()
    async with app_factory() as gw:
        plain = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                     json={"model": "sim-small", "messages": MSG, "max_tokens": 2})
        nul = await gw.client.post("/v1/chat/completions",
                                   headers={**tenant.headers, "x-tollway-session": "s1", "x-tollway-tags": "a,b"},
                                   json={"model": "sim-small", "messages": MSG, "max_tokens": 2,
                                         "user": "eve\u0000", "metadata": {"tags": "x\u0000y"}})
        missing = await gw.client.post("/v1/embeddings", headers=tenant.headers,
                                       json={"model": "no-such-\u0000", "input": "x", "user": "\u0000"})
        await gw.state.ledger.flush()
        assert gw.state.ledger.pending_spill_files() == []
        assert gw.state.ledger.stats.rejected == 0
    assert plain.status_code == 200, plain.text
    assert nul.status_code == 200, nul.text
    assert missing.status_code == 404
    ids = [plain.headers["x-request-id"], nul.headers["x-request-id"], missing.headers["x-request-id"]]
    rows = {r["request_id"]: r for r in ledger("request_id = ANY(%s)", ids)}
    assert set(rows) == set(ids)
    assert rows[nul.headers["x-request-id"]]["end_user"] == "eve\ufffd"
    assert rows[missing.headers["x-request-id"]]["end_user"] == "\ufffd"


async def test_the_writer_outlives_a_database_outage_on_a_disk_that_refuses_the_spill(own_pg, tmp_path):
    """PostgreSQL down and the spill folder unwritable (a full or read-only volume): the writer used to die
    with its batch, and wrote nothing more until the process restarted, even once both were back. It holds
    the batch and tries again; the rows land once either store takes them."""
    import psycopg

    from tollway.infra.db import migrate

    await migrate(own_pg.url)
    spill = tmp_path / "spill"
    async with AsyncConnectionPool(own_pg.url, min_size=0, max_size=2, open=False, timeout=1) as pool:
        ledger = Ledger(pool, spill, queue_size=100, batch_size=10, flush_interval_s=0.01, retry_interval_s=0.1)
        await ledger.start()
        own_pg.stop()
        shutil.rmtree(spill)
        spill.write_text("a file where the folder was")  # every spill now fails with an OSError
        ledger.record(_row(1, "req_outlive_"))
        for _ in range(100):
            if ledger.stats.write_failures >= 2:
                break
            await asyncio.sleep(0.1)
        writer = ledger._tasks[0]
        assert not writer.done(), "the writer must still be running"
        assert ledger.in_hand == 1
        spill.unlink()  # the disk takes the spill again
        ledger.record(_row(2, "req_outlive_"))
        await ledger.flush(timeout_s=20)
        assert ledger.stats.spilled == 2
        own_pg.start()
        for _ in range(600):  # the replay task finds the spill file once the pool reconnects
            if not ledger.pending_spill_files():
                break
            await asyncio.sleep(0.1)
        assert ledger.stats.replayed == 2
        await ledger.stop()
    with psycopg.connect(own_pg.url) as conn:
        found = conn.execute("SELECT request_id FROM ledger WHERE request_id LIKE 'req_outlive_%' ORDER BY 1").fetchall()
    assert [r[0] for r in found] == ["req_outlive_1", "req_outlive_2"]


async def test_a_spill_folder_that_cannot_be_written_stops_the_start(pg, tmp_path):
    import pytest

    blocked = tmp_path / "spill"
    blocked.write_text("not a folder")
    async with AsyncConnectionPool(pg.url, min_size=0, max_size=1, open=False) as pool:
        ledger = Ledger(pool, blocked, queue_size=10, batch_size=10, flush_interval_s=0.01, retry_interval_s=60)
        with pytest.raises(OSError):
            await ledger.start()


async def test_a_torn_spill_file_is_replayed_and_its_unreadable_lines_set_aside(pg, tmp_path):
    """A crash in mid-write leaves half a line at the end of a spill file; the replay used to raise on it,
    and the task that replays every spill file died with it."""
    spill = tmp_path / "spill"
    spill.mkdir()
    good = [_row(i, "req_torn_") for i in range(3)]
    stranger = good[0].to_json().replace(b'"request_id":"req_torn_0"', b'"request_id":"req_torn_x","colour":"red"')
    (spill / "replay-old.jsonl").write_bytes(b"\n".join([good[0].to_json(), stranger, good[1].to_json(),
                                                        good[2].to_json()[:40]]) + b"\n" + good[2].to_json()[:25])
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, spill, queue_size=10, batch_size=10, flush_interval_s=0.01, retry_interval_s=60)
        assert await ledger.replay() == 2
        assert ledger.pending_spill_files() == []
        [aside] = ledger.rejected_files()
    assert len(aside.read_bytes().splitlines()) == 3
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_torn_%",))
    assert sorted(r["request_id"] for r in found) == ["req_torn_0", "req_torn_1"]


async def test_a_row_that_cannot_be_encoded_leaves_the_writer_running(pg, tmp_path):
    async with AsyncConnectionPool(pg.url, min_size=1, max_size=2, open=False) as pool:
        ledger = Ledger(pool, tmp_path / "spill", queue_size=10, batch_size=10, flush_interval_s=0.01,
                        retry_interval_s=60)
        await ledger.start()
        broken = _row(1, "req_encode_")
        broken.guard_outcome = [{"validator": "pii", "spans": {1, 2}}]  # a set: not JSON (a bug upstream of here)
        ledger.record(broken)
        ledger.record(_row(2, "req_encode_"))  # the same batch
        await ledger.flush()
        ledger.record(_row(3, "req_encode_"))
        await ledger.flush()
        assert not ledger._tasks[0].done()
        assert ledger.stats.rejected == 1
        await ledger.stop()
    found = ledger_rows(pg.url, "request_id LIKE %s", ("req_encode_%",))
    assert sorted(r["request_id"] for r in found) == ["req_encode_2", "req_encode_3"]
