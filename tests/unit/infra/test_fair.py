"""Slots and turns handed out owner by owner: another owner waits for what is running, never for a queue it did
not make; one owner alone uses every slot, first come first served; a cancelled waiter leaks nothing."""

import asyncio
import threading

import pytest

from tollway.infra.fair import FairGate, Turns


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_the_next_owner_not_to_the_longest_queue() -> None:
    gate = FairGate(2)
    served: list[str] = []
    release = asyncio.Event()

    async def call(owner: str, name: str) -> None:
        async with gate.slot(owner):
            served.append(name)
            await release.wait()

    flood = [asyncio.create_task(call("a", f"a{i}")) for i in range(10)]
    await _settle()
    other = asyncio.create_task(call("b", "b0"))
    await _settle()
    assert served == ["a0", "a1"] and gate.waiting == 9 and gate.in_use == 2
    release.set()  # every holder ends at once: the next two slots go one to each owner waiting
    await asyncio.gather(*flood, other)
    assert served.index("b0") == 2  # first come first served would put it last, behind a2..a9
    assert served[3:] == [f"a{i}" for i in range(2, 10)]  # a's own calls keep their order


async def test_one_owner_alone_uses_every_slot_and_a_cap_keeps_one_for_the_next() -> None:
    gate = FairGate(4, per_owner=3)
    hold = asyncio.Event()

    async def call(owner: str) -> None:
        async with gate.slot(owner):
            await hold.wait()

    flood = [asyncio.create_task(call("a")) for _ in range(6)]
    await _settle()
    assert gate.held_by("a") == 3 and gate.waiting == 3
    late = asyncio.create_task(call("b"))
    await _settle()
    assert gate.held_by("b") == 1  # at once, while a's three still run
    assert gate.in_use == 4
    hold.set()
    await asyncio.gather(*flood, late)
    assert gate.in_use == 0

    alone = FairGate(3)
    hold = asyncio.Event()

    async def own() -> None:
        async with alone.slot(None):  # None is an owner like any other (a caller that names none)
            await hold.wait()

    calls = [asyncio.create_task(own()) for _ in range(5)]
    await _settle()
    assert alone.held_by(None) == 3 and alone.waiting == 2  # no cap: one owner fills the gate
    hold.set()
    await asyncio.wait_for(asyncio.gather(*calls), 1)
    assert alone.held_by(None) == 0 and alone.waiting == 0


async def test_a_cancelled_waiter_leaks_no_slot_even_one_handed_a_slot_as_it_was_cancelled() -> None:
    gate = FairGate(1)
    first = asyncio.Event()
    holder_in = asyncio.Event()

    async def holder() -> None:
        async with gate.slot("a"):
            holder_in.set()
            await first.wait()

    entered: list[str] = []

    async def waiter(name: str) -> None:
        async with gate.slot(name):
            entered.append(name)

    h = asyncio.create_task(holder())
    await holder_in.wait()
    gone = asyncio.create_task(waiter("b"))
    await _settle()
    gone.cancel()  # cancelled while waiting
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert gate.waiting == 0

    handed = asyncio.create_task(waiter("c"))
    await _settle()
    first.set()
    await asyncio.sleep(0)  # the holder ends and hands its slot to c; c is cancelled before it runs
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    await h
    assert entered == [] and gate.held_by("c") == 0
    await asyncio.wait_for(waiter("d"), 1)  # the slot came back
    assert entered == ["d"]


def test_turns_go_round_the_owners_waiting() -> None:
    """Four threads of owner a and one of b wait for turns: b's comes second, not fifth."""
    turns = Turns()
    order: list[str] = []

    def take(owner: str, name: str) -> None:
        with turns.turn(owner):
            order.append(name)

    waiters = []
    with turns.turn("a"):
        for owner, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")]:
            t = threading.Thread(target=take, args=(owner, name))
            t.start()
            waiters.append(t)
            while turns.waiting < len(waiters):
                threading.Event().wait(0.001)
    for t in waiters:
        t.join(10)
    assert order == ["b1", "a1", "a2", "a3"]  # a just held the turn: b's goes first
