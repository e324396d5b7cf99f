"""Device side of a split virtqueue (virtio 1.2, section 2.7).

``SplitQueue`` pops descriptor chains the driver made available, validates
them and turns them into lists of guest-memory views (readable first, then
writable), and publishes used entries.  It does no I/O of its own: the owner
decides when to read the kick eventfd and whether to write the call eventfd
(``publish`` says whether the driver wants a notification).

Every descriptor address goes through ``GuestMemory.gpa_iov``; a chain that
points outside guest memory, loops, nests indirect tables or puts a readable
descriptor after a writable one raises ``ChainError`` naming its head, so the
caller can return it to the driver with length 0 and log the reason.
"""

from __future__ import annotations

import functools
import operator
import struct
import sys
import threading
from collections.abc import Callable
from typing import Final

from virtiofsd_py.virtio.memory import GuestMemory, GuestMemoryError
from virtiofsd_py.virtio.types import VringAddr

DESC = struct.Struct("<QIHH")  # addr, len, flags, next (2.7.5)
U16 = struct.Struct("<H")  # ring fields nobody writes concurrently (avail ring entries)
USED_ELEM = struct.Struct("<II")
_U32 = struct.Struct("<I")  # id, len (2.7.8)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_fence = threading.Lock()


def full_barrier() -> None:
    """A store-load fence: a locked read-modify-write, as taking a lock does.

    Needed where the device publishes an index and then reads the driver's
    event index (2.7.7.2, 2.7.10): x86 may otherwise satisfy the load before
    the store is visible, and a notification would be lost.
    """
    _fence.acquire()
    _fence.release()


if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 only
    raise ImportError("virtiofsd_py's rings assume a little-endian host (virtio 1.x is LE)")


def index_view(area: memoryview) -> memoryview:
    """``area`` as native u16 items, for the fields the other side reads or writes concurrently.

    The avail/used indices, flags and event fields are shared with the driver
    while both run.  ``struct.pack_into`` zeroes its target before storing
    the value, and ``unpack_from`` of a standard-size format reads byte by
    byte: a concurrent driver could see ``used->idx`` read 0 (Linux then
    finds "id is not a head", marks the virtqueue broken and fails every
    later request with EIO), and we could read a torn avail index.  Item
    access on a native ``H`` memoryview is one aligned 16-bit load or store
    (2.7: these fields are naturally aligned).
    """
    return area.cast("B").cast("H")


class QueueError(Exception):
    """The ring as a whole is unusable (e.g. the avail index jumped too far)."""


