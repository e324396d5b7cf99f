"""The compiled walker (virtio/_cworker.pyx ``Walker``) against ``SplitQueue``, on random rings.

Random descriptor tables (valid chains, buffers out of bounds or across the
boundary of two adjacent regions, loops, indirect tables nested, too long
or of a bad length, readable after writable, avail indices too far ahead,
heads out of range, Linux-style ordered indirect tables for the bulk path)
are popped by both walkers; each pop must give the same head, the same
bytes readable and writable, the same guest ranges to log, or the same
error.  The used-ring side (EVENT_IDX and NO_INTERRUPT decisions) is
compared the same way.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.virtio import workers
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr
from virtiofsd_py.virtio.virtqueue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    ChainError,
    QueueError,
    SplitQueue,
)

if workers.CompiledQueueWorker is None:
    pytest.skip("the compiled core is not built", allow_module_level=True)

from virtiofsd_py.virtio._cworker import Walker

GPA = 0x10_0000
HALF = 1 << 20  # two adjacent regions of 1 MiB: buffers may span them
SIZE = 16
TABLES = GPA + 0x8_0000  # indirect tables live here (inside region 0)
END = GPA + 2 * HALF


class Rings:
    def __init__(self) -> None:
        self.dmem = drv.GuestMemory(2 * HALF, gpa_base=GPA)
        self.dmem.write(GPA, os.urandom(2 * HALF))
        self.mem = GuestMemory()
        for i in range(2):
            region = MemoryRegion(GPA + i * HALF, HALF, self.dmem.user_addr + i * HALF, i * HALF)
            self.mem.add(map_region(region, self.dmem.fd))
        self.desc = GPA + 0x1000
        self.avail = GPA + 0x2000
        self.used = GPA + 0x3000
        u = self.dmem.gpa_to_user
        self.addr = VringAddr(1, 0, u(self.desc), u(self.used), u(self.avail), 0)

    def queue(self, base: int, event_idx: bool = True) -> SplitQueue:
        return SplitQueue(self.mem, SIZE, self.addr, event_idx=event_idx, base=base)

    def close(self) -> None:
        self.mem.clear()
        self.dmem.close()


@pytest.fixture(scope="module")
def rings() -> Iterator[Rings]:
    r = Rings()
    yield r
    r.close()


ADDRS = st.one_of(
    st.integers(GPA + 0x10_0000 - 0x4_0000, END - 0x1_0000),  # well inside (mostly valid)
    st.integers(GPA + 0x10_0000 - 0x4_0000, END - 0x1_0000),
    st.integers(GPA + 0x10_0000 - 0x4_0000, END - 0x1_0000),
    st.integers(GPA, END - 1),
    st.integers(GPA + HALF - 64, GPA + HALF + 64),  # around the region boundary
    st.integers(END - 64, END + 64),  # around the end of memory
    st.integers(0, GPA),  # below memory
    st.sampled_from([0, (1 << 64) - 1, (1 << 64) - 16, 1 << 63]),
)
LENS = st.one_of(
    st.integers(0, 64),
    st.integers(0, 4096),
    st.sampled_from([0, 16, 32, 0xFFFF_FFFF, HALF, 2 * HALF]),
)
FLAGS = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 7))
DESCS = st.tuples(ADDRS, LENS, FLAGS, st.integers(0, SIZE + 2))


@st.composite
def indirect_table(draw: st.DrawFn) -> tuple[int, bytes]:
    """An indirect table: random descriptors, or Linux's layout (in order,
    readable first), long enough for the bulk path."""
    if draw(st.booleans()):
        n = draw(st.integers(1, 40))
        k = draw(st.integers(0, n))
        adjacent = draw(st.booleans())
        size = draw(st.sampled_from([16, 512, 4096]))
        start = draw(st.integers(GPA + 0x10_0000 - 4096 * 41, END - 4096 * 41))
        raw = b""
        for i in range(n):
            addr = start + i * size if adjacent else start + draw(st.integers(0, 40)) * 4096
            flags = (VIRTQ_DESC_F_WRITE if i >= k else 0) | (VIRTQ_DESC_F_NEXT if i < n - 1 else 0)
            raw += DESC.pack(addr, size, flags, i + 1 if i < n - 1 else 0)
        if draw(st.booleans()):  # one descriptor spoiled
            i = draw(st.integers(0, n - 1))
            raw = raw[: 16 * i] + DESC.pack(*draw(DESCS)) + raw[16 * (i + 1) :]
        return n, raw
    descs = draw(st.lists(DESCS, min_size=1, max_size=12))
    return len(descs), b"".join(DESC.pack(*d) for d in descs)


@st.composite
def ring_content(draw: st.DrawFn) -> dict[str, Any]:
    table = [list(draw(DESCS)) for _ in range(SIZE)]
    heads = draw(
        st.lists(
            st.one_of(*[st.integers(0, SIZE - 1)] * 9, st.integers(0, 0xFFFF)),
            max_size=8,
        )
    )
    tables = draw(st.lists(indirect_table(), max_size=3))
    at = TABLES
    placed = []
    for _, raw in tables:
        placed.append((at, len(raw)))
        at += (len(raw) + 15) // 16 * 16
    # Point some descriptors at the indirect tables (with a length right or not).
    for gpa, length in placed:
        slot = draw(st.integers(0, SIZE - 1))
        flags = VIRTQ_DESC_F_INDIRECT | draw(st.sampled_from([0] * 6 + [VIRTQ_DESC_F_NEXT]))
        length = draw(st.sampled_from([length] * 6 + [8, 0, length + 16]))
        table[slot] = [gpa, length, flags, 0]
        if draw(st.booleans()):
            heads.append(slot)
    for _ in range(draw(st.integers(0, 3))):  # a well-formed direct chain
        slots = draw(st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=6, unique=True))
        k = draw(st.integers(0, len(slots)))
        for j, slot in enumerate(slots):
            last = j == len(slots) - 1
            flags = (VIRTQ_DESC_F_WRITE if j >= k else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            addr = draw(st.integers(GPA + HALF - 0x2000, GPA + HALF + 0x1000))
            table[slot] = [addr, draw(st.integers(1, 4096)), flags, 0 if last else slots[j + 1]]
        heads.append(slots[0])
    base = draw(st.integers(0, 0xFFFF))
    jump = draw(st.sampled_from([None] * 8 + [SIZE + 1, 0x8000]))
    return {
        "table": table,
        "tables": tables,
        "placed": placed,
        "heads": heads,
        "base": base,
        "jump": jump,
    }


def write_ring(r: Rings, c: dict[str, Any]) -> None:
    for i, d in enumerate(c["table"]):
        r.dmem.write(r.desc + 16 * i, DESC.pack(*d))
    for (gpa, _), (_, raw) in zip(c["placed"], c["tables"], strict=True):
        r.dmem.write(gpa, raw)
    base = c["base"]
    for i, h in enumerate(c["heads"]):
        r.dmem.write(r.avail + 4 + 2 * ((base + i) % SIZE), struct.pack("<H", h))
    idx = base + len(c["heads"]) if c["jump"] is None else base + c["jump"]
    r.dmem.write(r.avail + 2, struct.pack("<H", idx & 0xFFFF))


def outcome(pop: Any) -> Any:
    try:
        chain: Chain | None = pop()
    except ChainError as e:
        return ("chain error", e.head, e.reason)
    except QueueError as e:
        return ("queue error", str(e))
    if chain is None:
        return None
    return (
        chain.head,
        b"".join(bytes(v) for v in chain.readable),
        b"".join(bytes(v) for v in chain.writable),
        merged(chain.writable_gpas),
    )


def merged(gpas: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Guest ranges as maximal runs (the bulk path merges adjacent buffers)."""
    out: list[list[int]] = []
    for a, n in gpas:
        if out and out[-1][1] == a:
            out[-1][1] = a + n
        else:
            out.append([a, a + n])
    return [(a, b) for a, b in out]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(c=ring_content())
