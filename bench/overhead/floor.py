"""The least a Python gateway on Tollway's server and client must spend per proxied request: a bare proxy
(issue 27, "the hot path at Python's limit").

An ASGI app with no framework under uvicorn (uvloop + httptools, as `tollway serve` runs), forwarding each
POST to the upstream through the gateway's own aiohttp session (``routing.upstream.new_session``). Three
levels, each what any gateway of this shape cannot skip:

    pass    the body forwarded as bytes, the upstream's answer returned as bytes
    json    the request parsed and re-serialised (orjson), the answer parsed for its usage and re-serialised
    budget  json, plus one Lua script per request over the gateway's script channel to Redis (an admission
            with a counter: the least a shared budget costs)

    python bench/overhead/floor.py --upstream URL --port PORT [--level json] [--redis URL]

`bench/overhead/servers.py --floor` runs the three beside the gateway and the upstream in one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn

from tollway.infra.redisclient import connect
from tollway.infra.redisscripts import RunScript, scripts_for
from tollway.routing.upstream import new_session

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# A counter under a limit: the shape of an admission, without leases.
ADMIT = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if used > tonumber(ARGV[2]) then redis.call('DECRBY', KEYS[1], ARGV[1]); return 0 end
return used
"""
HEADERS = [(b"content-type", b"application/json")]


class Floor:
    def __init__(self, upstream: str, level: str, redis_url: str | None) -> None:
        self.target = upstream.rstrip("/") + "/chat/completions"
        self.level = level
        self.redis_url = redis_url
        self.admit: RunScript | None = None
        self.session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["method"] == "GET":  # readiness
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.level != "pass":
            request = orjson.loads(body)
            body = orjson.dumps(request)
        if self.admit is not None:
            if not await self.admit(keys=["floor:budget"], args=[1, 1 << 60]):
                raise RuntimeError("the floor's budget is never reached")
        assert self.session is not None
        async with self.session.post(self.target, data=body, headers={"content-type": "application/json"}) as resp:
            status, answer = resp.status, await resp.read()
        if self.level != "pass":
            parsed = orjson.loads(answer)
            _ = parsed.get("usage", {}).get("total_tokens", 0)
            answer = orjson.dumps(parsed)
        await send({"type": "http.response.start", "status": status, "headers": HEADERS})
        await send({"type": "http.response.body", "body": answer})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = new_session()
                if self.level == "budget":
                    assert self.redis_url, "--level budget needs --redis"
                    client = await connect(self.redis_url)
                    register, _ = scripts_for(client, channel=True)
                    self.admit = register(ADMIT)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, ending in /v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--level", choices=("pass", "json", "budget"), default="json")
    parser.add_argument("--redis", help="Redis URL (level budget)")
    args = parser.parse_args()
    uvicorn.run(Floor(args.upstream, args.level, args.redis), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", lifespan="on")


if __name__ == "__main__":
    main()
