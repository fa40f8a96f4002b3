"""The disconnect watch around a request: a client that goes away cancels the work; a request that ends
normally leaves nothing behind for the cyclic garbage collector (every request's watcher is cancelled)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from tollway.gateway.http.streaming import ClientDisconnected, DisconnectWatch, until_disconnect


class Client:
    """uvicorn's receive: the body, then nothing until the client leaves (or the response completes)."""

    def __init__(self) -> None:
        self.sent = False
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, object]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_client_that_leaves_cancels_the_work():
    client = Client()

    async def work(read_body) -> str:
        await read_body()
        client.gone.set()
        await asyncio.sleep(10)
        return "finished"

    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(until_disconnect(client.receive, work), 2)


async def test_requests_that_end_normally_leave_no_cyclic_garbage():
    async def work(read_body) -> str:
        await read_body()
        await asyncio.sleep(0)
        return "answered"

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            assert await until_disconnect(Client().receive, work) == "answered"
        await asyncio.sleep(0.01)  # the cancelled watchers finish
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, DisconnectWatch)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
