"""Scatter/gather helpers over the buffers of one descriptor chain.

A virtio-fs request arrives as several device-readable buffers and its reply
goes into several device-writable ones, split wherever the guest driver put
descriptor boundaries (Linux puts ``fuse_in_header`` / ``fuse_out_header`` in
buffers of their own, and file data in page-sized ones).  These functions
address such a chain as one byte range, and copy only when a requested range
straddles a boundary.

``bufs`` are writable/readable buffer objects (``memoryview`` of guest memory
in the daemon, ``bytearray`` in tests); every slice handed out is a
``memoryview``, so it never copies and writes through to the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

Buffer: TypeAlias = memoryview | bytearray | bytes
Buffers: TypeAlias = Sequence[Any]  # Sequence[Buffer]; Any keeps mypy quiet on bytearray/mv mixes


class IovError(ValueError):
    """A byte range does not lie within the chain's buffers."""


def total_len(bufs: Buffers) -> int:
    """Bytes in all buffers together."""
    return sum(map(len, bufs))


def locate(bufs: Buffers, off: int) -> tuple[int, int]:
    """(buffer index, offset inside it) of chain offset ``off``.

    An offset at the very end of the chain yields ``(len(bufs), 0)``.
    Empty buffers are skipped so the result always points at a real byte.
    """
    if off < 0:
        raise IovError(f"negative offset {off}")
    i = 0
    for b in bufs:
        n = len(b)
        if off < n:
            return i, off
        off -= n
        i += 1
    if off == 0:
        return i, 0
    raise IovError("offset beyond the end of the buffers")


def view(bufs: Buffers, off: int, n: int) -> memoryview:
    """``n`` bytes at chain offset ``off`` as one contiguous read-only-safe view.

    Zero copy when the range lies inside one buffer (the common case);
    otherwise the pieces are joined into a new ``bytes`` object.
    """
    if n == 0:
        return memoryview(b"")
    w = window(bufs, off, n)
    if w is not None:
        return w
    return memoryview(b"".join(slices(bufs, off, n)))


def slices(bufs: Buffers, off: int, n: int) -> list[memoryview]:
    """Views covering ``n`` bytes from chain offset ``off`` (no copy, writable if bufs are)."""
    if n < 0:
        raise IovError(f"negative length {n}")
    out: list[memoryview] = []
    if n == 0:
        return out
    i, o = locate(bufs, off)
    nbufs = len(bufs)
    while n > 0:
        if i >= nbufs:
            raise IovError("range beyond the end of the buffers")
        b = bufs[i]
        size = len(b)
        if o == 0 and size <= n and type(b) is memoryview:
            out.append(b)  # a whole buffer, as most are: no new view (1 MiB READ: 256 of them)
            n -= size
        else:
            take = min(size - o, n)
            if take > 0:
                out.append(memoryview(b)[o : o + take])
                n -= take
        i += 1
        o = 0
    return out


def scatter(bufs: Buffers, off: int, data: Buffer) -> None:
    """Copy ``data`` into the chain starting at offset ``off``."""
    pos = 0
    src = memoryview(data)
    for dst in slices(bufs, off, len(src)):
        k = len(dst)
        dst[:] = src[pos : pos + k]
        pos += k


def window(bufs: Buffers, off: int, n: int) -> memoryview | None:
    """A writable view of ``n`` bytes at ``off`` if they lie in one buffer, else None."""
    if n == 0:
        return memoryview(bytearray())
    if bufs:
        # Fast paths for the layouts Linux produces: everything in the first
        # buffer, or a header buffer followed by one for the arguments/body.
        b0 = bufs[0]
        n0 = len(b0)
        if off + n <= n0:
            return memoryview(b0)[off : off + n]
        if off == n0 and len(bufs) > 1 and n <= len(bufs[1]):
            return memoryview(bufs[1])[:n]
    i, o = locate(bufs, off)
    if i < len(bufs):
        b = bufs[i]
        if o + n <= len(b):
            return memoryview(b)[o : o + n]
    return None
