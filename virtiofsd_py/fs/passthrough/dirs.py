"""Passthrough operations on directories: OPENDIR, READDIR, READDIRPLUS,
RELEASEDIR and FSYNCDIR.

A listing reads the host's getdents64 records after the guest's cookie
(``d_off``) lazily, so the dispatcher stops at a full reply without reading
further; READDIRPLUS looks each name up as LOOKUP does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

from virtiofsd_py.fs.api import Context, DirEntry, Opened
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fs.passthrough.open_files import HandleData
from virtiofsd_py.host.syscalls import O_PATH_NOFOLLOW, getdents64

_DIRENT_BUF: Final = 8192
#: First getdents64 buffer of a READDIR / READDIRPLUS (see ``_entries``).
_DIRENT_FIRST: Final = 4608
_DIRENT_FIRST_PLUS: Final = 1024
_DOTS: Final = (b".", b"..")


class DirOps(PassthroughCore):
    """OPENDIR, READDIR(PLUS), RELEASEDIR, FSYNCDIR."""

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        return self._open(nodeid, flags | os.O_DIRECTORY, True)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        """Entries after the kernel cookie ``offset`` (getdents64 ``d_off``).

        The handle is checked now; entries come lazily.  With ``plus`` each
        entry but ``.``/``..`` is looked up as it is yielded; an entry that
        vanished in between is skipped, any other lookup error is raised.
        """
        h = self.handles.get(fh, nodeid)
        return self._entries(ctx, h, offset, plus)

    def _entries(self, ctx: Context, h: HandleData, offset: int, plus: bool) -> Iterator[DirEntry]:
        # The first getdents64 asks for about what one reply page holds
        # (host records are 24-32 bytes for short names, fuse_dirent 32,
        # fuse_direntplus 160): the dispatcher stops at a full reply and
        # records read past it would be parsed for nothing.  Later calls grow.
        buf = bytearray(_DIRENT_FIRST_PLUS if plus else _DIRENT_FIRST)
        cookie = offset
        while True:
            with h.lock:  # the fd's position is shared by every READDIR on it
                os.lseek(h.fd, cookie, os.SEEK_SET)
                batch = getdents64(h.fd, buf)
            if not batch:
                return
            if len(buf) < _DIRENT_BUF:
                buf = bytearray(min(2 * len(buf), _DIRENT_BUF))
            if not plus:
                for d in batch:
                    yield DirEntry(d.ino, d.off, d.type, d.name)
                cookie = batch[-1].off
                continue
            # READDIRPLUS: each name but . and .. looked up as LOOKUP does,
            # with the directory opened once per batch (its handle pins it:
            # the guest cannot forget it meanwhile) and the name checks
            # skipped (the host's own names are single components).
            p = self._node(h.nodeid)
            inodes = self.inodes
            # _fd_guard's sum with the handles and locks counted once per batch
            # (only the nodes grow here); _fd_guard itself reports a full budget.
            room = self.fd_limit - len(self.handles) - len(self.locks)
            with p.opened() as pfd:
                for d in batch:
                    cookie = d.off
                    name = d.name
                    entry = None
                    if name not in _DOTS:
                        if inodes.fd_nodes >= room:
                            self._fd_guard()
                        try:
                            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
                        except FileNotFoundError:
                            continue
                        entry = self._add_entry(p, name, fd)
                    yield DirEntry(d.ino, d.off, d.type, name, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.handles.remove(fh, nodeid)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.fsync(ctx, nodeid, fh, datasync)
