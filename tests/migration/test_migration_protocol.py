"""Migration plumbing of the back-end: dirty log and device state transfer.

In process, with the echo handler of vhost_rig and a fake state
provider; the state format itself is tested in test_migration_state.py.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections.abc import AsyncIterator

import pytest
from vhost_rig import F_BASE, F_PROTO, GPA_BASE, Rig, echo, u64_of

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.backend import BackendConfig, VhostUserBackend
from virtiofsd_py.vhost.connection import VhostUserConnection
from virtiofsd_py.virtio.dirty_log import DirtyLog
from virtiofsd_py.virtio.runner import QueueRunner

F_LOG_ALL = p.bit(p.VHOST_F_LOG_ALL)
PROTO = (
    p.bit(p.ProtocolFeature.REPLY_ACK)
    | p.bit(p.ProtocolFeature.LOG_SHMFD)
    | p.bit(p.ProtocolFeature.DEVICE_STATE)
)


class FakeState:
    def __init__(self, blob: bytes = b"") -> None:
        self.blob = blob
        self.loaded: bytes | None = None
        self.log_events: list[bool] = []
        self.fail_load = False

    def save(self) -> bytes:
        return self.blob

    def load(self, data: bytes) -> None:
        if self.fail_load:
            raise ValueError("corrupt state")
        self.loaded = data

    def log_all_changed(self, enabled: bool) -> None:
        self.log_events.append(enabled)


class MigRig(Rig):
    def __init__(self, state: FakeState) -> None:
        super().__init__()
        self.state = state
        self.backend = VhostUserBackend(self.runner, BackendConfig(max_queues=3), state=state)
        self.log_fd = os.memfd_create("dirty-log")
        # One bit per 4 KiB page of the whole guest-physical range in use.
        self.log_size = ((GPA_BASE + self.dmem.size) >> 12) // 8 + 8
        os.ftruncate(self.log_fd, self.log_size)
        self.log_map = mmap.mmap(self.log_fd, self.log_size)

    async def set_log_base(self) -> None:
        reply = await self.send(
            p.MessageType.SET_LOG_BASE, p.LOG_DESC.pack(self.log_size, 0), [os.dup(self.log_fd)]
        )
        assert u64_of(reply) == 0

    def dirty_pages(self) -> set[int]:
        pages = set()
        for i, byte in enumerate(self.log_map[: self.log_size]):
            for b in range(8):
                if byte & (1 << b):
                    pages.add(i * 8 + b)
        return pages

    async def close(self) -> None:
        await super().close()
        self.log_map.close()
        os.close(self.log_fd)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.close()


@pytest.fixture
async def mig() -> AsyncIterator[MigRig]:
    r = MigRig(FakeState(b"x" * (3 << 20)))
    yield r
    await r.close()


async def test_migration_features_offered(mig: MigRig) -> None:
    assert u64_of(await mig.send(p.MessageType.GET_FEATURES)) & F_LOG_ALL
    proto = u64_of(await mig.send(p.MessageType.GET_PROTOCOL_FEATURES))
    assert proto & p.bit(p.ProtocolFeature.LOG_SHMFD)
    assert proto & p.bit(p.ProtocolFeature.DEVICE_STATE)


async def test_no_migration_without_state_provider(rig: Rig) -> None:
    assert not u64_of(await rig.send(p.MessageType.GET_FEATURES)) & F_LOG_ALL
    proto = u64_of(await rig.send(p.MessageType.GET_PROTOCOL_FEATURES))
    assert not proto & p.bit(p.ProtocolFeature.DEVICE_STATE)


async def test_logs_exactly_the_pages_written(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    q = await mig.start_ring(1)
    await mig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    await mig.set_log_base()
    # Before LOG_ALL: nothing is logged.
    mig.submit(q, b"a" * 100)
    await mig.completions(q)
    assert mig.dirty_pages() == set()
    await mig.u64(p.MessageType.SET_FEATURES, F_BASE | F_PROTO | F_LOG_ALL)
    assert mig.state.log_events == [True]
    # A reply spanning page boundaries dirties exactly its pages.
    data = b"b" * 6000
    gpa = mig.dmem.alloc(len(data))
    mig.dmem.write(gpa, data)
    out = mig.dmem.alloc(8192, 4096) + 4000
    q.add([drv.Buffer(gpa, len(data))], [drv.Buffer(out, 6000)])
    q.kick(force=True)
    await mig.completions(q)
    assert mig.dirty_pages() == set(range(out >> 12, ((out + 5999) >> 12) + 1))
    assert len(mig.dirty_pages()) == 3
    await mig.u64(p.MessageType.SET_FEATURES, F_BASE | F_PROTO)
    assert mig.state.log_events == [True, False]


async def test_used_ring_logged_with_vring_f_log(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    q = await mig.start_ring(1)
    await mig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    await mig.set_log_base()
    await mig.u64(p.MessageType.SET_FEATURES, F_BASE | F_PROTO | F_LOG_ALL)
    u = mig.dmem.gpa_to_user
    # QEMU re-sends the ring address with VHOST_VRING_F_LOG and the used
    # ring's guest-physical address while the ring runs.
    await mig.send(
        p.MessageType.SET_VRING_ADDR,
        p.VRING_ADDR.pack(
            1, p.VRING_F_LOG, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa), q.used_gpa
        ),
    )
    mig.submit(q, b"")  # a zero-length reply: only the used ring is written
    await mig.completions(q)
    assert mig.dirty_pages() == {q.used_gpa >> 12}


async def test_dirty_log_bits_are_or_ed() -> None:
    fd = os.memfd_create("log")
    os.ftruncate(fd, 4096)
    try:
        dl = DirtyLog(fd, 4096, 0)
        m = mmap.mmap(fd, 4096)
        m[0] = 0b1000_0001  # another device's bits
        dl.mark(0x1000, 1)  # page 1
        dl.mark(0x3F000, 0x2000)  # pages 63 and 64 (across a 64-page word)
        assert m[0] == 0b1000_0011
        assert m[7] == 0x80 and m[8] == 0x01
        dl.close()
        m.close()
    finally:
        os.close(fd)


async def set_state_fd(rig: Rig, direction: int, fd: int) -> int:
    reply = await rig.send(
        p.MessageType.SET_DEVICE_STATE_FD, p.DEVICE_STATE_PARAMS.pack(direction, 0), [fd]
    )
    return u64_of(reply)


async def check(rig: Rig) -> int:
    return u64_of(await rig.send(p.MessageType.CHECK_DEVICE_STATE))


async def test_save_streams_a_state_bigger_than_the_pipe(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    r, w = os.pipe()
    assert await set_state_fd(mig, p.DEVICE_STATE_SAVE, w) == p.VRING_NOFD_MASK
    # As QEMU: read after the reply, in 1 MiB chunks, until EOF.
    got = bytearray()
    loop = asyncio.get_running_loop()
    while chunk := await loop.run_in_executor(None, os.read, r, 1 << 20):
        got += chunk
    os.close(r)
    assert bytes(got) == mig.state.blob
    assert await check(mig) == 0


async def test_load_then_check(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    r, w = os.pipe()
    assert await set_state_fd(mig, p.DEVICE_STATE_LOAD, r) == p.VRING_NOFD_MASK
    blob = os.urandom(2 << 20)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _write_and_close, w, blob)
    assert await check(mig) == 0
    assert mig.state.loaded == blob


def _write_and_close(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.close(fd)


async def test_failed_load_is_reported_by_check(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    mig.state.fail_load = True
    r, w = os.pipe()
    await set_state_fd(mig, p.DEVICE_STATE_LOAD, r)
    _write_and_close(w, b"garbage")
    assert await check(mig) != 0


async def test_transfer_refused_while_running_or_bad_params(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    await mig.start_ring(1)  # the ring is started: not suspended
    r, w = os.pipe()
    reply = await set_state_fd(mig, p.DEVICE_STATE_SAVE, w)
    assert reply & 0xFF and reply & p.VRING_NOFD_MASK
    with pytest.raises(OSError):
        os.fstat(w)  # the fd was closed, not kept
    await mig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
    r2, w2 = os.pipe()
    reply = await mig.send(
        p.MessageType.SET_DEVICE_STATE_FD, p.DEVICE_STATE_PARAMS.pack(0, 7), [w2]
    )
    assert u64_of(reply) & 0xFF  # unknown phase
    assert await check(mig) != 0  # nothing to check
    os.close(r)
    os.close(r2)


async def test_oversized_state_is_refused() -> None:
    state = FakeState()
    rig = MigRig(state)
    rig.backend.config.max_state_size = 1000
    try:
        await rig.setup(protocol=PROTO)
        r, w = os.pipe()
        await set_state_fd(rig, p.DEVICE_STATE_LOAD, r)
        await asyncio.get_running_loop().run_in_executor(None, _write_and_close, w, b"y" * 5000)
        assert await check(rig) != 0
        assert state.loaded is None
    finally:
        await rig.close()


async def test_the_backend_asks_for_the_transfer_and_does_not_run_it(mig: MigRig) -> None:
    """SET_DEVICE_STATE_FD's reply carries the transfer; the pipe stays untouched
    until whoever sends the reply runs it (the connection, here the rig)."""
    await mig.setup(protocol=PROTO)
    r, w = os.pipe()
    params = p.DEVICE_STATE_PARAMS.pack(p.DEVICE_STATE_SAVE, p.DEVICE_STATE_PHASE_STOPPED)
    msg = p.Message(p.MessageType.SET_DEVICE_STATE_FD, p.VERSION, params, [w])
    reply = await mig.backend.handle(msg)
    assert reply is not None and u64_of(reply) == p.VRING_NOFD_MASK
    job = reply.transfer
    assert job is not None and job.direction == p.DEVICE_STATE_SAVE and job.fd == w
    assert reply.fds == ()  # never a channel of our own (bit 8 says so)
    await asyncio.sleep(0.05)
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        os.read(r, 1)  # nothing written: the back-end only asked
    os.set_blocking(r, True)
    mig.transfers.start(job)
    got = bytearray()
    loop = asyncio.get_running_loop()
    while chunk := await loop.run_in_executor(None, os.read, r, 1 << 20):
        got += chunk
    os.close(r)
    assert bytes(got) == mig.state.blob
    assert await check(mig) == 0


async def test_second_transfer_while_one_runs_is_refused(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    r, w = os.pipe()
    assert await set_state_fd(mig, p.DEVICE_STATE_LOAD, r) == p.VRING_NOFD_MASK
    # The LOAD waits for our EOF: a second SET_DEVICE_STATE_FD is an error.
    r2, w2 = os.pipe()
    reply = await set_state_fd(mig, p.DEVICE_STATE_SAVE, w2)
    assert reply & 0xFF and reply & p.VRING_NOFD_MASK
    with pytest.raises(OSError):
        os.fstat(w2)  # the refused fd was closed, not kept
    os.close(r2)
    # The first transfer is unharmed and CHECK_DEVICE_STATE reports it.
    blob = b"first" * 1000
    await asyncio.get_running_loop().run_in_executor(None, _write_and_close, w, blob)
    assert await check(mig) == 0
    assert mig.state.loaded == blob


async def test_a_transfer_cancelled_before_it_ran_closes_its_fd(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO)
    r, w = os.pipe()
    await set_state_fd(mig, p.DEVICE_STATE_LOAD, r)
    await mig.transfers.cancel()  # before the task took its first step
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")  # our read end is gone
    os.close(w)
    assert await check(mig) != 0
    assert mig.state.loaded is None


async def _frontend_exchange(sock: socket.socket, data: bytes, fds: list[int], reply: int) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, socket.send_fds, sock, [data], fds)
    for fd in fds:
        os.close(fd)
    got = b""
    while len(got) < reply:
        chunk = await loop.run_in_executor(None, sock.recv, reply - len(got))
        assert chunk
        got += chunk
    return got


async def test_closing_the_connection_cancels_the_transfer() -> None:
    """The connection runs the transfer after its reply, and ends it with itself."""
    state = FakeState()
    runner = QueueRunner(asyncio.get_running_loop(), echo)
    backend = VhostUserBackend(runner, BackendConfig(max_queues=3), state=state)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    serving = asyncio.ensure_future(VhostUserConnection(ours, backend).serve())
    r, w = os.pipe()
    try:
        hello = p.encode_message(p.MessageType.SET_PROTOCOL_FEATURES, p.U64.pack(PROTO))
        await _frontend_exchange(theirs, hello, [], 0)
        params = p.DEVICE_STATE_PARAMS.pack(p.DEVICE_STATE_LOAD, p.DEVICE_STATE_PHASE_STOPPED)
        ask = p.encode_message(p.MessageType.SET_DEVICE_STATE_FD, params)
        reply = await _frontend_exchange(theirs, ask, [r], p.HEADER_SIZE + 8)
        assert p.U64.unpack_from(reply, p.HEADER_SIZE)[0] == p.VRING_NOFD_MASK
        os.write(w, b"half a state")  # the transfer runs: it reads this
        theirs.close()  # the front-end goes away mid-transfer
        await asyncio.wait_for(serving, 5)
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")  # the back-end's end of the pipe is closed
        assert state.loaded is None
    finally:
        theirs.close()
        os.close(w)
        runner.close()


async def test_device_state_messages_need_device_state(mig: MigRig) -> None:
    await mig.setup(protocol=PROTO & ~p.bit(p.ProtocolFeature.DEVICE_STATE))
    r, w = os.pipe()
    reply = await set_state_fd(mig, p.DEVICE_STATE_LOAD, r)
    assert reply & 0xFF and reply & p.VRING_NOFD_MASK
    with pytest.raises(OSError):
        os.fstat(r)  # closed, not kept
    os.close(w)
    assert await check(mig) != 0


async def test_a_finished_unchecked_transfer_is_replaced(mig: MigRig) -> None:
    """Phase "finished": a new SET_DEVICE_STATE_FD drops the unchecked outcome."""
    await mig.setup(protocol=PROTO)
    mig.state.fail_load = True
    r, w = os.pipe()
    await set_state_fd(mig, p.DEVICE_STATE_LOAD, r)
    _write_and_close(w, b"bad")
    while mig.backend._transfer is not None and not mig.backend._transfer.outcome.done():
        await asyncio.sleep(0.01)
    mig.state.fail_load = False
    r, w = os.pipe()
    assert await set_state_fd(mig, p.DEVICE_STATE_LOAD, r) == p.VRING_NOFD_MASK
    _write_and_close(w, b"good")
    assert await check(mig) == 0  # the second transfer's outcome
    assert mig.state.loaded == b"good"
    assert await check(mig) != 0  # checked: back to no transfer