def test_same_chains_and_errors(rings: Rings, c: dict[str, Any]) -> None:
    write_ring(rings, c)
    pure = rings.queue(c["base"])
    compiled = Walker(rings.queue(c["base"]))
    for _ in range(len(c["heads"]) + 2):
        a, b = outcome(pure.pop), outcome(compiled.pop)
        assert a == b
        assert pure.last_avail_idx == compiled.last_avail_idx
        if a is not None and a[0] == "queue error":
            break


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.integers(0, 0xFFFF),
    added=st.integers(0, SIZE),
    used_event=st.integers(0, 0xFFFF),
    flags=st.integers(0, 1),
    event_idx=st.booleans(),
)
def test_same_used_ring_and_notifications(
    rings: Rings, base: int, added: int, used_event: int, flags: int, event_idx: bool
) -> None:
    rings.dmem.write(rings.avail, struct.pack("<H", flags))
    rings.dmem.write(rings.avail + 4 + 2 * SIZE, struct.pack("<H", used_event))
    results = []
    for make in (lambda q: q, Walker):
        q = rings.queue(base, event_idx)
        w = make(q)
        for i in range(added):
            w.add_used(i, 100 + i)
        results.append((w.publish(base), w.enable_notification(), used_ring(rings)))
    assert results[0] == results[1]


def used_ring(r: Rings) -> bytes:
    return r.dmem.read(r.used, 4 + 8 * SIZE + 2)
