"""``LockRestorer``: the guest's locks taken again on the destination.

POSIX record locks go on the owner's OFD of the node, flock(2) locks on the
handle's own fd, as the source held them (locks.py).  On one host the
source daemon holds them until it exits, so each is retried, with backoff,
until it is free or a deadline passes; a lock that cannot be had by then
is logged.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import time

from virtiofsd_py.fs.api import Lock
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.locks import flock_arg
from virtiofsd_py.fs.passthrough.migration.background import Background
from virtiofsd_py.fs.passthrough.migration.schema import LockState

log = logging.getLogger("virtiofsd_py.migration")


class LockRestorer(Background):
    """Takes the guest's locks again, waiting while the source still holds them
    (``PassthroughFS.lock_restorer``, a ``hooks.Stoppable``)."""

    name = "vfsd-lock-restore"

    def __init__(
        self, fs: PassthroughFS, locks: tuple[LockState, ...], timeout: float = 120.0
    ) -> None:
        super().__init__()
        self.fs = fs
        self.locks = locks
        self.timeout = timeout

    def _run(self) -> None:
        pending = list(self.locks)
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while pending and time.monotonic() < deadline:
            pending = [lk for lk in pending if not self._try(lk)]
            if pending and self._stop.wait(delay):
                return
            delay = min(delay * 2, 0.2)
        for lk in pending:
            log.error(
                "migration: could not re-take a lock on inode %d (owner %#x)", lk.inode, lk.owner
            )
        if not pending and self.locks:
            log.info("migration: %d guest locks re-taken", len(self.locks))

    def _try(self, lk: LockState) -> bool:
        """Whether ``lk`` is settled: taken, or never to be (its node is gone, an error)."""
        fs = self.fs
        node = fs.inodes.get(lk.inode)
        if node is None or not node.usable:
            return True  # forgotten meanwhile: nothing to hold
        try:
            if lk.flock:
                h = fs.handles.get(lk.owner, lk.inode)
                op = fcntl.LOCK_EX if lk.type == fcntl.F_WRLCK else fcntl.LOCK_SH
                fcntl.flock(h.fd, op | fcntl.LOCK_NB)
            else:
                fd = fs.lock_owner_fd(node, lk.owner, lk.type == fcntl.F_WRLCK)
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_arg(Lock(lk.start, lk.end, lk.type)))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            log.error("migration: lock on inode %d: %s", lk.inode, e)
            return True
        return True
