"""Dirty-page log for live migration (vhost-user.rst, "Migration").

While VHOST_F_LOG_ALL is negotiated, every guest-memory write of the back-end
must be recorded in the log QEMU shares with SET_LOG_BASE: one bit per 4 KiB
guest-physical page, ``log[page // 8] |= 1 << (page % 8)``.  The log is shared
with QEMU and with the other vhost-user back-ends of the VM, so bits are set
with atomic read-modify-write instructions: a plain read-or-write could undo
another writer's bit, and a lost bit is guest memory silently corrupted after
migration.  Python has no atomic operations on shared memory; libatomic's
``__atomic_fetch_or_8`` (a ``lock or`` on x86-64) does it, one call per 64
pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import sys
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("virtiofsd_py.migration")

PAGE_SHIFT = 12
_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _load_fetch_or(width: int) -> Any:
    name = ctypes.util.find_library("atomic")
    if name is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(name), f"__atomic_fetch_or_{width}")
    except (OSError, AttributeError):
        return None
    value = ctypes.c_uint64 if width == 8 else ctypes.c_uint8
    fn.argtypes = (ctypes.c_void_p, value, ctypes.c_int)
    fn.restype = value
    return fn


#: Bits of 64 pages at once (little-endian: bit n of the word is bit n % 8 of
#: byte n // 8, the log's layout); the 1-byte form serves unaligned logs.
_fetch_or = _load_fetch_or(8)
_fetch_or_1 = _load_fetch_or(1)


def logging_supported() -> bool:
    """Whether dirty logging (hence migration) can be offered on this host."""
    return _fetch_or is not None and _fetch_or_1 is not None


class DirtyLogError(Exception):
    pass


class DirtyLog:
    """The mapped log; ``mark`` sets the bits of a guest-physical range."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if _fetch_or is None or _fetch_or_1 is None:
            raise DirtyLogError("no atomic fetch-or available (libatomic missing)")
        if size == 0 or offset > (1 << 63) or size > (1 << 40):
            raise DirtyLogError(f"bad log size {size} / offset {offset}")
        try:
            self._map = mmap.mmap(fd, size + offset, mmap.MAP_SHARED)
        except (OSError, ValueError, OverflowError) as e:
            raise DirtyLogError(f"cannot map the dirty log: {e}") from e
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor) + offset
        self._aligned = self._base % 8 == 0 and sys.byteorder == "little"
        self.size = size
        #: Guest-physical bytes the log covers; writes beyond it are an error.
        self.covers = size * 8 << PAGE_SHIFT
        self.writes = 0

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of ``[gpa, gpa + length)`` dirty."""
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if (last >> 3) >= self.size:
            log.error("dirty log of %d bytes does not cover guest address %#x", self.size, gpa)
            return
        if not self._aligned:
            self._mark_bytewise(first, last)
            return
        word = first >> 6
        while word <= last >> 6:
            lo = max(first, word << 6) & 63
            hi = min(last, (word << 6) + 63) & 63
            bits = ((1 << (hi - lo + 1)) - 1) << lo
            assert _fetch_or is not None
            _fetch_or(self._base + word * 8, bits, _SEQ_CST)
            word += 1
        self.writes += 1

    def _mark_bytewise(self, first: int, last: int) -> None:
        for byte in range(first >> 3, (last >> 3) + 1):
            lo = max(first, byte << 3) & 7
            hi = min(last, (byte << 3) + 7) & 7
            _fetch_or_1(self._base + byte, ((1 << (hi - lo + 1)) - 1) << lo, _SEQ_CST)
        self.writes += 1

    def mark_written(self, gpas: Iterable[tuple[int, int]], written: int) -> None:
        """Mark the first ``written`` bytes of a chain's writable descriptors."""
        for gpa, length in gpas:
            if written <= 0:
                break
            n = min(length, written)
            self.mark(gpa, n)
            written -= n

    def close(self) -> None:
        del self._anchor
        with contextlib.suppress(BufferError):
            self._map.close()