class ChainError(Exception):
    """One descriptor chain is malformed; ``head`` can be returned unused."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason


class Chain:
    """One request: device-readable views, then device-writable ones."""

    __slots__ = ("head", "readable", "writable", "writable_gpas")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        writable_gpas: list[tuple[int, int]],
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        #: (guest-physical address, length) of each writable descriptor, for
        #: dirty-page logging during migration.
        self.writable_gpas = writable_gpas


def valid_queue_size(num: int) -> bool:
    """Split queue sizes are powers of two up to 32768 (2.7)."""
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


class SplitQueue:
    """The three areas of one split virtqueue, mapped in guest memory."""

    __slots__ = (
        "_avail",
        "_avail16",
        "_desc",
        "_memory",
        "_used",
        "_used16",
        "event_idx",
        "last_avail_idx",
        "on_used_write",
        "size",
        "used_idx",
    )

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        addr: VringAddr,
        *,
        event_idx: bool,
        base: int,
    ) -> None:
        if not valid_queue_size(size):
            raise QueueError(f"invalid queue size {size}")
        self._memory = memory
        self.size = size
        self.event_idx = event_idx
        try:
            self._desc = memory.uva(addr.desc_user_addr, 16 * size)
            self._avail = memory.uva(addr.avail_user_addr, 6 + 2 * size)
            self._used = memory.uva(addr.used_user_addr, 6 + 8 * size)
        except GuestMemoryError as e:
            raise QueueError(f"ring not in guest memory: {e}") from e
        if addr.avail_user_addr % 2 or addr.used_user_addr % 4:
            raise QueueError("avail ring not 2-aligned or used ring not 4-aligned (2.7)")
        self._avail16 = index_view(self._avail)  # [0] flags, [1] idx, [2+size] used_event
        self._used16 = index_view(self._used)  # [0] flags, [1] idx, [2+4*size] avail_event
        self.last_avail_idx = base & 0xFFFF
        self.used_idx = base & 0xFFFF
        #: Called with (offset in used ring, length) after each used-ring write
        #: (dirty logging hook; None when not logging).
        self.on_used_write: Callable[[int, int], None] | None = None

    def areas(self) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table, avail ring and used ring (for the compiled walker)."""
        return self._desc, self._avail, self._used

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    # -- driver -> device --------------------------------------------------
    def avail_idx(self) -> int:
        idx: int = self._avail16[1]
        return idx

    def pop(self) -> Chain | None:
        """Next available chain, or None.  Raises ChainError / QueueError."""
        avail: int = self._avail16[1]
        last = self.last_avail_idx
        if avail == last:
            return None
        if (avail - last) & 0xFFFF > self.size:
            raise QueueError(f"avail index {avail} is more than {self.size} ahead of {last}")
        slot = last % self.size
        head: int = U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= self.size:
            raise QueueError(f"avail ring slot {slot} names descriptor {head} >= {self.size}")
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        """Follow the chain at ``head``, one descriptor at a time (the bulk
        path ``_linux_table`` aside); every rule checked as it is met."""
        memory = self._memory
        regions = memory.regions
        unpack = DESC.unpack_from
        table = self._desc
        limit = self.size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[tuple[int, int]] = []
        idx = head
        seen = 0
        indirect = False
        while True:
            if idx >= limit:
                raise ChainError(head, f"next index {idx} out of range {limit}")
            seen += 1
            if seen > limit:
                raise ChainError(head, "descriptor loop")
            addr, length, flags, nxt = unpack(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError(head, "indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set")
                if length == 0 or length % 16:
                    raise ChainError(head, f"indirect table length {length}")
                try:
                    table = memory.gpa(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(head, str(e)) from e
                limit = length >> 4
                if limit > MAX_QUEUE_SIZE:
                    raise ChainError(head, f"indirect table of {limit} entries")
                # A long table as Linux lays it out: checked and translated in
                # bulk (one copy, so that checks and use see the same bytes).
                if (
                    length >= _BULK_MIN
                    and not readable
                    and not writable
                    and _linux_table(memory, table.tobytes(), readable, writable, gpas)
                ):
                    return Chain(head, readable, writable, gpas)
                indirect = True
                idx = 0
                seen = 0
                continue
            if length:
                if flags & VIRTQ_DESC_F_WRITE:
                    out = writable
                    gpas.append((addr, length))
                elif writable:
                    raise ChainError(head, "readable descriptor after a writable one")
                else:
                    out = readable
                # Inline fast path of GuestMemory.gpa_iov: the buffer in one region.
                for r in regions:
                    off = addr - r.gpa
                    if off >= 0 and off + length <= r.size:
                        out.append(r.view[off : off + length])
                        break
                else:
                    try:
                        out += memory.gpa_iov(addr, length)
                    except GuestMemoryError as e:
                        raise ChainError(head, str(e)) from e
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, gpas)
            idx = nxt

    # -- device -> driver --------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Write one used element; not visible to the driver until ``publish``."""
        off = 4 + 8 * (self.used_idx % self.size)
        USED_ELEM.pack_into(self._used, off, head, length)
        if self.on_used_write is not None:
            self.on_used_write(off, 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self, old_used_idx: int) -> bool:
        """Make used elements since ``old_used_idx`` visible; True if the driver
        wants a notification for them (2.7.7.2 / 2.7.10)."""
        new = self.used_idx
        self._used16[1] = new
        if self.on_used_write is not None:
            self.on_used_write(2, 2)
        if new == old_used_idx:
            return False
        full_barrier()
        if self.event_idx:
            used_event: int = self._avail16[2 + self.size]
            return (new - used_event - 1) & 0xFFFF < (new - old_used_idx) & 0xFFFF
        flags: int = self._avail16[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask for a kick on the next available buffer; True if one is
        already there (so the caller must keep processing)."""
        if self.event_idx:
            off = 4 + 8 * self.size
            self._used16[2 + 4 * self.size] = self.last_avail_idx
            if self.on_used_write is not None:
                self.on_used_write(off, 2)
            full_barrier()
        avail: int = self._avail16[1]
        return avail != self.last_avail_idx


def _flag_class(flags: int) -> int:
    if flags & VIRTQ_DESC_F_INDIRECT:
        return ord("x")
    c = "w" if flags & VIRTQ_DESC_F_WRITE else "r"
    return ord(c if flags & VIRTQ_DESC_F_NEXT else c.upper())


#: Low byte of a descriptor's flags -> r/w (readable/writable, NEXT set),
#: R/W (the same, last of the chain), x (INDIRECT: not allowed here).
_FLAG_CLASS: Final = bytes(_flag_class(b) for b in range(256))
_LAST_TO_NEXT: Final = bytes.maketrans(b"RW", b"rw")
#: Bytes 14 and 15 of descriptors 0..n-2 of a table chained in order (next = i + 1).
_SEQ_NEXT_LO: Final = bytes((i + 1) & 0xFF for i in range(MAX_QUEUE_SIZE))
_SEQ_NEXT_HI: Final = bytes((i + 1) >> 8 & 0xFF for i in range(MAX_QUEUE_SIZE))
#: Indirect tables of fewer bytes (descriptors * 16) are walked one by one:
#: below it the bulk checks cost more than they save (docs/benchmarks.md).
_BULK_MIN: Final = 16 * 16
#: Up to this many breaks between adjacent buffers, views are made per run.
_MAX_RUNS: Final = 8


def _linux_table(
    memory: GuestMemory,
    raw: bytes,
    readable: list[memoryview],
    writable: list[memoryview],
    gpas: list[tuple[int, int]],
) -> bool:
    """The indirect table as Linux builds it, checked and translated in bulk.

    Linux chains an indirect table in order (``next = i + 1``), readable
    descriptors first, no empty ones.  Whether ``raw`` is such a table is
    decided with whole-table byte operations (``translate``, strided slices,
    list comparisons), so no Python code runs per descriptor except one
    slice per buffer, and none at all when a direction's buffers are
    adjacent in guest memory (merged into one view).  Returns False, having
    added nothing, for any other table: ``SplitQueue._walk`` then walks it (and
    reports what is wrong with it).  Descriptors are read in the host's
    byte order: the module refuses big-endian hosts at import.
    """
    n = len(raw) >> 4
    classes = raw[12::16].translate(_FLAG_CLASS)
    if classes[-1] not in b"RW":
        return False
    if n > 1:
        body = classes[:-1]
        if body.count(b"r") + body.count(b"w") != n - 1:
            return False
        if raw[14 : 16 * (n - 1) : 16] != _SEQ_NEXT_LO[: n - 1]:
            return False
        if raw[15 : 16 * (n - 1) : 16] != _SEQ_NEXT_HI[: n - 1]:
            return False
    classes = classes.translate(_LAST_TO_NEXT)
    k = classes.find(b"w")  # first writable descriptor
    if k < 0:
        k = n
    elif classes.find(b"r", k) >= 0:
        return False
    if not (
        _add_segment(memory, raw, 0, k, readable, None)
        and _add_segment(memory, raw, k, n, writable, gpas)
    ):
        # A buffer outside guest memory or spanning regions: the walk says which.
        del readable[:], writable[:], gpas[:]
        return False
    return True


def _add_segment(
    memory: GuestMemory,
    raw: bytes,
    a: int,
    b: int,
    out: list[memoryview],
    gpas: list[tuple[int, int]] | None,
) -> bool:
    """Views of the buffers of descriptors ``a..b-1``, adjacent ones merged;
    False if one is empty or not inside a single region.

    A long segment is first tested for a tail of equal-sized adjacent
    buffers (the data pages) by ``_adjacent_tail``; what precedes it (the
    headers) and the tail as one buffer then go through the general case.
    General case, few breaks between adjacent buffers: one view per run;
    many (scattered pages): one view per buffer, bounds-checked together.
    """
    if a == b:
        return True
    words = memoryview(raw).cast("I")
    j, tail = b, 0
    if b - a >= _BULK_MIN // 16:
        for j in range(a, min(a + 3, b - 1)):
            tail = _adjacent_tail(raw, j, b)
            if tail:
                break
        else:
            j = b
    addrs = memoryview(raw).cast("Q")[2 * a : 2 * j : 2].tolist()
    lens = words[4 * a + 2 : 4 * j : 4].tolist()
    if tail:
        addrs.append(memoryview(raw).cast("Q")[2 * j])
        lens.append(tail)
    if 0 in lens:
        return False
    add = operator.add
    # joins[i]: buffer i ends where buffer i+1 starts
    joins = list(map(operator.eq, map(add, addrs[:-1], lens[:-1]), addrs[1:]))
    last = len(addrs) - 1
    if joins.count(False) <= _MAX_RUNS:
        start = 0
        while True:
            try:
                stop = joins.index(False, start)
            except ValueError:
                stop = last
            lo = addrs[start]
            hi = addrs[stop] + lens[stop]
            for r in memory.regions:
                off = lo - r.gpa
                if off >= 0 and hi - r.gpa <= r.size:
                    out.append(r.view[off : hi - r.gpa])
                    break
            else:
                return False
            if gpas is not None:
                gpas.append((lo, hi - lo))
            if stop == last:
                return True
            start = stop + 1
    lo = min(addrs)
    hi = max(map(add, addrs, lens))
    for r in memory.regions:
        base = r.gpa
        if lo >= base and hi - base <= r.size:
            view = r.view
            out += [view[x - base : x - base + m] for x, m in zip(addrs, lens, strict=True)]
            if gpas is not None:
                gpas += zip(addrs, lens, strict=True)
            return True
    return False


@functools.lru_cache(maxsize=64)
def _ap_weights(m: int) -> tuple[int, int]:
    """(sum of B**i, sum of i * B**i) for i < m, B = 2**64."""
    ones = sum(1 << (64 * i) for i in range(m))
    ramp = sum(i << (64 * i) for i in range(m))
    return ones, ramp


def _adjacent_tail(raw: bytes, j: int, b: int) -> int:
    """Total length if descriptors ``j..b-1`` of ``raw`` are adjacent buffers
    of one size (the last may differ), else 0.

    Without a Python step per descriptor: the sizes compare as bytes with a
    repeated pattern, and the addresses, read as one little-endian number
    ``sum(addr_i * 2**(64*i))``, must equal ``start * ones + size * ramp``
    (``_ap_weights``), i.e. ``addr_i == start + i * size`` for every i (the
    base-2**64 digits of a number are unique while each is below 2**64,
    which the ``last`` check guarantees).  A READ of adjacent pages then
    needs no per-descriptor list at all.
    """
    m = b - j
    words = memoryview(raw).cast("I")
    quads = memoryview(raw).cast("Q")
    size = words[4 * j + 2]
    start = quads[2 * j]
    last = start + size * (m - 1)
    # Cheap rejections first: a header (next size differs), scattered pages
    # (the last one is elsewhere), a range past the top of the address space.
    if not size or (words[4 * j + 6] != size and m > 2) or quads[2 * (b - 1)] != last:
        return 0
    if last >= 1 << 64:
        return 0
    if words[4 * j + 2 : 4 * (b - 1) : 4].tobytes() != _U32.pack(size) * (m - 1):
        return 0
    ones, ramp = _ap_weights(m)
    if int.from_bytes(quads[2 * j : 2 * b : 2].tobytes(), "little") != start * ones + size * ramp:
        return 0
    return last - start + words[4 * (b - 1) + 2]
