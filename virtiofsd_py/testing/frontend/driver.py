"""Driver side of virtio: guest memory and split virtqueues, as a guest kernel sees them.

The test front-end plays the guest's virtio driver.  Guest RAM is a memfd
mapped ``MAP_SHARED`` here and handed to the daemon as a vhost-user memory
region, so the daemon reads and writes the very bytes this module sees.

Guest-physical address (GPA) = ``gpa_base`` + offset in the memfd.  The
"user address" (QEMU's own virtual address of the region, which vhost-user
uses in SET_VRING_ADDR) is a separate, made-up number, so a daemon that
mixes the two address spaces fails loudly instead of working by accident.

Split virtqueue layout and rules: virtio 1.x spec, section 2.7
("Split Virtqueues"): descriptor table (2.7.5), available ring (2.7.6),
used ring (2.7.8), notification suppression with VIRTIO_F_EVENT_IDX (2.7.7,
2.7.10), indirect descriptors (2.7.5.3).
"""

from __future__ import annotations

import mmap
import os
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtiofsd_py.virtio.virtqueue import (
    DESC,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_barrier,
    index_view,
)

__all__ = [
    "DESC",
    "PAGE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Buffer",
    "Chain",
    "GuestMemory",
    "RawDesc",
    "RingError",
    "SplitQueue",
    "Timeout",
    "Used",
    "drain_eventfd",
    "vring_need_event",
    "wait_readable",
]

PAGE_SIZE = 4096
VIRTQ_USED_F_NO_NOTIFY = 1  # used ring flags (2.7.8); the device side never reads it


class RingError(Exception):
    """The device broke a virtqueue rule (bad used id, impossible length, ...)."""


