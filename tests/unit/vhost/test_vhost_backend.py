"""The vhost-user back-end state machine, in process, over real memfd rings.

The handler here echoes the readable bytes into the writable buffers, so
each test sees exactly when a request was processed.  Ring-state rules are
those of vhost-user.rst "Ring states" (seed patches 3/8 and 4/8).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence

import pytest
from vhost_rig import F_BASE, F_PROTO, GPA_BASE, REPLY_ACK, Rig, echo, u64_of

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.device import offered_features
from virtiofsd_py.virtio.types import MemoryRegion


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.close()


async def test_feature_replies(rig: Rig) -> None:
    assert u64_of(await rig.send(p.MessageType.GET_FEATURES)) == offered_features()
    proto = u64_of(await rig.send(p.MessageType.GET_PROTOCOL_FEATURES))
    assert proto & REPLY_ACK and proto & p.bit(p.ProtocolFeature.MQ)
    assert not proto & p.bit(p.ProtocolFeature.CONFIG)  # only with a tag
    assert u64_of(await rig.send(p.MessageType.GET_QUEUE_NUM)) == 3


async def test_reply_ack_and_nak(rig: Rig) -> None:
    await rig.u64(p.MessageType.SET_PROTOCOL_FEATURES, REPLY_ACK)
    assert u64_of(await rig.send(p.MessageType.SET_OWNER, need_reply=True)) == 0
    bad = await rig.u64(p.MessageType.SET_FEATURES, 1 << 60, need_reply=True)
    assert u64_of(bad) != 0
    assert rig.backend.features == 0
    # Without NEED_REPLY there is no ack, even with REPLY_ACK negotiated.
    assert await rig.send(p.MessageType.SET_OWNER) is None


async def test_unknown_and_malformed_messages(rig: Rig) -> None:
    await rig.u64(p.MessageType.SET_PROTOCOL_FEATURES, REPLY_ACK)
    assert u64_of(await rig.send(200, b"junk", need_reply=True)) == 1
    assert u64_of(await rig.send(p.MessageType.SET_FEATURES, b"\1", need_reply=True)) == 1
    assert (
        u64_of(
            await rig.send(p.MessageType.SET_VRING_NUM, p.VRING_STATE.pack(9, 16), need_reply=True)
        )
        == 1
    )
    assert (
        u64_of(
            await rig.send(p.MessageType.SET_VRING_NUM, p.VRING_STATE.pack(1, 100), need_reply=True)
        )
        == 1
    )
    reply = await rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(77, 0))
    assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (77, 0)


async def test_unused_fds_are_closed(rig: Rig) -> None:
    r, w = os.pipe()
    try:
        await rig.send(p.MessageType.SET_OWNER, fds=[w])
        with pytest.raises(OSError):
            os.fstat(w)
        # A NOFD kick with an fd attached: the fd is closed, not kept.
        r2, w2 = os.pipe()
        os.close(r2)
        await rig.u64(p.MessageType.SET_VRING_KICK, 0 | p.VRING_NOFD_MASK, fds=[w2])
        with pytest.raises(OSError):
            os.fstat(w2)
    finally:
        os.close(r)


async def test_disabled_ring_waits_for_enable(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    chain = rig.submit(q, b"ping")
    # Started (kicked) but disabled: nothing happens until SET_VRING_ENABLE.
    ring = rig.backend.rings[1]
    rig.runner._on_kick(ring)
    assert ring.started and not ring.enabled
    assert q.poll_used() == []
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    (used,) = await rig.completions(q)
    assert used.chain is chain and used.length == 4
    assert rig.dmem.read(chain.in_[0].gpa, 4) == b"ping"


async def test_set_features_without_protocol_features_enables_rings(rig: Rig) -> None:
    await rig.setup(features=F_BASE)
    q = await rig.start_ring(1)
    rig.submit(q, b"x")
    (used,) = await rig.completions(q)
    assert used.length == 1


async def test_set_features_never_disables_rings(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    # What QEMU does around migration: features re-set (LOG_ALL toggles).
    await rig.u64(p.MessageType.SET_FEATURES, F_BASE | F_PROTO)
    rig.submit(q, b"still")
    (used,) = await rig.completions(q)
    assert used.length == 5


async def test_get_vring_base_waits_for_inflight_then_suspends() -> None:
    gate = threading.Event()

    def slow(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        gate.wait(10)
        return echo(readable, writable)

    rig = Rig(handler=slow, pool=2)
    try:
        await rig.setup()
        q = await rig.start_ring(1)
        await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
        rig.submit(q, b"abc")
        while rig.backend.rings[1].inflight == 0:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(
            rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
        )
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the request is still in flight
        gate.set()
        reply = await asyncio.wait_for(stopping, 5)
        assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (1, 1)
        assert [u.length for u in q.poll_used()] == [3]
        assert rig.backend.suspended
        # Suspended: a new request and kick must not touch guest memory.
        used_before = q.used_idx
        chain = rig.submit(q, b"zzz")
        rig.runner.process(rig.backend.rings[1])
        assert q.used_idx == used_before
        assert rig.dmem.read(chain.in_[0].gpa, 3) != b"zzz"
    finally:
        gate.set()
        await rig.close()


async def test_restart_with_base_after_stop(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    for _ in range(3):
        rig.submit(q, b"a")
    await rig.completions(q, 3)
    reply = await rig.send(p.MessageType.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
    assert reply is not None and p.VRING_STATE.unpack_from(reply.data, 12) == (1, 3)
    # Restart as QEMU does, from the returned base.
    await rig.send(p.MessageType.SET_VRING_BASE, p.VRING_STATE.pack(1, 3))
    u = rig.dmem.gpa_to_user
    await rig.send(
        p.MessageType.SET_VRING_ADDR,
        p.VRING_ADDR.pack(1, 0, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa), 0),
    )
    await rig.u64(p.MessageType.SET_VRING_KICK, 1, fds=[os.dup(q.kick_fd)])
    rig.submit(q, b"again")
    (used,) = await rig.completions(q)
    assert used.length == 5 and q.used_idx == 4


async def test_mem_table_replacement_remaps_rings(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    region = MemoryRegion(GPA_BASE, rig.dmem.size, rig.dmem.user_addr, 0)
    table = p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(
        region.guest_phys_addr, region.size, region.userspace_addr, 0
    )
    await rig.send(p.MessageType.SET_MEM_TABLE, table, [os.dup(rig.dmem.fd)])
    rig.submit(q, b"after")
    (used,) = await rig.completions(q)
    assert used.length == 5


async def test_bad_chain_is_returned_and_ring_keeps_serving(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    bad = q.add_raw([drv.RawDesc(0xDEAD_0000_0000, 64, 0, 0)])
    q.kick(force=True)
    (used,) = await rig.completions(q)
    assert used.chain is bad and used.length == 0
    rig.submit(q, b"ok")
    (used,) = await rig.completions(q)
    assert used.length == 2


async def test_config_space_with_tag() -> None:
    rig = Rig(tag="myfs")
    try:
        proto = u64_of(await rig.send(p.MessageType.GET_PROTOCOL_FEATURES))
        assert proto & p.bit(p.ProtocolFeature.CONFIG)
        req = p.encode_config(p.ConfigSpace(0, 40, 0, b"\0" * 40))
        reply = await rig.send(p.MessageType.GET_CONFIG, req)
        assert reply is not None
        space = p.decode_config(p.Message(24, 1, reply.data[12:]))
        assert space.data[:4] == b"myfs" and space.data[4:36] == b"\0" * 32
        assert int.from_bytes(space.data[36:40], "little") == 2
    finally:
        await rig.close()


# -- the rules header of vhost/backend.py, row by row ---------------------------------
async def test_enabled_state_is_kept_while_stopped(rig: Rig) -> None:
    """ "Ring states": SET_VRING_ENABLE before the ring starts takes effect once it does."""
    await rig.setup()
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    ring = rig.backend.rings[1]
    assert ring.enabled and not ring.started
    q = await rig.start_ring(1)
    rig.submit(q, b"early")
    (used,) = await rig.completions(q)
    assert used.length == 5


async def test_set_vring_kick_counts_as_a_kick(rig: Rig) -> None:
    """Chains made available before SET_VRING_KICK are served without a kick."""
    await rig.setup()
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    q = drv.SplitQueue(rig.dmem, 1, 16)
    rig.queues[1] = q
    gpa = rig.dmem.alloc(4)
    rig.dmem.write(gpa, b"kept")
    out = rig.dmem.alloc(4)
    q.add([drv.Buffer(gpa, 4)], [drv.Buffer(out, 4)])
    q.publish()  # made available, never kicked
    await rig.send(p.MessageType.SET_VRING_NUM, p.VRING_STATE.pack(1, 16))
    u = rig.dmem.gpa_to_user
    await rig.send(
        p.MessageType.SET_VRING_ADDR,
        p.VRING_ADDR.pack(1, 0, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa), 0),
    )
    await rig.u64(p.MessageType.SET_VRING_CALL, 1, fds=[os.dup(q.call_fd)])
    await rig.u64(p.MessageType.SET_VRING_KICK, 1, fds=[os.dup(q.kick_fd)])
    assert rig.backend.rings[1].started
    (used,) = await rig.completions(q)
    assert used.length == 4


async def test_reset_stops_and_disables_every_ring(rig: Rig) -> None:
    resets: list[bool] = []
    rig.backend.on_reset = lambda: resets.append(True)
    await rig.setup()
    await rig.start_ring(1)
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    await rig.send(p.MessageType.RESET_DEVICE)
    assert all(not r.started and not r.enabled for r in rig.backend.rings)
    assert rig.backend.suspended and rig.backend.features == 0 and resets == [True]


async def test_a_reply_body_replaces_the_reply_ack(rig: Rig) -> None:
    await rig.u64(p.MessageType.SET_PROTOCOL_FEATURES, REPLY_ACK)
    reply = await rig.send(p.MessageType.GET_FEATURES, need_reply=True)
    assert u64_of(reply) == offered_features()  # the body, not an ack of 0


async def test_set_vring_enable_needs_protocol_features(rig: Rig) -> None:
    await rig.setup(features=F_BASE)  # without F_PROTOCOL_FEATURES (rings enabled)
    await rig.u64(p.MessageType.SET_PROTOCOL_FEATURES, REPLY_ACK)
    reply = await rig.send(
        p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 0), need_reply=True
    )
    assert u64_of(reply) == 1
    assert rig.backend.rings[1].enabled  # still: the message was refused


async def test_set_vring_base_is_refused_while_started(rig: Rig) -> None:
    await rig.setup()
    q = await rig.start_ring(1)
    reply = await rig.send(p.MessageType.SET_VRING_BASE, p.VRING_STATE.pack(1, 9), need_reply=True)
    assert u64_of(reply) == 1
    assert rig.backend.rings[1].base == 0
    await rig.send(p.MessageType.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    rig.submit(q, b"x")
    (used,) = await rig.completions(q)  # indices untouched: the ring still serves
    assert used.length == 1


async def test_set_log_base_needs_log_shmfd(rig: Rig) -> None:
    await rig.setup()  # REPLY_ACK only
    fd = os.memfd_create("log")
    os.ftruncate(fd, 4096)
    reply = await rig.send(
        p.MessageType.SET_LOG_BASE, p.LOG_DESC.pack(4096, 0), [fd], need_reply=True
    )
    assert u64_of(reply) == 1 and rig.backend.dirty_log is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, not kept


async def test_get_config_without_a_tag_gets_an_empty_config(rig: Rig) -> None:
    req = p.encode_config(p.ConfigSpace(0, 40, 0, b"\0" * 40))
    reply = await rig.send(p.MessageType.GET_CONFIG, req)
    assert reply is not None
    _request, flags, size = p.HEADER.unpack_from(reply.data)
    assert flags & p.FLAG_REPLY and size == 0
