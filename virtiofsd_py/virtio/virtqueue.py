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

import struct
import sys
import threading
from collections.abc import Callable

from virtiofsd_py.vhost.protocol import VringAddr
from virtiofsd_py.virtio.memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")  # addr, len, flags, next (2.7.5)
U16 = struct.Struct("<H")  # ring fields nobody writes concurrently (avail ring entries)
USED_ELEM = struct.Struct("<II")  # id, len (2.7.8)

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

    # -- driver -> device --------------------------------------------------
    def avail_idx(self) -> int:
        idx: int = self._avail16[1]
        return idx

    def has_available(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """Next available chain, or None.  Raises ChainError / QueueError."""
        avail = self.avail_idx()
        if avail == self.last_avail_idx:
            return None
        if (avail - self.last_avail_idx) & 0xFFFF > self.size:
            raise QueueError(
                f"avail index {avail} is more than {self.size} ahead of {self.last_avail_idx}"
            )
        slot = self.last_avail_idx % self.size
        head = U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            raise QueueError(f"avail ring slot {slot} names descriptor {head} >= {self.size}")
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
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
                indirect = True
                idx = 0
                seen = 0
                continue
            if length:
                # Inline fast path of GuestMemory.gpa_iov: the buffer in one region.
                for r in regions:
                    off = addr - r.gpa
                    if off >= 0 and off + length <= r.size:
                        bufs = [r.view[off : off + length]]
                        break
                else:
                    try:
                        bufs = memory.gpa_iov(addr, length)
                    except GuestMemoryError as e:
                        raise ChainError(head, str(e)) from e
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += bufs
                    gpas.append((addr, length))
                elif writable:
                    raise ChainError(head, "readable descriptor after a writable one")
                else:
                    readable += bufs
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
        return self.has_available()