class Timeout(Exception):
    """Nothing arrived within the time limit."""


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crosses ``event_idx`` (2.7.10)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class GuestMemory:
    """One region of guest RAM backed by a memfd, with a first-fit allocator.

    ``gpa_base`` is the guest-physical address of offset 0; ``user_addr`` is
    the pretend front-end virtual address of offset 0.
    """

    def __init__(
        self,
        size: int,
        *,
        gpa_base: int = 0,
        user_addr: int = 0x7F12_3400_0000,
        fd_offset: int = 0,
        name: str = "guest-ram",
    ) -> None:
        if size <= 0 or size % PAGE_SIZE or fd_offset < 0 or fd_offset % PAGE_SIZE:
            raise ValueError("guest memory size and fd offset must be multiples of 4 KiB")
        self.size = size
        self.gpa_base = gpa_base
        self.user_addr = user_addr
        #: Where the region starts in the memfd (vhost-user ``mmap_offset``).
        self.fd_offset = fd_offset
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, fd_offset + size)
        self.mmap = mmap.mmap(
            self.fd, fd_offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._whole = memoryview(self.mmap)
        #: The region's bytes; index = GPA - gpa_base.
        self.view = self._whole[fd_offset:]
        # Free list of (offset, length), sorted by offset; page 0 stays unused so
        # that GPA 0 (a common "null" value) never names a real buffer.
        self._free: list[tuple[int, int]] = [(PAGE_SIZE, size - PAGE_SIZE)]
        self._allocated: dict[int, int] = {}

    # -- address spaces ------------------------------------------------------
    @property
    def gpa_end(self) -> int:
        return self.gpa_base + self.size

    def offset(self, gpa: int, length: int = 0) -> int:
        """Offset of ``gpa`` in :attr:`view`; raises unless ``[gpa, gpa+length)`` is RAM."""
        off = gpa - self.gpa_base
        if off < 0 or length < 0 or off + length > self.size:
            raise ValueError(f"GPA range {gpa:#x}+{length:#x} is outside guest memory")
        return off

    def gpa_to_user(self, gpa: int) -> int:
        return self.user_addr + self.offset(gpa)

    # -- access ----------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return bytes(self.view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self.offset(gpa, len(data))
        self.view[off : off + len(data)] = data

    def slice(self, gpa: int, length: int) -> memoryview:
        off = self.offset(gpa, length)
        return self.view[off : off + length]

    def fill(self, gpa: int, length: int, byte: int) -> None:
        off = self.offset(gpa, length)
        self.view[off : off + length] = bytes([byte]) * length

    # -- allocation ------------------------------------------------------------
    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes (at least 1) aligned to ``align``; returns the GPA."""
        length = max(1, length)
        for i, (start, size) in enumerate(self._free):
            aligned = align_up(self.gpa_base + start, align) - self.gpa_base
            pad = aligned - start
            if size - pad < length:
                continue
            pieces = []
            if pad:
                pieces.append((start, pad))
            rest = size - pad - length
            if rest:
                pieces.append((aligned + length, rest))
            self._free[i : i + 1] = pieces
            self._allocated[aligned] = length
            return self.gpa_base + aligned
        raise MemoryError(f"guest memory exhausted allocating {length} bytes")

    def free(self, gpa: int) -> None:
        off = gpa - self.gpa_base
        length = self._allocated.pop(off)
        self._free.append((off, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged

    @property
    def bytes_allocated(self) -> int:
        return sum(self._allocated.values())

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.view.release()
        self._whole.release()
        self.mmap.close()
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class Buffer:
    """One guest buffer of a request: ``length`` bytes at guest-physical ``gpa``."""

    gpa: int
    length: int


@dataclass(frozen=True, slots=True)
class RawDesc:
    """A descriptor exactly as written to a table (for malformed-chain tests)."""

    addr: int
    length: int
    flags: int = 0
    next: int = 0


@dataclass(slots=True)
class Chain:
    """A request in flight: its head, the descriptors it holds, what it may receive."""

    head: int
    desc_ids: list[int]
    writable: int  # total bytes the device may write
    out: list[Buffer] = field(default_factory=list)
    in_: list[Buffer] = field(default_factory=list)
    indirect_gpa: int | None = None
    token: object = None


@dataclass(frozen=True, slots=True)
class Used:
    """A used-ring element, checked against the chain it completes."""

    chain: Chain
    length: int


class SplitQueue:
    """Driver side of one split virtqueue with its kick and call eventfds.

    The rings live in ``mem``; ``desc_gpa``/``avail_gpa``/``used_gpa`` are
    what SET_VRING_ADDR announces (translated to user addresses by the
    front-end).  Requests go in with :meth:`add` (or :meth:`add_raw`),
    become visible with :meth:`publish`, reach the device with :meth:`kick`;
    completions come back through :meth:`wait_used`.
    """

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = True,
        indirect: bool = True,
    ) -> None:
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("split queue size must be a power of 2 up to 32768 (2.7)")
        self.mem = mem
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        # Alignment: descriptors 16, avail 2, used 4 (2.7, table "Virtqueue
        # Part Alignment"); page alignment keeps each part separate and tidy.
        self.desc_gpa = mem.alloc(16 * size, PAGE_SIZE)
        self.avail_gpa = mem.alloc(6 + 2 * size, PAGE_SIZE)
        self.used_gpa = mem.alloc(6 + 8 * size, PAGE_SIZE)
        mem.fill(self.desc_gpa, 16 * size, 0)
        mem.fill(self.avail_gpa, 6 + 2 * size, 0)
        mem.fill(self.used_gpa, 6 + 8 * size, 0)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0  # next avail index we will publish (free-running u16)
        self.kicked_idx = 0  # avail idx at our last kick
        self.last_used = 0  # next used index we will consume
        self._free_ids = list(range(size))
        self.in_flight: dict[int, Chain] = {}
        self.kicks = 0

    # -- ring field access ---------------------------------------------------
    def _desc_write(self, table_gpa: int, i: int, d: RawDesc) -> None:
        off = self.mem.offset(table_gpa + 16 * i, 16)
        DESC.pack_into(self.mem.view, off, d.addr, d.length, d.flags, d.next)

    def read_desc(self, i: int) -> RawDesc:
        off = self.mem.offset(self.desc_gpa + 16 * i, 16)
        return RawDesc(*DESC.unpack_from(self.mem.view, off))

    def _u16(self, gpa: int) -> int:
        """One 16-bit load of a ring field the device may be writing (see ``index_view``)."""
        off = self.mem.offset(gpa, 2)
        return int(index_view(self.mem.view[off : off + 2])[0])

    def _set_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store: ``struct.pack_into`` would let the device read a transient 0."""
        off = self.mem.offset(gpa, 2)
        index_view(self.mem.view[off : off + 2])[0] = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        """The device's used index (used ring ``idx``)."""
        return self._u16(self.used_gpa + 2)

    @property
    def used_flags(self) -> int:
        return self._u16(self.used_gpa)

    @property
    def avail_event(self) -> int:
        """What the device asks for with EVENT_IDX (after the used ring, 2.7.8)."""
        return self._u16(self.used_gpa + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        """Tell the device when to interrupt us next (after the avail ring, 2.7.6)."""
        self._set_u16(self.avail_gpa + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        self._set_u16(self.avail_gpa, flags)

    # -- descriptor allocation ----------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    def reserve(self, n: int) -> list[int]:
        """Take ``n`` free descriptor-table slots (for :meth:`add_raw`)."""
        if n > len(self._free_ids):
            raise RingError(f"queue {self.index}: {n} descriptors wanted, {self.num_free} free")
        ids, self._free_ids = self._free_ids[:n], self._free_ids[n:]
        return ids

    # -- submitting ------------------------------------------------------------
    def add(
        self,
        out: Sequence[Buffer],
        in_: Sequence[Buffer],
        *,
        indirect: bool | None = None,
        token: object = None,
    ) -> Chain:
        """Put a chain (device-readable ``out`` then device-writable ``in_``) in the table.

        With ``indirect=None`` the choice follows Linux: an indirect table for
        any chain of more than one element when the feature was negotiated.
        The chain is not visible to the device until :meth:`publish`.
        """
        bufs = [(b, 0) for b in out] + [(b, VIRTQ_DESC_F_WRITE) for b in in_]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect is None:
            indirect = self.indirect and len(bufs) > 1
        writable = sum(b.length for b in in_)
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (b, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                nflags = flags | (0 if last else VIRTQ_DESC_F_NEXT)
                self._desc_write(table, i, RawDesc(b.gpa, b.length, nflags, 0 if last else i + 1))
            (head,) = self.reserve(1)
            self._desc_write(
                self.desc_gpa, head, RawDesc(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            )
            chain = Chain(head, [head], writable, list(out), list(in_), table, token)
        else:
            ids = self.reserve(len(bufs))
            for i, (b, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                nflags = flags | (0 if last else VIRTQ_DESC_F_NEXT)
                nxt = 0 if last else ids[i + 1]
                self._desc_write(self.desc_gpa, ids[i], RawDesc(b.gpa, b.length, nflags, nxt))
            chain = Chain(ids[0], ids, writable, list(out), list(in_), None, token)
        self.in_flight[chain.head] = chain
        self._push_avail(chain.head)
        return chain

    def add_raw(
        self,
        descs: Sequence[RawDesc],
        *,
        ids: Sequence[int] | None = None,
        head: int | None = None,
        writable: int = 0,
        token: object = None,
    ) -> Chain:
        """Write descriptors verbatim at table slots ``ids`` and queue ``head``.

        ``next`` fields are taken as given (absolute slots), so loops, bad
        flags and out-of-range addresses can all be expressed.  ``ids``
        defaults to freshly reserved slots; ``head`` to the first of them.
        ``writable`` bounds the used length the device may report.
        """
        slots = list(ids) if ids is not None else self.reserve(len(descs))
        for slot, d in zip(slots, descs, strict=True):
            self._desc_write(self.desc_gpa, slot, d)
        h = slots[0] if head is None else head
        chain = Chain(h, slots, writable, token=token)
        self.in_flight[h] = chain
        self._push_avail(h)
        return chain

    def _push_avail(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self._set_u16(self.avail_gpa + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every added chain visible: store the avail ``idx`` (after the entries)."""
        self._set_u16(self.avail_gpa + 2, self.avail_idx)

    def kick(self, *, force: bool = False) -> bool:
        """Publish and notify the device if it asked for it (or ``force``); True if kicked."""
        self.publish()
        # The device stores avail_event then loads avail idx; we store idx then
        # load avail_event: without a fence on both sides a kick can be lost (2.7.10).
        full_barrier()
        if self.event_idx:
            need = vring_need_event(self.avail_event, self.avail_idx, self.kicked_idx)
        else:
            need = not (self.used_flags & VIRTQ_USED_F_NO_NOTIFY)
        self.kicked_idx = self.avail_idx
        if need or force:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
            return True
        return False

    # -- completions -----------------------------------------------------------
    def poll_used(self) -> list[Used]:
        """Consume every used element the device has published, checking each one."""
        done: list[Used] = []
        idx = self.used_idx
        pending = (idx - self.last_used) & 0xFFFF
        if pending > len(self.in_flight):
            raise RingError(
                f"queue {self.index}: used idx {idx} is {pending} ahead of {self.last_used},"
                f" but only {len(self.in_flight)} chains are in flight"
            )
        while self.last_used != idx:
            slot = self.last_used % self.size
            off = self.mem.offset(self.used_gpa + 4 + 8 * slot, 8)
            uid, ulen = USED_ELEM.unpack_from(self.mem.view, off)
            chain = self.in_flight.pop(uid, None)
            if chain is None:
                raise RingError(f"queue {self.index}: used id {uid} is not a chain in flight")
            if ulen > chain.writable:
                raise RingError(
                    f"queue {self.index}: used len {ulen} for chain {uid} exceeds its"
                    f" {chain.writable} writable bytes"
                )
            self._release(chain)
            done.append(Used(chain, ulen))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return done

    def _release(self, chain: Chain) -> None:
        self._free_ids.extend(chain.desc_ids)
        if chain.indirect_gpa is not None:
            self.mem.free(chain.indirect_gpa)

    def wait_used(self, timeout: float = 5.0, *, min_count: int = 1) -> list[Used]:
        """Wait (poll on the call eventfd) until ``min_count`` completions arrived."""
        deadline = time.monotonic() + timeout
        done: list[Used] = []
        while True:
            done += self.poll_used()
            if len(done) >= min_count:
                return done
            # used_event was just stored; a device that published before seeing it
            # may not notify, so look at the used idx again before sleeping.
            full_barrier()
            if self.used_idx != self.last_used:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_readable(self.call_fd, remaining):
                # A last look: a device may update the ring without notifying.
                done += self.poll_used()
                if len(done) >= min_count:
                    return done
                raise Timeout(
                    f"queue {self.index}: {len(done)} of {min_count} completions after"
                    f" {timeout}s (used idx {self.used_idx}, avail idx {self.avail_idx})"
                )
            drain_eventfd(self.call_fd)

    def notified(self) -> bool:
        """Whether the device signalled the call eventfd since last asked (and reset it)."""
        return drain_eventfd(self.call_fd) > 0

    def close(self) -> None:
        """Close the eventfds and give the ring memory back to the allocator."""
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            os.close(fd)
        for gpa in (self.desc_gpa, self.avail_gpa, self.used_gpa):
            self.mem.free(gpa)


def wait_readable(fd: int, timeout: float) -> bool:
    """poll() ``fd`` for input up to ``timeout`` seconds."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000))))


def drain_eventfd(fd: int) -> int:
    """Read and reset a non-blocking eventfd; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
