"""Async back-ends for the daemon tests, served with ``--backend FILE:FACTORY``.

``SleepyFS``: a root directory of ``f0``..``f{N-1}`` files whose GETATTR
and READ sleep for a time that depends on the file, so that requests
submitted together complete out of order; and three misbehaving files:
``raises`` (its GETATTR raises a plain exception), ``wrongtype`` (returns a
str), ``hangs`` (waits until interrupted: FUSE_INTERRUPT cancels it).
"""

from __future__ import annotations

import asyncio
import errno
import stat
from collections.abc import AsyncIterator

from virtiofsd_py.fs.api import (
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    make_stat,
)

FIRST_FILE = 100
SPECIAL = {b"raises": 2, b"wrongtype": 3, b"hangs": 4}


def delay_of(nodeid: int) -> float:
    """Seconds GETATTR/READ of ``nodeid`` sleeps: files differ, so replies reorder."""
    return ((nodeid * 7) % 10) * 0.003


def content(nodeid: int, offset: int, size: int) -> bytes:
    """What reading ``nodeid`` gives: its id and offset, repeated (checkable)."""
    unit = f"<{nodeid}>".encode()
    whole = unit * ((offset + size) // len(unit) + 2)
    return whole[offset : offset + size]


class SleepyFS(Filesystem):
    def __init__(self, files: str = "200", size: str = "65536") -> None:
        self.files = int(files)
        self.size = int(size)

    def _stat(self, nodeid: int) -> AttrReply:
        if nodeid == ROOT_ID:
            return AttrReply(make_stat(mode=stat.S_IFDIR | 0o755, ino=ROOT_ID, nlink=2), 0.0)
        return AttrReply(make_stat(mode=stat.S_IFREG | 0o644, ino=nodeid, size=self.size), 0.0)

    def _nodeid(self, name: bytes) -> int:
        if name in SPECIAL:
            return SPECIAL[name]
        if name.startswith(b"f") and name[1:].isdigit() and int(name[1:]) < self.files:
            return FIRST_FILE + int(name[1:])
        raise OSError(errno.ENOENT, "no such file")

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:  # type: ignore[override]
        await asyncio.sleep(0)
        nodeid = self._nodeid(name)
        return Entry(nodeid, 0, self._stat(nodeid).attr, 0.0, 0.0)

    async def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:  # type: ignore[override]
        if nodeid == SPECIAL[b"raises"]:
            raise RuntimeError("a bug in the backend")
        if nodeid == SPECIAL[b"wrongtype"]:
            return "not an AttrReply"  # type: ignore[return-value]
        if nodeid == SPECIAL[b"hangs"]:
            await asyncio.Event().wait()  # until cancelled (FUSE_INTERRUPT)
        await asyncio.sleep(delay_of(nodeid))
        return self._stat(nodeid)

    async def open(self, ctx: Context, nodeid: int, flags: int, **kw: bool) -> Opened:  # type: ignore[override]
        return Opened(nodeid)

    async def read(  # type: ignore[override]
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        await asyncio.sleep(delay_of(nodeid))
        data = content(nodeid, offset, max(0, min(size, self.size - offset)))
        pos = 0
        for b in bufs:
            n = min(len(b), len(data) - pos)
            b[:n] = data[pos : pos + n]
            pos += n
        return pos

    async def release(self, ctx: Context, nodeid: int, fh: int, flags: int, **kw: int) -> None:  # type: ignore[override]
        return None

    async def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:  # type: ignore[override]
        return Opened(0)

    async def readdir(  # type: ignore[override]
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> AsyncIterator[DirEntry]:
        for i in range(offset, self.files):
            await asyncio.sleep(0)
            yield DirEntry(FIRST_FILE + i, i + 1, stat.S_IFREG >> 12, b"f%d" % i)

    async def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:  # type: ignore[override]
        return None
