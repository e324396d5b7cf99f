"""Queue workers (virtio/worker.py and its compiled twin) behind the vhost-user back-end.

Each test runs with both twins when the compiled one is built.  The rig is
an in-process back-end over real memfd rings (tests/support/vhost_rig.py);
its handler echoes the readable bytes into the writable buffers.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from vhost_rig import GPA_BASE, Rig, echo

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.virtio import workers
from virtiofsd_py.virtio.types import MemoryRegion

TWINS = [pytest.param(workers.PureQueueWorker, id="pure")]
if workers.CompiledQueueWorker is not None:
    TWINS.append(pytest.param(workers.CompiledQueueWorker, id="compiled"))


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Any:
    return request.param


async def started(rig: Rig, *rings: int) -> list[drv.SplitQueue]:
    await rig.setup()
    out = []
    for i in rings:
        out.append(await rig.start_ring(i))
        await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(i, 1))
    return out


async def test_requests_are_served_on_the_queue_thread(twin: Any) -> None:
    names: list[str] = []

    def handler(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        names.append(threading.current_thread().name)
        return echo(readable, writable)

    rig = Rig(handler, worker=twin)
    try:
        (q,) = await started(rig, 1)
        chains = [rig.submit(q, b"req%d" % i) for i in range(5)]
        used = await rig.completions(q, 5)
        assert sorted(u.chain.head for u in used) == sorted(c.head for c in chains)
        for c in chains:
            assert rig.dmem.read(c.in_[0].gpa, 4) == rig.dmem.read(c.out[0].gpa, 4)
        assert set(names) == {"vfsd-queue-1"}
    finally:
        await rig.close()


async def test_bad_chain_is_returned_unused_and_the_ring_goes_on(twin: Any) -> None:
    rig = Rig(worker=twin)
    try:
        (q,) = await started(rig, 1)
        bad = q.add_raw([drv.RawDesc(GPA_BASE + (64 << 20), 16)])  # outside guest memory
        q.kick(force=True)
        (used,) = await rig.completions(q)
        assert used.chain is bad and used.length == 0
        rig.submit(q, b"fine")
        (used,) = await rig.completions(q)
        assert used.length == 4
    finally:
        await rig.close()


async def test_impossible_avail_index_breaks_the_ring(twin: Any) -> None:
    rig = Rig(worker=twin)
    try:
        (q,) = await started(rig, 1)
        await rig.u64(p.MessageType.SET_VRING_ERR, 1, fds=[os.dup(q.err_fd)])
        q._set_u16(q.avail_gpa + 2, 1000)  # more than the queue size ahead
        os.eventfd_write(q.kick_fd, 1)
        await asyncio.wait_for(rig.loop.run_in_executor(None, drv.wait_readable, q.err_fd, 5), 10)
        assert rig.backend.rings[1].broken
    finally:
        await rig.close()


async def test_fast_operations_answer_or_decline(twin: Any) -> None:
    seen: list[bytes] = []

    def fast(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        data = bytes(readable[0])
        if not data.startswith(b"F"):
            return -1
        seen.append(data)
        writable[0][:2] = b"ok"
        return 2

    rig = Rig(worker=twin, fast=fast)
    try:
        (q,) = await started(rig, 1)
        fc = rig.submit(q, b"Fast")
        sc = rig.submit(q, b"slow")
        used = {u.chain.head: u.length for u in await rig.completions(q, 2)}
        assert used == {fc.head: 2, sc.head: 4}
        assert rig.dmem.read(fc.in_[0].gpa, 2) == b"ok"
        assert rig.dmem.read(sc.in_[0].gpa, 4) == b"slow"
        assert seen == [b"Fast"]
    finally:
        await rig.close()


async def test_get_vring_base_waits_for_slow_requests(twin: Any) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def handler(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        if bytes(readable[0]).startswith(b"lock"):
            entered.set()
            gate.wait(10)
        return echo(readable, writable)

    def may_block(readable: Sequence[memoryview]) -> bool:
        return bytes(readable[0]).startswith(b"lock")

    rig = Rig(handler, worker=twin, may_block=may_block)
    try:
        (q,) = await started(rig, 1)
        rig.submit(q, b"lock")
        await asyncio.wait_for(rig.loop.run_in_executor(None, entered.wait, 5), 10)
        # A slow request does not hold up the ring.
        rig.submit(q, b"next")
        (used,) = await rig.completions(q)
        assert used.length == 4 and rig.dmem.read(used.chain.in_[0].gpa, 4) == b"next"
        stopping = asyncio.ensure_future(
            rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
        )
        done, _ = await asyncio.wait({stopping}, timeout=0.05)
        assert not done  # the lock request is still in flight
        gate.set()
        reply = await asyncio.wait_for(stopping, 5)
        assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (1, 2)
        assert [u.length for u in q.poll_used()] == [4]
        assert rig.backend.suspended
    finally:
        gate.set()
        await rig.close()


async def test_drain_interrupts_lock_waits(twin: Any) -> None:
    release = threading.Event()
    entered = threading.Event()

    def handler(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        entered.set()
        release.wait(10)
        return 0

    rig = Rig(handler, worker=twin, may_block=lambda r: True, interrupt=release.set)
    try:
        (q,) = await started(rig, 1)
        rig.submit(q, b"wait")
        await asyncio.wait_for(rig.loop.run_in_executor(None, entered.wait, 5), 10)
        reply = await asyncio.wait_for(
            rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0)), 5
        )
        assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (1, 1)
        assert [u.length for u in q.poll_used()] == [0]
    finally:
        release.set()
        await rig.close()


async def test_two_queues_are_served_concurrently(twin: Any) -> None:
    # Each request waits until the other queue's request has started: only
    # two threads serving at once can complete both.
    barrier = threading.Barrier(2, timeout=5)

    def handler(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        barrier.wait()
        return echo(readable, writable)

    rig = Rig(handler, worker=twin)
    try:
        q1, q2 = await started(rig, 1, 2)
        rig.submit(q1, b"one")
        rig.submit(q2, b"two")
        (u1,) = await rig.completions(q1)
        (u2,) = await rig.completions(q2)
        assert (u1.length, u2.length) == (3, 3)
    finally:
        barrier.abort()
        await rig.close()


async def test_memory_change_while_serving(twin: Any) -> None:
    rig = Rig(worker=twin)
    extra = drv.GuestMemory(1 << 20, gpa_base=GPA_BASE + (16 << 20))
    try:
        (q,) = await started(rig, 1)
        for round_ in range(3):
            chains = [rig.submit(q, b"r%d-%d" % (round_, i)) for i in range(4)]
            region = MemoryRegion(extra.gpa_base, extra.size, extra.user_addr, 0)
            await rig.send(
                p.MessageType.ADD_MEM_REG, p.encode_single_region(region), [os.dup(extra.fd)]
            )
            await rig.send(p.MessageType.REM_MEM_REG, p.encode_single_region(region))
            used = await rig.completions(q, len(chains))
            assert sorted(u.length for u in used) == [4] * 4
    finally:
        await rig.close()
        extra.close()


async def test_disabled_ring_waits_for_enable(twin: Any) -> None:
    rig = Rig(worker=twin)
    try:
        await rig.setup()
        q = await rig.start_ring(1)
        chain = rig.submit(q, b"ping")
        assert not drv.wait_readable(q.call_fd, 0.05)
        assert q.poll_used() == []
        await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
        (used,) = await rig.completions(q)
        assert used.chain is chain and used.length == 4
    finally:
        await rig.close()


async def test_restart_after_stop_keeps_the_indices(twin: Any) -> None:
    rig = Rig(worker=twin)
    try:
        (q,) = await started(rig, 1)
        for _ in range(3):
            rig.submit(q, b"a")
        await rig.completions(q, 3)
        reply = await rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
        assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (1, 3)
        await rig.send(p.MessageType.SET_VRING_BASE, p.VRING_STATE.pack(1, 3))
        u = rig.dmem.gpa_to_user
        await rig.send(
            p.MessageType.SET_VRING_ADDR,
            p.VRING_ADDR.pack(1, 0, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa), 0),
        )
        await rig.u64(p.MessageType.SET_VRING_KICK, 1, fds=[os.dup(q.kick_fd)])
        rig.submit(q, b"again")
        (used,) = await rig.completions(q)
        assert used.length == 5
    finally:
        await rig.close()


@pytest.mark.skipif(workers.CompiledQueueWorker is None, reason="the compiled core is not built")
async def test_compiled_fast_operations_capsule_and_counts() -> None:
    from virtiofsd_py.virtio._cworker import testing_fast_ops

    getattr_, lookup = 3, 1
    rig = Rig(worker=workers.CompiledQueueWorker, fast=testing_fast_ops(1 << getattr_, 2))
    try:
        (q,) = await started(rig, 1)

        def request(opcode: int, unique: int) -> bytes:
            return struct.pack("<IIQQIIII", 40, opcode, unique, 1, 0, 0, 0, 0)

        fc = rig.submit(q, request(getattr_, 7))
        pc = rig.submit(q, request(lookup, 8))
        used = {u.chain.head: u.length for u in await rig.completions(q, 2)}
        assert used == {fc.head: 16, pc.head: 40}  # answered in C / echoed by Python
        assert struct.unpack("<IiQ", rig.dmem.read(fc.in_[0].gpa, 16)) == (16, -2, 7)
        assert rig.runner.fast_counts() == {(getattr_, 2): 1}
        await rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
        assert rig.runner.fast_counts() == {(getattr_, 2): 1}  # kept after the worker ends
    finally:
        await rig.close()


async def test_a_failing_handler_returns_the_chain_unused(twin: Any) -> None:
    calls: list[bytes] = []

    def handler(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        calls.append(bytes(readable[0]))
        if calls[-1] == b"boom":
            raise RuntimeError("handler bug")
        return -5 if calls[-1] == b"neg!" else echo(readable, writable)

    rig = Rig(handler, worker=twin)
    try:
        (q,) = await started(rig, 1)
        chains = [rig.submit(q, d) for d in (b"boom", b"neg!", b"fine")]
        used = {u.chain.head: u.length for u in await rig.completions(q, 3)}
        assert [used[c.head] for c in chains] == [0, 0, 4]  # the ring goes on
    finally:
        await rig.close()
