"""Slots of a shared resource handed out owner by owner (``FairGate``), and turns taken the same way (``Turns``).

A resource every tenant shares (the local embedder's cores, the document parser, searches) runs a few calls at
once. With a plain semaphore, or a lock handed over in arrival order, its waiters are served first come first
served: a tenant that sends a hundred calls at once puts every other tenant's next call behind all hundred.
Here the waiters queue per owner (a tenant), a freed slot goes to the waiting owner that holds the fewest (among
equals, the one served longest ago), and a turn to the next owner round the owners waiting. So another tenant
waits for the calls already running at most, never for a queue it did not make. One owner alone uses every
slot; the order among one owner's own calls stays first come first served.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

T = TypeVar("T")


class FairGate:
    """At most ``slots`` holders at once, at most ``per_owner`` of them one owner's (default: all of them).

    ``per_owner`` below ``slots`` keeps a slot for the next owner to come where a call may last long (a
    call holding its slot cannot be interrupted for another tenant's)."""

    def __init__(self, slots: int, *, per_owner: int | None = None) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.slots = slots
        self.per_owner = max(1, min(per_owner or slots, slots))
        self._free = slots
        self._held: dict[Hashable, int] = {}  # owner -> slots it holds
        # owners with calls waiting, the next to serve first (one served moves to the end)
        self._waiting: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def in_use(self) -> int:
        """Slots held now."""
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def held_by(self, owner: Hashable) -> int:
        return self._held.get(owner, 0)

    @asynccontextmanager
    async def slot(self, owner: Hashable) -> AsyncIterator[None]:
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release(owner)

    def _may_hold_more(self, owner: Hashable) -> bool:
        return self._held.get(owner, 0) < self.per_owner

    async def _acquire(self, owner: Hashable) -> None:
        # A free slot here means no waiter could take it (each release hands slots on at once), so a newcomer
        # jumps no one; its own earlier calls still waiting keep their place ahead of it.
        if self._free and self._may_hold_more(owner) and owner not in self._waiting:
            self._take(owner)
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # handed a slot as it was cancelled: give it on
                self._release(owner)
            else:
                self._forget(owner, granted)
            raise

    def _take(self, owner: Hashable) -> None:
        self._free -= 1
        self._held[owner] = self._held.get(owner, 0) + 1

    def _release(self, owner: Hashable) -> None:
        self._free += 1
        left = self._held[owner] - 1
        if left:
            self._held[owner] = left
        else:
            del self._held[owner]
        self._hand_on()

    def _forget(self, owner: Hashable, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self._waiting[owner]

    def _hand_on(self) -> None:
        """Free slots to the waiting owners in turn, each owner's oldest call first."""
        while self._free:
            # the owner holding the fewest slots, of those that may hold one more; among equals the one served
            # longest ago (the dict's order)
            eligible = [o for o in self._waiting if self._may_hold_more(o)]
            if not eligible:
                return
            owner = min(eligible, key=self.held_by)
            granted = _serve(self._waiting, owner)
            if not granted.done():  # (a cancelled waiter removes itself; this is the belt to that)
                self._take(owner)
                granted.set_result(None)


def _serve(waiting: OrderedDict[Hashable, deque[T]], owner: Hashable) -> T:
    """``owner``'s oldest waiter, taken off its queue; the owner goes to the end of the round (or out of it
    where none of its waiters is left)."""
    queue = waiting[owner]
    first = queue.popleft()
    if queue:
        waiting.move_to_end(owner)
    else:
        del waiting[owner]
    return first


class Turns:
    """One holder at a time among threads, handed over owner by owner: callers that ask for a turn per step (a
    batch) take turns step by step, and an owner with many callers gets one turn in each round of the owners
    waiting, as an owner with one does. (A lock would let the thread that just released it take it again.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: OrderedDict[Hashable, deque[threading.Event]] = OrderedDict()
        self._held = False

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._waiting.values())

    @contextmanager
    def turn(self, owner: Hashable = None) -> Iterator[None]:
        with self._lock:
            mine = threading.Event() if self._held else None
            if mine is None:
                self._held = True
            else:
                self._waiting.setdefault(owner, deque()).append(mine)
        if mine is not None:
            mine.wait()  # handed over by the holder before us: held for us
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    # the owner served longest ago goes first; the one just served is last among those waiting
                    if owner in self._waiting and len(self._waiting) > 1:
                        self._waiting.move_to_end(owner)
                    _serve(self._waiting, next(iter(self._waiting))).set()
                else:
                    self._held = False
