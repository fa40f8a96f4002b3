"""The budget scripts' multiplexed Redis connection (tollway.infra.redisscripts) against a real redis-server:
replies reach their own callers under concurrency, errors and cancellations keep the stream in step, a
restarted server (its scripts gone) and a silent one are recovered from, passwords and database numbers hold."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from tollway.infra.redisscripts import ChannelScript, ScriptChannel, scripts_for
from tollway.local.embedded import EmbeddedRedis, free_port

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1])}"


async def test_concurrent_calls_each_get_their_own_reply(redis_url):
    client = aioredis.from_url(redis_url)
    channel = ScriptChannel.of(client)
    assert channel is not None
    echo = channel.script(ECHO)
    await client.delete("{t:chan}:n")
    replies = await asyncio.gather(*(echo(keys=["{t:chan}:n"], args=[f"caller-{i}"]) for i in range(300)))
    assert [r[0] for r in replies] == [f"caller-{i}".encode() for i in range(300)]
    assert sorted(r[1] for r in replies) == list(range(1, 301)), "every call ran once"
    await channel.aclose()
    await client.aclose()


async def test_an_error_reply_raises_and_the_next_caller_gets_its_own_reply(redis_url):
    channel = ScriptChannel.of(aioredis.from_url(redis_url))
    assert channel is not None
    bad = channel.script("return redis.call('INCR', KEYS[1])")
    good = channel.script(ECHO)
    await channel.call("SET", "{t:chan}:text", "not a number")
    results = await asyncio.gather(bad(keys=["{t:chan}:text"]), good(keys=["{t:chan}:m"], args=["after"]),
                                   return_exceptions=True)
    assert isinstance(results[0], ResponseError)
    assert results[1][0] == b"after"
    await channel.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(redis_url):
    channel = ScriptChannel.of(aioredis.from_url(redis_url))
    assert channel is not None
    slow = channel.script("local t = redis.call('TIME'); local u = t[1] * 1000000 + t[2]\n"
                          "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] > u + 50000\n"
                          "return ARGV[1]")
    first = asyncio.create_task(slow(args=["cancelled"]))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(channel.call("ECHO", "second"))
    first.cancel()
    assert await second == b"second"
    assert await channel.call("ECHO", "third") == b"third"
    await channel.aclose()


async def test_a_restarted_server_is_reconnected_and_its_scripts_loaded_again(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    channel = ScriptChannel.of(aioredis.from_url(url))
    assert channel is not None
    echo = channel.script(ECHO)
    try:
        assert (await echo(keys=["{t:chan}:n"], args=["before"]))[0] == b"before"
        server.stop()
        with pytest.raises(Exception, match="Redis"):  # down: the call fails (fail-open or closed decides)
            await echo(keys=["{t:chan}:n"], args=["down"])
        server = EmbeddedRedis(tmp_path / "redis", port=server.port)
        server.start()  # empty: the script is unknown to it
        assert (await echo(keys=["{t:chan}:n"], args=["after"])) == [b"after", 1]
    finally:
        await channel.aclose()
        server.stop()


async def test_a_server_that_never_replies_fails_the_call_within_the_timeout(redis_url):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    accepted: list[socket.socket] = []
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        conn, _ = await loop.sock_accept(silent)
        accepted.append(conn)

    silent.setblocking(False)
    acceptor = asyncio.create_task(accept())
    channel = ScriptChannel(port=silent.getsockname()[1], timeout_s=0.4)
    started = time.monotonic()
    with pytest.raises(Exception, match="Timeout"):
        await channel.call("PING")
    assert time.monotonic() - started < 0.4 * 2, "no later than the timeout and one watchdog tick"
    await acceptor
    await channel.aclose()
    for conn in accepted:
        conn.close()
    silent.close()


async def test_callers_waiting_on_a_cancelled_connection_attempt_are_not_left_waiting():
    """A server that accepts and never answers AUTH: the first caller, cancelled mid-handshake, must not leave
    the attempt it started pending for the callers who joined it, nor for the next one."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    channel = ScriptChannel(port=silent.getsockname()[1], password="x", timeout_s=0.3, connect_timeout_s=0.3)
    first = asyncio.create_task(channel.call("PING"))
    await asyncio.sleep(0.05)
    joined = asyncio.create_task(channel.call("PING"))
    await asyncio.sleep(0.05)
    first.cancel()
    started = time.monotonic()
    with pytest.raises(Exception, match="connecting"):
        await asyncio.wait_for(joined, 2)
    with pytest.raises(Exception, match="connecting"):
        await asyncio.wait_for(channel.call("PING"), 2)  # a new attempt, timed out on its own
    assert time.monotonic() - started < 1.5
    await channel.aclose()
    silent.close()


async def test_a_password_and_a_database_number(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    admin = aioredis.from_url(url)
    await admin.config_set("requirepass", "s3cret")
    try:
        client = aioredis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/5")
        channel = ScriptChannel.of(client)
        assert channel is not None
        await channel.script("return redis.call('SET', KEYS[1], ARGV[1])")(keys=["k"], args=["in five"])
        assert await client.get("k") == b"in five"
        wrong = ScriptChannel.of(aioredis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0"))
        assert wrong is not None
        with pytest.raises(Exception, match=r"WRONGPASS|invalid"):
            await wrong.call("PING")
        await channel.aclose()
        await client.aclose()
    finally:
        server.stop()


def test_clients_it_cannot_stand_in_for_keep_redis_py():
    port = free_port()
    cases: list[Any] = [
        aioredis.from_url(f"rediss://127.0.0.1:{port}/0"),  # TLS
        aioredis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True),
        aioredis.from_url(f"redis://127.0.0.1:{port}/0", protocol=3),
        RedisCluster(host="127.0.0.1", port=port),
    ]
    for client in cases:
        register, channel = scripts_for(client)
        assert channel is None
        assert not isinstance(register("return 1"), ChannelScript)
    register, channel = scripts_for(aioredis.from_url(f"unix:///tmp/redis-{port}.sock?db=2"))
    assert channel is not None and (channel.path, channel.db) == (f"/tmp/redis-{port}.sock", 2)
    assert scripts_for(aioredis.from_url(f"redis://127.0.0.1:{port}/0"), channel=False)[1] is None  # the setting
