"""The budget path's Lua scripts over one multiplexed Redis connection per process.

redis-py spends ~70 us of CPU on each script call (its Script wrapper, a pooled connection checked out
under an ``asyncio.timeout``, another around the read, its command packer), against ~16 us for the same
EVALSHA written straight to a socket and read back with hiredis, the parser redis-py itself uses
(``bench/budgets/redis_clients.py``; bench/RESULTS.md, "The budget scripts on their own Redis connection").
Every request under a budget makes two such calls (admission and settlement), so the budget scripts run
here; everything else stays on redis-py.

One connection carries every caller's commands in order (Redis answers a connection's commands in the order
they came, so the replies are matched first in, first out), as redis-py's pipelines do. What it keeps of
redis-py's behaviour:

- a call that gets no reply within the client's socket timeout fails, and so do the calls queued behind it
  on the same connection (their replies could no longer be matched); the next call opens a new connection;
- a connection that breaks fails the calls waiting on it; a call that met a broken connection is tried once
  more on a new one (redis-py's default retry does the same);
- a script the server does not know (``NOSCRIPT``: a restarted Redis) is loaded and the call sent again;
- an error reply raises ``redis.exceptions.ResponseError``.

Single-node Redis over TCP or a Unix socket, with a password, a user and a database number. Anything else
(Redis Cluster, TLS, a credential provider) gets redis-py's own ``Script``: ``scripts_for`` decides.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("tollway.redis")

# The connection settings this channel understands; the rest of redis-py's keyword arguments must be absent
# (or be one of its bookkeeping entries below) for the channel to stand in for the client.
_UNDERSTOOD = {"host", "port", "path", "db", "username", "password", "socket_timeout", "socket_connect_timeout"}
_BOOKKEEPING = {"himport_registry", "maint_notifications_pool_handler", "maint_notifications_config",
                "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout", "retry",
                "encoding", "encoding_errors", "decode_responses", "socket_keepalive", "socket_keepalive_options",
                "health_check_interval", "client_name", "lib_name", "lib_version", "redis_connect_func",
                "protocol", "socket_type", "retry_on_timeout", "retry_on_error"}
DEFAULT_TIMEOUT_S = 5.0


class RunScript(Protocol):
    """What redis-py's ``AsyncScript`` and ``ChannelScript`` both are: ``await run(keys=..., args=...)``."""

    def __call__(self, keys: Sequence[Any] | None = None, args: Sequence[Any] | None = None) -> Awaitable[Any]: ...


class _Replies(asyncio.Protocol):
    """One connection: commands written as they come, replies handed to their callers in order."""

    def __init__(self, lost: Callable[[_Replies], None]) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step, start again
                self.abort(RedisConnectionError("Redis sent a reply that no command asked for"))
                return
            future, _ = self.waiting.popleft()
            if not future.done():  # a caller cancelled meanwhile: its reply is read and dropped
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(ResponseError(str(reply)))
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def send(self, packed: bytes, now: float) -> asyncio.Future[Any]:
        assert self.transport is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append((future, now))
        self.transport.write(packed)
        return future

    def abort(self, exc: Exception) -> None:
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if not self.closed:
            self.closed = True
            self._lost(self)
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(type(exc)(*exc.args))  # one each: their tracebacks are their own


