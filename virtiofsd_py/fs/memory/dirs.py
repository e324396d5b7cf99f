"""In-memory operations on directories: OPENDIR, READDIR(PLUS), RELEASEDIR,
FSYNCDIR; a name keeps its cookie while it exists."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from virtiofsd_py.fs.api import Context, DirEntry, Opened, dirent_type, fs_error
from virtiofsd_py.fs.memory.core import MemoryCore
from virtiofsd_py.fs.memory.nodes import DOT_COOKIE, DOTDOT_COOKIE, Node


class DirOps(MemoryCore):
    """OPENDIR, READDIR(PLUS), RELEASEDIR, FSYNCDIR."""

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        with self._lock:
            return self._open_handle(self._dir(nodeid), flags)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        """Entries whose cookie is after ``offset``.

        A name keeps its cookie while it exists (a rename in gives a new
        one, at the end), so a listing resumed from any cookie neither
        repeats nor skips the names that stayed.  The listing is a snapshot
        taken now; lookups for ``plus`` are taken as entries are yielded,
        skipping names removed in between.
        """
        with self._lock:
            _, d = self._handle(fh, nodeid)
            if not d.is_dir:
                raise fs_error(errno.ENOTDIR, f"node {nodeid}")
            snap: list[tuple[int, int, bytes]] = []
            if offset < DOT_COOKIE:
                snap.append((DOT_COOKIE, d.ino, b"."))
            if offset < DOTDOT_COOKIE:
                snap.append((DOTDOT_COOKIE, d.parent, b".."))
            snap += [(c, ino, name) for name, (c, ino) in d.entries.items() if c > offset]
        return self._dir_entries(d, snap, plus)

    def _dir_entries(
        self, d: Node, snap: list[tuple[int, int, bytes]], plus: bool
    ) -> Iterator[DirEntry]:
        for cookie, ino, name in snap:
            with self._lock:
                node = self._nodes.get(ino)
                if node is None:
                    continue
                entry = None
                if name not in (b".", b".."):
                    if d.entries.get(name, (0, 0))[1] != ino:
                        continue  # removed or replaced since the snapshot
                    if plus:
                        entry = self._entry(node)
                de = DirEntry(ino, cookie, dirent_type(node.mode), name, entry)
            yield de

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.release(ctx, nodeid, fh, flags)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._lock:
            self._handle(fh, nodeid)
