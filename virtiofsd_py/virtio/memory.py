"""Guest memory: the regions the front-end shares with us, and address translation.

Every guest address the daemon touches goes through ``GuestMemory``: ring
addresses arrive as front-end (QEMU process) virtual addresses, descriptor
buffers as guest-physical addresses (vhost-user.rst, "Memory access" and
SET_VRING_ADDR).  Translation is bounds-checked against the mapped regions;
an address outside them raises ``GuestMemoryError`` and never reaches an
mmap slice.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from virtiofsd_py.virtio.types import MemoryRegion


class GuestMemoryError(Exception):
    """An address range that does not lie inside the shared guest memory."""


@dataclass(slots=True, eq=False)
class MappedRegion:
    """One region and its mapping; ``view`` covers exactly the region's bytes."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mapping: mmap.mmap
    view: memoryview

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def uva_end(self) -> int:
        return self.uva + self.size

    def describe(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uva, self.mmap_offset)

    def release(self) -> None:
        """Unmap now if nothing else holds a view; else leave it to the GC."""
        self.view.release()
        # BufferError: an in-flight request still uses it; it goes with the last view.
        with contextlib.suppress(BufferError):
            self.mapping.close()


def map_region(region: MemoryRegion, fd: int) -> MappedRegion:
    """mmap ``fd`` for ``region``; the caller still owns (and closes) ``fd``."""
    if region.size == 0:
        raise GuestMemoryError("memory region of size 0")
    if max(region.guest_phys_addr, region.userspace_addr) + region.size > 1 << 64:
        raise GuestMemoryError(f"memory region {region} wraps around the address space")
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuestMemoryError(f"memory region {region}: {e}") from e
    # A mapping past the end of the file faults (SIGBUS) on first touch.
    if stat.S_ISREG(st.st_mode) and region.mmap_offset + region.size > st.st_size:
        raise GuestMemoryError(f"memory region {region} ends past its file ({st.st_size} bytes)")
    gran = mmap.ALLOCATIONGRANULARITY
    base = region.mmap_offset - region.mmap_offset % gran
    lead = region.mmap_offset - base
    try:
        mapping = mmap.mmap(
            fd,
            region.size + lead,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
    except (OSError, ValueError, OverflowError) as e:
        raise GuestMemoryError(f"cannot map memory region {region}: {e}") from e
    view = memoryview(mapping)[lead : lead + region.size]
    return MappedRegion(
        region.guest_phys_addr,
        region.size,
        region.userspace_addr,
        region.mmap_offset,
        mapping,
        view,
    )


def map_regions(regions: Sequence[MemoryRegion], fds: Sequence[int]) -> list[MappedRegion]:
    """``map_region`` for each (region, fd) pair: all of them or, raising, none."""
    mapped: list[MappedRegion] = []
    try:
        for region, fd in zip(regions, fds, strict=True):
            mapped.append(map_region(region, fd))
    except GuestMemoryError:
        for m in mapped:
            m.release()
        raise
    return mapped


class GuestMemory:
    """The set of mapped regions, replaced or changed by vhost-user messages.

    Lookups happen on every request, modifications only on control messages;
    readers take a snapshot of the region tuple, so a change never races with
    a translation in flight (old mappings stay alive while views exist).
    """

    def __init__(self) -> None:
        self._regions: tuple[MappedRegion, ...] = ()
        self._lock = threading.Lock()

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return self._regions

    def __bool__(self) -> bool:
        return bool(self._regions)

    def replace(self, mapped: list[MappedRegion]) -> None:
        """SET_MEM_TABLE: drop every region and install ``mapped``."""
        _check_overlaps(mapped)
        with self._lock:
            old, self._regions = self._regions, tuple(sorted(mapped, key=lambda r: r.gpa))
        for r in old:
            r.release()

    def add(self, region: MappedRegion) -> None:
        """ADD_MEM_REG."""
        with self._lock:
            new = [*self._regions, region]
            _check_overlaps(new)
            self._regions = tuple(sorted(new, key=lambda r: r.gpa))

    def remove(self, region: MemoryRegion) -> None:
        """REM_MEM_REG: the region matching gpa, size and user address."""
        with self._lock:
            keep = []
            gone = None
            for r in self._regions:
                if (
                    gone is None
                    and r.gpa == region.guest_phys_addr
                    and r.size == region.size
                    and r.uva == region.userspace_addr
                ):
                    gone = r
                else:
                    keep.append(r)
            if gone is None:
                raise GuestMemoryError(f"no such memory region: {region}")
            self._regions = tuple(keep)
        gone.release()

    def clear(self) -> None:
        self.replace([])

    # -- translation ---------------------------------------------------------
    def gpa(self, addr: int, length: int) -> memoryview:
        """View of guest-physical ``[addr, addr+length)``, within one region."""
        for r in self._regions:
            off = addr - r.gpa
            if 0 <= off < r.size:
                if length < 0 or off + length > r.size:
                    break
                return r.view[off : off + length]
        raise GuestMemoryError(f"guest-physical range {addr:#x}+{length:#x} not in guest memory")

    def gpa_iov(self, addr: int, length: int) -> list[memoryview]:
        """Like ``gpa`` but a range may span adjacent regions."""
        out: list[memoryview] = []
        while True:
            for r in self._regions:
                off = addr - r.gpa
                if 0 <= off < r.size:
                    n = min(length, r.size - off)
                    out.append(r.view[off : off + n])
                    addr += n
                    length -= n
                    break
            else:
                if length == 0 and out:
                    return out
                raise GuestMemoryError(
                    f"guest-physical range {addr:#x}+{length:#x} not in guest memory"
                )
            if length == 0:
                return out

    def uva(self, addr: int, length: int) -> memoryview:
        """View of front-end virtual ``[addr, addr+length)`` (ring addresses)."""
        for r in self._regions:
            off = addr - r.uva
            if 0 <= off < r.size:
                if length < 0 or off + length > r.size:
                    break
                return r.view[off : off + length]
        raise GuestMemoryError(f"front-end address range {addr:#x}+{length:#x} not in guest memory")

    def uva_to_gpa(self, addr: int) -> int:
        for r in self._regions:
            off = addr - r.uva
            if 0 <= off < r.size:
                return r.gpa + off
        raise GuestMemoryError(f"front-end address {addr:#x} not in guest memory")


def _check_overlaps(regions: list[MappedRegion]) -> None:
    by_gpa = sorted(regions, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(by_gpa):
        if a.gpa_end > b.gpa:
            raise GuestMemoryError(f"memory regions overlap at guest address {b.gpa:#x}")


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