class ScriptChannel:
    """One process's connection for the budget scripts (see the module's docstring)."""

    def __init__(self, *, host: str = "localhost", port: int = 6379, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float | None = None) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s or timeout_s
        self._conn: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    @classmethod
    def of(cls, client: aioredis.Redis) -> ScriptChannel | None:
        """A channel to the same server as ``client``, or None where this channel cannot stand in for it."""
        pool = getattr(client, "connection_pool", None)
        if type(client) is not aioredis.Redis or pool is None:
            return None
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None
        kwargs = dict(pool.connection_kwargs)
        if set(kwargs) - _UNDERSTOOD - _BOOKKEEPING or kwargs.get("protocol") not in (None, 2, "2") \
                or kwargs.get("decode_responses"):
            return None
        timeout = kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_S
        return cls(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), path=kwargs.get("path"),
                   db=int(kwargs.get("db") or 0), username=kwargs.get("username"), password=kwargs.get("password"),
                   timeout_s=float(timeout), connect_timeout_s=kwargs.get("socket_connect_timeout"))

    def script(self, source: str) -> ChannelScript:
        return ChannelScript(self, source)

    async def call(self, *args: Any, retry: bool = True) -> Any:
        """One command; its reply (an error reply raises ``ResponseError``)."""
        packed = _pack(*args)
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.closed or self._loop is not loop:
            conn = await self._connect()
        try:
            return await conn.send(packed, loop.time())
        except RedisConnectionError:
            if not retry or self.closed:
                raise
            return await self.call(*args, retry=False)

    async def aclose(self) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and not self._conn.closed:
            self._conn.abort(RedisConnectionError("The script channel was closed"))
        self._conn = None

    async def _connect(self) -> _Replies:
        if self.closed:
            raise RedisConnectionError("The script channel was closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test's, a worker's): nothing of the old one is usable
            self._loop, self._conn, self._connecting, self._watchdog = loop, None, None, None
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = loop.create_future()
        try:
            conn = await asyncio.wait_for(self._open(loop), self.connect_timeout_s)
        except BaseException as exc:  # a cancelled caller too: those waiting on its attempt must not wait forever
            failed, self._connecting = self._connecting, None
            error = RedisConnectionError(f"Error connecting to Redis at {self._where()}: "
                                         f"{str(exc) or type(exc).__name__}")
            failed.set_exception(error)
            failed.exception()  # retrieved: no "never retrieved" warning when no one else waited
            if isinstance(exc, OSError | TimeoutError | ResponseError):
                raise error from exc
            raise
        self._conn = conn
        done, self._connecting = self._connecting, None
        done.set_result(conn)
        if self._watchdog is None:
            self._watch()
        return conn

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Replies:
        def factory() -> _Replies:
            return _Replies(self._forget)

        if self.path is not None:
            _, conn = await loop.create_unix_connection(factory, self.path)
        else:
            _, conn = await loop.create_connection(factory, self.host, self.port)
        try:
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await conn.send(_pack(*auth), loop.time())
            if self.db:
                await conn.send(_pack("SELECT", self.db), loop.time())
        except BaseException:
            conn.abort(RedisConnectionError("handshake failed"))
            raise
        return conn

    def _forget(self, conn: _Replies) -> None:
        if self._conn is conn:
            self._conn = None

    def _watch(self) -> None:
        """Every quarter of the timeout: a reply owed longer than the timeout fails its connection."""
        assert self._loop is not None
        self._watchdog = self._loop.call_later(self.timeout_s / 4, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self.closed or self._loop is None:
            return
        conn = self._conn
        if conn is not None and conn.waiting and conn.waiting[0][1] < self._loop.time() - self.timeout_s:
            log.warning("Redis at %s sent no reply within %.1f s; reconnecting", self._where(), self.timeout_s)
            conn.abort(RedisTimeoutError(f"Timeout reading from Redis at {self._where()}"))
        self._watch()

    def _where(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def _pack(*args: Any) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


class ChannelScript:
    """A Lua script run by its SHA1 over a ``ScriptChannel``, loaded when the server does not know it."""

    def __init__(self, channel: ScriptChannel, source: str) -> None:
        self.channel = channel
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] | None = None, args: Sequence[Any] | None = None) -> Any:
        keys, args = keys or (), args or ()
        try:
            return await self.channel.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.channel.call("SCRIPT", "LOAD", self.source)
        return await self.channel.call("EVALSHA", self.sha, len(keys), *keys, *args)


def scripts_for(client: aioredis.Redis, *, channel: bool = True) -> tuple[Callable[[str], RunScript],
                                                                           ScriptChannel | None]:
    """How to register the budget scripts for ``client``: over a ``ScriptChannel`` where one can stand in for
    it (and ``channel`` allows it), else redis-py's ``register_script``; and the channel (to close), if any."""
    found = ScriptChannel.of(client) if channel else None
    if found is None:
        return client.register_script, None
    return found.script, found
