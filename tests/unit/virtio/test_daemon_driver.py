"""The test driver itself: allocator, ring layout, and a cross-check with the device side.

The daemon tests trust :mod:`virtiofsd_py.testing.frontend.driver`; these check it
without a daemon, against the spec and against the device-side split queue
in :mod:`virtiofsd_py.virtio.virtqueue` (two implementations of 2.7 that
must agree).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofsd_py.testing.frontend.driver import (
    Buffer,
    GuestMemory,
    RingError,
    SplitQueue,
    Timeout,
    vring_need_event,
)
from virtiofsd_py.virtio import virtqueue
from virtiofsd_py.virtio.memory import GuestMemory as DeviceMemory
from virtiofsd_py.virtio.memory import map_region
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 70000), st.sampled_from([1, 16, 4096])),
        max_size=60,
    )
)
def test_allocator_never_overlaps_and_coalesces(ops: list[tuple[bool, int, int]]) -> None:
    with GuestMemory(1 << 20, gpa_base=0x1000_0000) as mem:
        live: dict[int, int] = {}
        for free, size, align in ops:
            if free and live:
                gpa = sorted(live)[size % len(live)]
                mem.free(gpa)
                del live[gpa]
                continue
            try:
                gpa = mem.alloc(size, align)
            except MemoryError:
                continue
            assert gpa % align == 0
            assert mem.gpa_base + 4096 <= gpa and gpa + size <= mem.gpa_end
            for other, osize in live.items():
                assert gpa + size <= other or other + osize <= gpa
            live[gpa] = size
        for gpa in live:
            mem.free(gpa)
        assert mem.bytes_allocated == 0
        # everything coalesced back into one block (all but the reserved page 0)
        assert mem.alloc(mem.size - 4096, 4096) == mem.gpa_base + 4096


def test_address_translation_bounds() -> None:
    with GuestMemory(64 << 10, gpa_base=0x10000, user_addr=0x7F00_0000_0000, fd_offset=8192) as m:
        m.write(0x10000 + 100, b"abc")
        assert m.read(0x10000 + 100, 3) == b"abc"
        assert m.gpa_to_user(0x10000 + 100) == 0x7F00_0000_0000 + 100
        # the bytes sit after fd_offset in the memfd
        assert m.mmap[8192 + 100 : 8192 + 103] == b"abc"
        for gpa, n in [(0xFFFF, 1), (0x10000 + (64 << 10) - 2, 3), (0x10000 + (64 << 10), 0)]:
            with pytest.raises(ValueError):
                m.read(gpa, n) if n else m.offset(gpa, 1)


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (5, 6, 5, True),
        (5, 5, 4, False),
        (3, 10, 2, True),
        (10, 10, 2, False),
        (0xFFFF, 0, 0xFFFF, True),
        (0xFFFE, 1, 0xFFFF, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    """virtio 2.7.10: notify when the index moved past ``event`` (mod 2^16)."""
    assert vring_need_event(event, new, old) is expected


@pytest.fixture
def pair() -> Iterator[tuple[SplitQueue, virtqueue.SplitQueue]]:
    """A driver queue and the daemon's device-side view of the same rings."""
    mem = GuestMemory(1 << 20, gpa_base=0x4000_0000, user_addr=0x7F12_0000_0000, fd_offset=4096)
    q = SplitQueue(mem, 1, 8, event_idx=True, indirect=True)
    dev_mem = DeviceMemory()
    dev_mem.add(map_region(MemoryRegion(mem.gpa_base, mem.size, mem.user_addr, 4096), mem.fd))
    addr = VringAddr(
        1,
        0,
        mem.gpa_to_user(q.desc_gpa),
        mem.gpa_to_user(q.used_gpa),
        mem.gpa_to_user(q.avail_gpa),
        0,
    )
    dev = virtqueue.SplitQueue(dev_mem, 8, addr, event_idx=True, base=0)
    yield q, dev
    dev_mem.clear()
    q.close()
    mem.close()


@pytest.mark.parametrize("indirect", [True, False])
def test_chains_as_the_device_sees_them(
    pair: tuple[SplitQueue, virtqueue.SplitQueue], indirect: bool
) -> None:
    q, dev = pair
    mem = q.mem
    out = [Buffer(mem.alloc(n), n) for n in (40, 3, 4096)]
    for i, b in enumerate(out):
        mem.write(b.gpa, bytes([i + 1]) * b.length)
    in_ = [Buffer(mem.alloc(n), n) for n in (16, 100)]
    chain = q.add(out, in_, indirect=indirect, token="t")
    assert q.kick() is True  # avail_event 0 asks for the first kick
    got = dev.pop()
    assert got is not None and got.head == chain.head
    assert [bytes(v) for v in got.readable] == [
        bytes([i + 1]) * b.length for i, b in enumerate(out)
    ]
    assert [len(v) for v in got.writable] == [16, 100]
    got.writable[0][:] = b"R" * 16
    dev.add_used(got.head, 16)
    assert dev.publish(0) is True  # used_event 0: the driver wants this one
    (used,) = q.poll_used()
    assert (used.chain.token, used.length) == ("t", 16)
    assert mem.read(in_[0].gpa, 16) == b"R" * 16
    assert q.num_free == 8
    assert q.in_flight == {}


def test_used_element_checks(pair: tuple[SplitQueue, virtqueue.SplitQueue]) -> None:
    q, dev = pair
    b = Buffer(q.mem.alloc(64), 64)
    q.add([b], [Buffer(q.mem.alloc(16), 16)])
    q.kick()
    got = dev.pop()
    assert got is not None
    dev.add_used(got.head, 17)  # more than the chain's 16 writable bytes
    dev.publish(0)
    with pytest.raises(RingError, match="exceeds"):
        q.poll_used()


def test_used_id_not_in_flight(pair: tuple[SplitQueue, virtqueue.SplitQueue]) -> None:
    q, dev = pair
    q.add([Buffer(q.mem.alloc(64), 64)], [])
    q.kick()
    assert dev.pop() is not None
    dev.add_used(7, 0)  # a descriptor that heads no chain
    dev.publish(0)
    with pytest.raises(RingError, match="not a chain in flight"):
        q.poll_used()


def test_wait_used_times_out_without_completion(
    pair: tuple[SplitQueue, virtqueue.SplitQueue],
) -> None:
    q, _dev = pair
    q.add([Buffer(q.mem.alloc(64), 64)], [])
    q.kick()
    with pytest.raises(Timeout):
        q.wait_used(0.05)
