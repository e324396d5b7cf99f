"""Passthrough record and flock locks: GETLK, SETLK, SETLKW (locks.py holds
the table of lock owners and their open file descriptions).
"""

from __future__ import annotations

import fcntl
import os
import stat

from virtiofsd_py.fs.api import Context, Lock
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fs.passthrough.inodes import InodeData
from virtiofsd_py.fs.passthrough.open_files import HandleData


class LockOps(PassthroughCore):
    """GETLK, SETLK(W) and the lock owners' fds (also for migration)."""

    def _owner_fd(self, node: InodeData, h: HandleData, owner: int) -> int:
        accmode = h.flags & os.O_ACCMODE
        if stat.S_ISDIR(node.mode):
            accmode = os.O_RDONLY
        o = self.locks.owner_fd(
            node.nodeid, owner, accmode, lambda mode: self._reopen(node, mode | os.O_NONBLOCK)
        )
        return o.fd

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        h = self.handles.get(fh, nodeid)
        node = self._node(nodeid)
        return self.locks.getlk(self._owner_fd(node, h, owner), lock)

    def setlk(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        owner: int,
        lock: Lock,
        *,
        sleep: bool,
        flock: bool,
    ) -> None:
        h = self.handles.get(fh, nodeid)
        if flock:
            self.locks.flock(h.fd, lock.type, sleep=sleep)
            return
        node = self._node(nodeid)
        if lock.type == fcntl.F_UNLCK and (nodeid, owner) not in self.locks:
            return  # nothing held: do not open an OFD just to unlock it
        self.locks.setlk(self._owner_fd(node, h, owner), lock, sleep=sleep)

    def interrupt_waits(self) -> None:
        self.locks.interrupt()

    def lock_owner_fd(self, node: InodeData, owner: int, write: bool) -> int:
        """``owner``'s OFD on ``node`` (opened for writing if ``write``)."""
        accmode = os.O_RDWR if write and not stat.S_ISDIR(node.mode) else os.O_RDONLY
        o = self.locks.owner_fd(
            node.nodeid, owner, accmode, lambda mode: self._reopen(node, mode | os.O_NONBLOCK)
        )
        return o.fd
