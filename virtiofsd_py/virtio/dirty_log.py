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
        #: The log as 64-bit words, for the cheap "already set?" check.
        self._words = memoryview(self._map)[offset : offset + size - size % 8].cast("Q")
        self.size = size
        #: Guest-physical bytes the log covers; writes beyond it are an error.
        self.covers = size * 8 << PAGE_SHIFT
        self.writes = 0

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of ``[gpa, gpa + length)`` dirty."""
        self.mark_written(((gpa, length),), length)

    def mark_written(self, gpas: Iterable[tuple[int, int]], written: int) -> None:
        """Mark the pages of the first ``written`` bytes of a chain's writable
        descriptors: bits are gathered per 64-page word first, so a 1 MiB reply
        in 256 page-sized buffers costs a few atomic operations, not 256."""
        words: dict[int, int] = {}
        for gpa, length in gpas:
            if written <= 0:
                break
            n = min(length, written)
            written -= n
            if n <= 0:
                continue
            first = gpa >> PAGE_SHIFT
            last = (gpa + n - 1) >> PAGE_SHIFT
            if (last >> 3) >= self.size:
                log.error("dirty log of %d bytes does not cover guest address %#x", self.size, gpa)
                continue
            if first == last:  # the common page-sized buffer
                w = first >> 6
                words[w] = words.get(w, 0) | 1 << (first & 63)
                continue
            while first <= last:
                w = first >> 6
                hi = min(last, w << 6 | 63)
                bits = ((1 << (hi - first + 1)) - 1) << (first & 63)
                words[w] = words.get(w, 0) | bits
                first = hi + 1
        if words:
            self._set(words)
            self.writes += 1

    def _set(self, words: dict[int, int]) -> None:
        """OR each word's bits into the log, skipping bits already set.

        Skipping is safe: a bit seen set after our write to guest memory is
        either still set when QEMU next syncs the log, or QEMU cleared it
        after our write and will send the page as it is now.
        """
        if not self._aligned:
            for w, bits in words.items():
                for i in range(8):
                    byte_bits = bits >> (8 * i) & 0xFF
                    if byte_bits:
                        _fetch_or_1(self._base + w * 8 + i, byte_bits, _SEQ_CST)
            return
        view = self._words
        limit = len(view)
        for w, bits in words.items():
            if w < limit and view[w] & bits == bits:
                continue
            _fetch_or(self._base + w * 8, bits, _SEQ_CST)

    def close(self) -> None:
        self._words.release()
        del self._anchor
        with contextlib.suppress(BufferError):
            self._map.close()
