"""How a streamed answer ends: the relay's ``RelayEnd`` for a replayed answer (cached, or the gateway's
own) and for an upstream stream, which hands its replica back and then runs the chat path's one
after-answer step (``Chat.after_answer``), as a whole answer does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING

from tollway.gateway.chat.calls import reserved_output
from tollway.gateway.chat.exchange import Exchange, int_param
from tollway.gateway.chat.relay import Accountant, Emitter, StreamRelay, as_chunks
from tollway.gateway.metering.accounting import CLIENT_CLOSED
from tollway.jsontypes import JSON
from tollway.routing import Served, Usage

if TYPE_CHECKING:
    from tollway.gateway.chat.stages import Chat


def relay(chat: Chat, ex: Exchange) -> AsyncIterator[bytes]:
    """A streamed answer: the upstream's stream relayed, or a whole answer (cached, the gateway's own)
    replayed as chunks, through the same output filters; settled as it ends."""
    served = ex.served
    wants_usage = bool((ex.data.get("stream_options") or {}).get("include_usage"))
    emitter = Emitter(ex.answered_by or "", wants_usage=wants_usage)
    if served is None or served.stream is None:  # a cached or degraded answer, replayed
        assert ex.answer is not None
        accountant = Accountant(ex.tally, fixed=chat.usage(ex, ex.answer))
        return StreamRelay(None, as_chunks(ex.answer, include_usage=True), accountant=accountant,
                           filters=ex.filters, emitter=emitter, end=Replayed(chat, ex)).frames()
    cap = ex.output_cap
    n = int_param(ex.params, "n") or 1
    accountant = Accountant(ex.tally, output_cap=reserved_output(cap, n) if ex.admission and cap else None,
                            estimate=lambda text, produced: chat.estimate(ex, text, produced))
    assert served.chunks is not None
    return StreamRelay(served.chunks, served.head, accountant=accountant, filters=ex.filters, emitter=emitter,
                       end=Relayed(chat, ex, served, emitter, accountant, n)).frames()


class Replayed:
    """The end of a replayed answer (cached or the gateway's own): settle, and say what it was."""

    def __init__(self, chat: Chat, ex: Exchange) -> None:
        self.chat, self.ex = chat, ex

    def settle(self, status: int, code: str | None, usage: Usage, source: str) -> Decimal:
        return self.chat.close(self.ex, status, code, usage, source)

    def info(self, cost: Decimal) -> JSON:
        return self.ex.info(cost)

    async def close_upstream(self) -> None:
        return None

    def closed(self, status: int) -> None:
        return None


class Relayed(Replayed):
    """The end of an upstream stream: hand its replica back, then the after-answer step."""

    def __init__(self, chat: Chat, ex: Exchange, served: Served, emitter: Emitter, accountant: Accountant,
                 n: int) -> None:
        super().__init__(chat, ex)
        self.served, self.emitter, self.accountant, self.n = served, emitter, accountant, n

    async def close_upstream(self) -> None:
        assert self.served.stream is not None
        await self.served.stream.aclose()

    def closed(self, status: int) -> None:
        self.served.release(status == 200, count=status != CLIENT_CLOSED)
        finish = self.accountant.finish_reason
        if status != 200 or not finish:
            return
        usage, _ = self.accountant.settled()
        emitter = self.emitter

        def answer() -> JSON:
            return emitter.answer(finish, usage)

        cacheable = self.n == 1 and self.accountant.plain_text
        self.chat.router.spawn(self.chat.after_answer(self.ex, "".join(emitter.text), answer, cacheable))
