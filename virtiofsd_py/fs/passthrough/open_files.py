"""The handle table: FUSE file handles (``fh``) -> open host fds.

``fh`` values count up from 1 and are never reused while the daemon runs.
Like ``InodeData``, a ``HandleData`` owns its fd and closes it when the
object dies, so a RELEASE racing with a READ on the same handle cannot close
the fd under the READ: the READ's local reference keeps it open.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

from virtiofsd_py.fs.passthrough.mirror import TableMirror
from virtiofsd_py.fs.passthrough.owned import OwnedFd


class HandleData(OwnedFd):
    """One open file or directory: plain fields, serializable for migration."""

    __slots__ = ("fh", "flags", "lock", "nodeid")

    fh: int
    nodeid: int
    flags: int  # open(2) flags the host fd was opened with
    lock: threading.Lock  # serializes lseek+getdents on a directory handle

    def __init__(self, fh: int, nodeid: int, fd: int, flags: int) -> None:
        super().__init__(fd)
        self.fh = fh
        self.nodeid = nodeid
        self.flags = flags
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"HandleData(fh={self.fh}, nodeid={self.nodeid}, fd={self.fd}, flags={self.flags:#o})"
        )


def ebadf(what: str) -> OSError:
    return OSError(errno.EBADF, f"{what}: {os.strerror(errno.EBADF)}")


class HandleTable:
    """Thread-safe map of fh -> ``HandleData``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, HandleData] = {}
        self._next_fh = 1
        #: Told of every handle added and removed (mirror.py), if set.
        self._mirror: TableMirror | None = None

    def attach_mirror(self, mirror: TableMirror) -> None:
        """Report to ``mirror`` from now on, starting with every handle there is."""
        with self._lock:
            if self._mirror is not None:
                raise ValueError("the handle table already has a mirror")
            self._mirror = mirror
            for h in self._handles.values():
                if h.fd >= 0:
                    mirror.handle_added(h.fh, h.nodeid, h.fd, h.flags)

    def detach_mirror(self) -> None:
        """Stop reporting; the mirror forgets every handle (once no one uses it)."""
        with self._lock:
            mirror, self._mirror = self._mirror, None
            if mirror is not None:
                mirror.handles_cleared()

    def add(self, nodeid: int, fd: int, flags: int) -> HandleData:
        """Register ``fd`` (the table owns it from now on) and return its handle."""
        with self._lock:
            h = HandleData(self._next_fh, nodeid, fd, flags)
            self._next_fh += 1
            self._handles[h.fh] = h
            if self._mirror is not None:
                self._mirror.handle_added(h.fh, nodeid, fd, flags)
        return h

    def get(self, fh: int, nodeid: int) -> HandleData:
        """The handle ``fh`` of node ``nodeid``; EBADF if there is none."""
        h = self._handles.get(fh)
        if h is None or h.nodeid != nodeid:
            raise ebadf(f"no handle {fh} for node {nodeid}")
        return h

    def find(self, fh: int, nodeid: int) -> HandleData | None:
        """As ``get``, None instead of EBADF (the fast operations' question)."""
        h = self._handles.get(fh)
        return h if h is not None and h.nodeid == nodeid else None

    def remove(self, fh: int, nodeid: int) -> None:
        """Forget ``fh``; its fd closes once no running operation uses it."""
        with self._lock:
            h = self._handles.get(fh)
            if h is None or h.nodeid != nodeid:
                raise ebadf(f"no handle {fh} for node {nodeid}")
            del self._handles[fh]
            if self._mirror is not None:
                self._mirror.handle_dropped(fh)
        del h  # may close the fd: outside the lock

    def restore(self, handles: list[HandleData], next_fh: int) -> None:
        """Install migrated handles with the source's fh values (table empty)."""
        with self._lock:
            if self._handles:
                raise ValueError("migration state loaded into a daemon that is already in use")
            self._handles = {h.fh: h for h in handles}
            if self._mirror is not None:
                for h in handles:
                    if h.fd >= 0:
                        self._mirror.handle_added(h.fh, h.nodeid, h.fd, h.flags)
            self._next_fh = max([next_fh, *(h.fh + 1 for h in handles)])

    @property
    def next_fh(self) -> int:
        return self._next_fh

    def clear(self) -> None:
        with self._lock:
            dropped = self._handles
            self._handles = {}
            if self._mirror is not None:
                self._mirror.handles_cleared()
        del dropped

    def __len__(self) -> int:
        return len(self._handles)

    def __iter__(self) -> Iterator[HandleData]:
        with self._lock:
            return iter(list(self._handles.values()))
