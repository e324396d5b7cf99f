"""Device-side split virtqueue against the test driver's rings in a real memfd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr
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


# -- indirect tables: bulk path, merging of adjacent buffers -----------------------


def _reference_walk(
    p: Pair, descs: list[tuple[int, int, int, int]]
) -> tuple[bytes, bytes, list[tuple[int, int]]] | None:
    """Per-descriptor reading of an indirect table by the spec's rules (2.7.5.3),
    written plainly: (readable bytes, writable bytes, writable ranges) or None
    if the chain is malformed."""
    readable = b""
    writable = b""
    ranges: list[tuple[int, int]] = []
    idx = 0
    for _ in range(len(descs)):
        if idx >= len(descs):
            return None
        addr, length, flags, nxt = descs[idx]
        if flags & drv.VIRTQ_DESC_F_INDIRECT:
            return None
        if length:
            off = addr - GPA_BASE
            if off < 0 or off + length > p.dmem.size:
                return None
            data = p.dmem.read(addr, length)
            if flags & drv.VIRTQ_DESC_F_WRITE:
                writable += data
                ranges.append((addr, length))
            elif writable:
                return None
            else:
                readable += data
        if not flags & drv.VIRTQ_DESC_F_NEXT:
            return readable, writable, ranges
        idx = nxt
    return None  # a loop


def _pages(ranges: list[tuple[int, int]]) -> list[int]:
    return [a for addr, n in ranges for a in range(addr, addr + n)]


def _pop_table(p: Pair, descs: list[tuple[int, int, int, int]]) -> drv.Chain:
    table = _indirect_table(p, [drv.RawDesc(*d) for d in descs])
    chain = p.dq.add_raw([drv.RawDesc(table, 16 * len(descs), drv.VIRTQ_DESC_F_INDIRECT)])
    p.dq.publish()
    return chain


def _linux_layout(
    p: Pair, n_read: int, n_write: int, adjacent: bool, size: int = 64
) -> list[tuple[int, int, int, int]]:
    """A table as Linux lays one out: in order, readable first; buffers of
    ``size`` bytes, adjacent in guest memory or with gaps."""
    step = size if adjacent else 2 * size
    base = p.dmem.alloc(step * (n_read + n_write) + 16, 16)
    descs = []
    for i in range(n_read + n_write):
        flags = drv.VIRTQ_DESC_F_WRITE if i >= n_read else 0
        if i < n_read + n_write - 1:
            flags |= drv.VIRTQ_DESC_F_NEXT
        descs.append((base + step * i, size, flags, i + 1))
    return descs


@pytest.mark.parametrize("adjacent", [True, False])
def test_linux_table_views(pair: Pair, adjacent: bool) -> None:
    pair.dmem.view[:] = bytes(range(251)) * (pair.dmem.size // 251) + bytes(pair.dmem.size % 251)
    descs = _linux_layout(pair, 2, 30, adjacent)
    expect = _reference_walk(pair, descs)
    assert expect is not None
    chain = _pop_table(pair, descs)
    got = pair.q.pop()
    assert got is not None and got.head == chain.head
    assert b"".join(bytes(v) for v in got.readable) == expect[0]
    assert b"".join(bytes(v) for v in got.writable) == expect[1]
    assert _pages(got.writable_gpas) == _pages(expect[2])
    if adjacent:  # merged: one view per direction
        assert [len(v) for v in got.readable] == [128]
        assert [len(v) for v in got.writable] == [30 * 64]
        assert got.writable_gpas == [(descs[2][0], 30 * 64)]
    else:
        assert [len(v) for v in got.writable] == [64] * 30
    got.writable[-1][-3:] = b"xyz"  # views write through to guest memory
    assert pair.dmem.read(descs[-1][0] + 61, 3) == b"xyz"


def test_header_then_adjacent_pages(pair: Pair) -> None:
    """A READ as Linux sends it: out header apart, then adjacent data pages."""
    descs = _linux_layout(pair, 2, 20, adjacent=True)
    hdr = pair.dmem.alloc(16)
    descs[2] = (hdr, 16, descs[2][2], descs[2][3])
    _pop_table(pair, descs)
    got = pair.q.pop()
    assert got is not None
    assert [len(v) for v in got.writable] == [16, 19 * 64]


@pytest.mark.parametrize(
    ("where", "change", "reason"),
    [
        (5, lambda d: (GPA_BASE + (4 << 20) - 8, d[1], d[2], d[3]), "not in guest memory"),
        (5, lambda d: (d[0], d[1], d[2], 2), "descriptor loop"),
        (5, lambda d: (d[0], d[1], d[2] | drv.VIRTQ_DESC_F_INDIRECT, d[3]), "inside an indirect"),
        (25, lambda d: (d[0], d[1], drv.VIRTQ_DESC_F_NEXT, d[3]), "readable descriptor after"),
        (31, lambda d: (d[0], d[1], d[2] | drv.VIRTQ_DESC_F_NEXT, d[3]), "out of range"),
    ],
)
def test_linux_table_errors(
    pair: Pair, where: int, change: object, reason: str, adjacent: bool = True
) -> None:
    descs = _linux_layout(pair, 2, 30, adjacent)
    descs[where] = change(descs[where])  # type: ignore[operator]
    chain = _pop_table(pair, descs)
    with pytest.raises(ChainError, match=reason) as e:
        pair.q.pop()
    assert e.value.head == chain.head


def test_adjacent_pages_wrapping_around_the_address_space(pair: Pair) -> None:
    """Equal steps that wrap past 2**64 are not adjacent buffers."""
    descs = _linux_layout(pair, 2, 30, adjacent=True)
    top = 1 << 64
    for i in range(2, 32):
        d = descs[i]
        descs[i] = ((top - 64 * 10 + 64 * (i - 2)) % top, d[1], d[2], d[3])
    _pop_table(pair, descs)
    with pytest.raises(ChainError, match="not in guest memory"):
        pair.q.pop()


def test_last_page_shorter(pair: Pair) -> None:
    descs = _linux_layout(pair, 2, 30, adjacent=True)
    descs[-1] = (descs[-1][0], 10, descs[-1][2], 0)
    _pop_table(pair, descs)
    got = pair.q.pop()
    assert got is not None
    assert [len(v) for v in got.writable] == [29 * 64 + 10]


def test_run_spanning_two_regions() -> None:
    """Adjacent buffers across a region boundary: not merged into one view."""
    p = Pair()
    try:
        second = drv.GuestMemory(1 << 20, gpa_base=GPA_BASE + p.dmem.size)
        try:
            p.mem.add(
                map_region(
                    MemoryRegion(second.gpa_base, second.size, second.user_addr + (1 << 30), 0),
                    second.fd,
                )
            )
            end = GPA_BASE + p.dmem.size
            descs = [(p.dmem.alloc(40), 40, drv.VIRTQ_DESC_F_NEXT, 1)]
            descs += [
                (end - 64 * 8 + 64 * i, 64, drv.VIRTQ_DESC_F_WRITE | drv.VIRTQ_DESC_F_NEXT, i + 2)
                for i in range(16)
            ]
            descs[-1] = (descs[-1][0], 64, drv.VIRTQ_DESC_F_WRITE, 0)
            _pop_table(p, descs)
            got = p.q.pop()
            assert got is not None
            assert b"".join(got.writable) == p.dmem.read(end - 512, 512) + second.read(end, 512)
            assert _pages(got.writable_gpas) == list(range(end - 512, end + 512))
        finally:
            p.mem.clear()
            second.close()
    finally:
        p.close()


@settings(max_examples=150, deadline=None)
@given(
    n_read=st.integers(0, 4),
    n_write=st.integers(0, 40),
    adjacent=st.booleans(),
    mutations=st.lists(
        st.tuples(st.integers(0, 43), st.integers(0, 3), st.integers(0, 0xFFFF)), max_size=3
    ),
)
def test_indirect_tables_match_reference(
    n_read: int, n_write: int, adjacent: bool, mutations: list[tuple[int, int, int]]
) -> None:
    """Any table (Linux-like, then mutated): same bytes and ranges as the plain
    per-descriptor reading, and an error exactly when that reading finds one."""
    if n_read + n_write == 0:
        return
    p = Pair()
    try:
        p.dmem.view[:] = bytes(range(256)) * (p.dmem.size // 256)
        descs = _linux_layout(p, n_read, n_write, adjacent)
        for i, field, value in mutations:
            if i < len(descs):
                d = list(descs[i])
                if field == 0:
                    d[0] = d[0] + value - 0x8000  # move the buffer
                elif field == 1:
                    d[1] = value & 0xFF  # resize, maybe to 0
                elif field == 2:
                    d[2] = value & 7
                else:
                    d[3] = value % (len(descs) + 2)
                descs[i] = (d[0], d[1], d[2], d[3])
        _pop_table(p, descs)
        expect = _reference_walk(p, descs)  # after: a buffer may overlap the table
        if expect is None:
            with pytest.raises(ChainError):
                p.q.pop()
            return
        got = p.q.pop()
        assert got is not None
        assert b"".join(bytes(v) for v in got.readable) == expect[0]
        assert b"".join(bytes(v) for v in got.writable) == expect[1]
        assert _pages(got.writable_gpas) == _pages(expect[2])
    finally:
        p.close()
