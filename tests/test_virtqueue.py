"""Device-side split virtqueue against the test driver's rings in a real memfd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofsd_py.testing import driver as drv
from virtiofsd_py.vhost.protocol import MemoryRegion, VringAddr
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.virtqueue import ChainError, QueueError, SplitQueue

GPA_BASE = 0x10_0000
SIZE = 8


class Pair:
    """A driver queue and the device queue over the same memory."""

    def __init__(self, *, event_idx: bool = True, size: int = SIZE) -> None:
        self.dmem = drv.GuestMemory(4 << 20, gpa_base=GPA_BASE)
        self.dq = drv.SplitQueue(self.dmem, 1, size, event_idx=event_idx)
        self.mem = GuestMemory()
        region = MemoryRegion(GPA_BASE, self.dmem.size, self.dmem.user_addr, 0)
        self.mem.add(map_region(region, self.dmem.fd))
        addr = VringAddr(
            1,
            0,
            self.dmem.gpa_to_user(self.dq.desc_gpa),
            self.dmem.gpa_to_user(self.dq.used_gpa),
            self.dmem.gpa_to_user(self.dq.avail_gpa),
            0,
        )
        self.q = SplitQueue(self.mem, size, addr, event_idx=event_idx, base=0)

    def buf(self, data: bytes = b"", length: int | None = None) -> drv.Buffer:
        n = len(data) if length is None else length
        gpa = self.dmem.alloc(max(n, 1))
        if data:
            self.dmem.write(gpa, data)
        return drv.Buffer(gpa, n)

    def close(self) -> None:
        self.mem.clear()
        self.dq.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_views_and_used(pair: Pair, indirect: bool) -> None:
    out = [pair.buf(b"hello "), pair.buf(b"world")]
    inn = [pair.buf(length=5), pair.buf(length=7)]
    chain = pair.dq.add(out, inn, indirect=indirect)
    pair.dq.publish()
    got = pair.q.pop()
    assert got is not None and got.head == chain.head
    assert b"".join(bytes(v) for v in got.readable) == b"hello world"
    assert [len(v) for v in got.writable] == [5, 7]
    assert got.writable_gpas == [(inn[0].gpa, 5), (inn[1].gpa, 7)]
    got.writable[1][:3] = b"abc"
    assert pair.q.pop() is None
    old = pair.q.used_idx
    pair.q.add_used(got.head, 8)
    pair.q.publish(old)
    used = pair.dq.poll_used()
    assert [(u.chain.head, u.length) for u in used] == [(chain.head, 8)]
    assert pair.dmem.read(inn[1].gpa, 3) == b"abc"


def test_descriptor_outside_memory(pair: Pair) -> None:
    c = pair.dq.add_raw([drv.RawDesc(GPA_BASE + pair.dmem.size - 4, 16, 0, 0)])
    pair.dq.publish()
    with pytest.raises(ChainError) as e:
        pair.q.pop()
    assert e.value.head == c.head and "not in guest memory" in e.value.reason


def test_descriptor_loop(pair: Pair) -> None:
    b = pair.buf(b"x" * 8)
    ids = pair.dq.reserve(2)
    pair.dq.add_raw(
        [
            drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_NEXT, ids[1]),
            drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_NEXT, ids[0]),
        ],
        ids=ids,
    )
    pair.dq.publish()
    with pytest.raises(ChainError, match="loop"):
        pair.q.pop()


def test_next_out_of_range(pair: Pair) -> None:
    b = pair.buf(b"x" * 8)
    pair.dq.add_raw([drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_NEXT, SIZE + 3)])
    pair.dq.publish()
    with pytest.raises(ChainError, match="out of range"):
        pair.q.pop()


def test_readable_after_writable(pair: Pair) -> None:
    b = pair.buf(b"x" * 8)
    ids = pair.dq.reserve(2)
    pair.dq.add_raw(
        [
            drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_WRITE | drv.VIRTQ_DESC_F_NEXT, ids[1]),
            drv.RawDesc(b.gpa, 8, 0, 0),
        ],
        ids=ids,
    )
    pair.dq.publish()
    with pytest.raises(ChainError, match="readable descriptor after"):
        pair.q.pop()


def _indirect_table(pair: Pair, descs: list[drv.RawDesc]) -> int:
    table = pair.dmem.alloc(16 * len(descs))
    for i, d in enumerate(descs):
        pair.dmem.write(table + 16 * i, drv.DESC.pack(d.addr, d.length, d.flags, d.next))
    return table


def test_nested_indirect(pair: Pair) -> None:
    b = pair.buf(b"x" * 8)
    inner = _indirect_table(pair, [drv.RawDesc(b.gpa, 8)])
    outer = _indirect_table(pair, [drv.RawDesc(inner, 16, drv.VIRTQ_DESC_F_INDIRECT)])
    pair.dq.add_raw([drv.RawDesc(outer, 16, drv.VIRTQ_DESC_F_INDIRECT)])
    pair.dq.publish()
    with pytest.raises(ChainError, match="inside an indirect"):
        pair.q.pop()


@pytest.mark.parametrize(
    ("length", "flags", "match"),
    [
        (0, drv.VIRTQ_DESC_F_INDIRECT, "table length"),
        (17, drv.VIRTQ_DESC_F_INDIRECT, "table length"),
        (16, drv.VIRTQ_DESC_F_INDIRECT | drv.VIRTQ_DESC_F_NEXT, "NEXT"),
    ],
)
def test_bad_indirect_descriptor(pair: Pair, length: int, flags: int, match: str) -> None:
    b = pair.buf(b"x" * 8)
    table = _indirect_table(pair, [drv.RawDesc(b.gpa, 8), drv.RawDesc(b.gpa, 8)])
    pair.dq.add_raw([drv.RawDesc(table, length, flags, 0)])
    pair.dq.publish()
    with pytest.raises(ChainError, match=match):
        pair.q.pop()


def test_indirect_loop(pair: Pair) -> None:
    b = pair.buf(b"x" * 8)
    table = _indirect_table(
        pair,
        [
            drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_NEXT, 1),
            drv.RawDesc(b.gpa, 8, drv.VIRTQ_DESC_F_NEXT, 0),
        ],
    )
    pair.dq.add_raw([drv.RawDesc(table, 32, drv.VIRTQ_DESC_F_INDIRECT)])
    pair.dq.publish()
    with pytest.raises(ChainError, match="loop"):
        pair.q.pop()


def test_avail_index_jump_breaks_ring(pair: Pair) -> None:
    pair.dq._set_u16(pair.dq.avail_gpa + 2, SIZE + 1)
    with pytest.raises(QueueError, match="ahead"):
        pair.q.pop()


def test_head_out_of_range_breaks_ring(pair: Pair) -> None:
    pair.dq._set_u16(pair.dq.avail_gpa + 4, SIZE)
    pair.dq._set_u16(pair.dq.avail_gpa + 2, 1)
    with pytest.raises(QueueError, match="names descriptor"):
        pair.q.pop()


def test_ring_outside_memory_rejected() -> None:
    mem = GuestMemory()
    with pytest.raises(QueueError):
        SplitQueue(mem, 8, VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0), event_idx=True, base=0)


def test_event_idx_notification_suppression(pair: Pair) -> None:
    # The driver asks to be notified only once used idx passes 2.
    pair.dq.set_used_event(2)
    for _ in range(4):
        pair.dq.add([pair.buf(b"r")], [pair.buf(length=4)])
    pair.dq.publish()
    notes = []
    for _ in range(4):
        c = pair.q.pop()
        assert c is not None
        old = pair.q.used_idx
        pair.q.add_used(c.head, 0)
        notes.append(pair.q.publish(old))
    assert notes == [False, False, True, False]


def test_no_interrupt_flag_without_event_idx() -> None:
    p = Pair(event_idx=False)
    try:
        p.dq.set_avail_flags(drv.VIRTQ_AVAIL_F_NO_INTERRUPT)
        p.dq.add([p.buf(b"r")], [p.buf(length=4)])
        p.dq.publish()
        c = p.q.pop()
        assert c is not None
        p.q.add_used(c.head, 0)
        assert p.q.publish(0) is False
        p.dq.set_avail_flags(0)
        assert p.q.publish(0) is True
    finally:
        p.close()


def test_enable_notification_sets_avail_event(pair: Pair) -> None:
    pair.dq.add([pair.buf(b"r")], [pair.buf(length=4)])
    pair.dq.publish()
    assert pair.q.pop() is not None
    assert pair.q.enable_notification() is False
    assert pair.dq.avail_event == 1
    pair.dq.add([pair.buf(b"r")], [pair.buf(length=4)])
    pair.dq.publish()
    assert pair.q.enable_notification() is True


def test_index_wraparound() -> None:
    p = Pair(size=4)
    try:
        start = 0xFFFE
        p.q.last_avail_idx = p.q.used_idx = start
        p.dq.avail_idx = p.dq.kicked_idx = p.dq.last_used = start
        p.dq._set_u16(p.dq.used_gpa + 2, start)
        for _ in range(4):
            p.dq.add([p.buf(b"r")], [p.buf(length=4)])
            p.dq.publish()
            c = p.q.pop()
            assert c is not None
            old = p.q.used_idx
            p.q.add_used(c.head, 4)
            p.q.publish(old)
            assert len(p.dq.poll_used()) == 1
        assert p.q.last_avail_idx == 2
    finally:
        p.close()


@settings(max_examples=300, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.integers(0, 1 << 64 - 1),
            st.integers(0, 1 << 32 - 1),
            st.integers(0, 7),
            st.integers(0, 0xFFFF),
        ),
        min_size=1,
        max_size=SIZE,
    ),
    head=st.integers(0, SIZE - 1),
)
def test_random_descriptor_tables_never_crash(
    descs: list[tuple[int, int, int, int]], head: int
) -> None:
    p = Pair()
    try:
        for i, d in enumerate(descs):
            p.dmem.write(p.dq.desc_gpa + 16 * i, drv.DESC.pack(*d))
        p.dq._set_u16(p.dq.avail_gpa + 4, head)
        p.dq._set_u16(p.dq.avail_gpa + 2, 1)
        try:
            chain = p.q.pop()
        except ChainError as e:
            assert e.head == head
        else:
            assert chain is not None
            for v in chain.readable + chain.writable:
                assert len(v) <= p.dmem.size
    finally:
        p.close()
