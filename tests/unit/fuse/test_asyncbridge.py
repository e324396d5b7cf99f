"""AsyncRequests: requests that wait complete later, in any order; interrupts
reach what a request awaits, even when they overtake it."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from typing import Any

import pytest

from virtiofsd_py.fs.awaiting import await_, in_request
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.asyncbridge import AsyncRequests


def header(opcode: int, unique: int, args: bytes = b"") -> bytearray:
    return bytearray(abi.IN_HEADER.pack(40 + len(args), opcode, unique, 1, 0, 0, 0, 0, 0) + args)


class Handler:
    """A request handler that awaits an event per unique; writes its outcome."""

    def __init__(self) -> None:
        self.events: dict[int, asyncio.Event] = {}

    def __call__(self, readable: Sequence[Any], writable: Sequence[Any]) -> int:
        unique = abi.IN_HEADER.unpack_from(readable[0])[2]
        assert in_request()
        if unique % 4 == 0:
            return 1  # answers at once
        ev = self.events.setdefault(unique, asyncio.Event())
        try:
            await_(ev.wait())
        except OSError as e:
            return 100 + (e.errno or 0)
        return 2


async def submit(bridge: AsyncRequests, unique: int) -> asyncio.Future[int]:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    n = bridge.submit([header(abi.FUSE_GETATTR, unique)], [bytearray(16)], fut.set_result)
    if n is not None:
        fut.set_result(n)
    return fut


def interrupt(bridge: AsyncRequests, target: int) -> None:
    req = header(abi.FUSE_INTERRUPT, target + 1, abi.INTERRUPT_IN.pack(target))
    assert bridge.submit([req], [], lambda n: None) == 0


async def test_waiting_requests_complete_in_the_order_they_are_released() -> None:
    h = Handler()
    bridge = AsyncRequests(asyncio.get_running_loop(), h)
    now = await submit(bridge, 4)
    assert now.done() and now.result() == 1 and bridge.inflight == 0
    futs = {u: await submit(bridge, u) for u in (2, 6, 10)}
    assert bridge.inflight == 3
    await asyncio.sleep(0)
    h.events[10].set()
    assert await asyncio.wait_for(futs[10], 5) == 2
    assert not futs[2].done() and not futs[6].done()
    h.events[2].set()
    h.events[6].set()
    assert await asyncio.wait_for(asyncio.gather(futs[2], futs[6]), 5) == [2, 2]
    await asyncio.wait_for(bridge.drain(), 5)
    assert bridge.inflight == 0


@pytest.mark.parametrize("when", ["waiting", "before its task ran", "before it arrived"])
async def test_interrupt_answers_eintr(when: str) -> None:
    h = Handler()
    bridge = AsyncRequests(asyncio.get_running_loop(), h)
    if when == "before it arrived":
        interrupt(bridge, 6)
    fut = await submit(bridge, 6)
    if when == "waiting":
        await asyncio.sleep(0.01)
    if when != "before it arrived":
        interrupt(bridge, 6)
    assert await asyncio.wait_for(fut, 5) == 100 + errno.EINTR
    # The next request with that unique is not interrupted again.
    fut = await submit(bridge, 6)
    await asyncio.sleep(0)
    h.events[6].set()
    assert await asyncio.wait_for(fut, 5) == 2


async def test_interrupt_of_a_completed_request_is_dropped() -> None:
    h = Handler()
    bridge = AsyncRequests(asyncio.get_running_loop(), h)
    fut = await submit(bridge, 2)
    await asyncio.sleep(0)
    h.events[2].set()
    assert await asyncio.wait_for(fut, 5) == 2
    interrupt(bridge, 2)  # late: the request is done
    h.events[2].clear()
    fut = await submit(bridge, 2)
    await asyncio.sleep(0.01)
    assert not fut.done()  # not interrupted by the stale INTERRUPT
    h.events[2].set()
    assert await asyncio.wait_for(fut, 5) == 2


def test_await_outside_a_request_refuses() -> None:
    async def coro() -> None:
        pass

    with pytest.raises(RuntimeError, match="outside a request"):
        await_(coro())
