"""Guest file locks as open file description (OFD) locks on the host.

POSIX record locks (fcntl F_SETLK...) belong to a process on a local disk;
the guest tells us the owner as ``lock_owner`` (fuse_lk_in.owner).  Each
(node, owner) pair gets its own host open file description, opened for the
purpose, and its locks are taken there with F_OFD_SETLK / F_OFD_GETLK
(fcntl(2), "Open file description locks").  So:

* two guest owners conflict with each other exactly as two local processes
  do (different OFDs), and one owner's locks merge and split as POSIX says;
* host processes and other guests sharing the directory see them: OFD locks
  and classic POSIX locks conflict with each other on the host;
* FLUSH with a lock_owner (the guest closed an fd) closes that owner's OFD,
  which releases all its locks on the file: POSIX close(2) semantics.

BSD flock(2) locks belong to the open file, so they go on the FUSE handle's
own fd (flock semantics follow the handle, and release when it is closed).

Waiting (SETLKW, blocking flock) never blocks in the kernel: a waiter polls
the non-blocking call with backoff (1 ms doubling to 50 ms) on a condition
variable that is notified whenever this daemon releases a lock, so waiters
inside the daemon retry at once and foreign holders are noticed within
50 ms.  ``interrupt()`` wakes every waiter with EINTR.  The price is no FIFO
fairness among waiters, which POSIX does not promise either.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable
from typing import Final

from virtiofsd_py.fs.api import Lock
from virtiofsd_py.fs.passthrough.mirror import TableMirror
from virtiofsd_py.fs.passthrough.owned import OwnedFd

OFFSET_MAX: Final = 0x7FFFFFFFFFFFFFFF
# struct flock (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid
_FLOCK = struct.Struct("@hhqqi4x")
_BACKOFF_START: Final = 0.001
_BACKOFF_MAX: Final = 0.05
_BUSY: Final = (errno.EAGAIN, errno.EACCES)


def flock_arg(lock: Lock) -> bytes:
    """``struct flock`` for F_OFD_SETLK/GETLK of ``lock``; EINVAL for a bad one."""
    if lock.type not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK):
        raise OSError(errno.EINVAL, f"lock type {lock.type}")
    if lock.start < 0 or lock.end < lock.start or lock.start > OFFSET_MAX:
        raise OSError(errno.EINVAL, f"lock range {lock.start}..{lock.end}")
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def _lock_of(raw: bytes) -> Lock:
    ltype, _whence, start, length, _pid = _FLOCK.unpack(raw)
    if ltype == fcntl.F_UNLCK:
        return Lock(0, 0, fcntl.F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    # OFD holders report pid -1 and a host pid means nothing in the guest.
    return Lock(start, end, ltype, 0)


class OwnerFd(OwnedFd):
    """One owner's OFD on one file; closed when the last user lets go."""

    __slots__ = ("writable",)

    def __init__(self, fd: int, writable: bool) -> None:
        super().__init__(fd)
        self.writable = writable


class LockTable:
    """Per-(node, owner) OFDs and interruptible lock waits.  Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[tuple[int, int], OwnerFd] = {}
        self._cond = threading.Condition()
        self._generation = 0
        #: Told how many owners there are after every change (mirror.py), if set.
        self._mirror: TableMirror | None = None

    def attach_mirror(self, mirror: TableMirror) -> None:
        """Report the number of owners to ``mirror`` from now on."""
        with self._lock:
            self._mirror = mirror
            mirror.lock_owners(len(self._owners))

    def detach_mirror(self) -> None:
        with self._lock:
            self._mirror = None

    def _report_locked(self) -> None:
        if self._mirror is not None:
            self._mirror.lock_owners(len(self._owners))

    # -- owners ---------------------------------------------------------------------
    def owner_fd(
        self, nodeid: int, owner: int, accmode: int, opener: Callable[[int], int]
    ) -> OwnerFd:
        """The OFD of ``owner`` on ``nodeid``, opened with ``opener(accmode)`` at first use."""
        key = (nodeid, owner)
        o = self._owners.get(key)
        if o is not None:
            return o
        fd = opener(accmode)
        new = OwnerFd(fd, accmode != os.O_RDONLY)
        with self._lock:
            o = self._owners.setdefault(key, new)
            self._report_locked()
        return o  # a racing opener's spare fd closes with ``new``

    def drop_owner(self, nodeid: int, owner: int) -> bool:
        """Close ``owner``'s OFD on ``nodeid`` (its POSIX locks go); whether it had one."""
        with self._lock:
            o = self._owners.pop((nodeid, owner), None)
            self._report_locked()
        if o is None:
            return False
        del o  # closes the fd once no running request uses it
        self._wake()
        return True

    def drop_node(self, nodeid: int) -> None:
        with self._lock:
            keys = [k for k in self._owners if k[0] == nodeid]
            dropped = [self._owners.pop(k) for k in keys]
            self._report_locked()
        if dropped:
            del dropped
            self._wake()

    def clear(self) -> None:
        with self._lock:
            dropped = self._owners
            self._owners = {}
            self._report_locked()
        del dropped
        self._wake()

    def __len__(self) -> int:
        return len(self._owners)

    def owners(self) -> list[tuple[tuple[int, int], OwnerFd]]:
        """A snapshot of ((nodeid, owner), OFD) pairs (for migration)."""
        with self._lock:
            return list(self._owners.items())

    def __contains__(self, key: object) -> bool:
        """Whether ``(nodeid, owner)`` has an OFD."""
        return key in self._owners

    # -- operations -------------------------------------------------------------------
    def getlk(self, fd: int, lock: Lock) -> Lock:
        """F_OFD_GETLK: the first lock that would conflict, or type F_UNLCK."""
        if lock.type == fcntl.F_UNLCK:
            raise OSError(errno.EINVAL, "GETLK of F_UNLCK")
        return _lock_of(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock_arg(lock)))

    def setlk(self, fd: int, lock: Lock, *, sleep: bool) -> None:
        """F_OFD_SETLK; with ``sleep``, wait (interruptibly) until it is granted."""
        arg = flock_arg(lock)
        self._take(lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg), sleep)
        if lock.type == fcntl.F_UNLCK:
            self._wake()

    def flock(self, fd: int, ltype: int, *, sleep: bool) -> None:
        """flock(2) on ``fd``: F_RDLCK -> LOCK_SH, F_WRLCK -> LOCK_EX, F_UNLCK -> LOCK_UN."""
        op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(ltype)
        if op is None:
            if ltype != fcntl.F_UNLCK:
                raise OSError(errno.EINVAL, f"lock type {ltype}")
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._wake()
            return
        nonblocking = op | fcntl.LOCK_NB
        self._take(lambda: fcntl.flock(fd, nonblocking), sleep)

    # -- waiting ----------------------------------------------------------------------
    def interrupt(self) -> None:
        """Every wait now in progress fails with EINTR; later waits are not affected."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _take(self, attempt: Callable[[], object], sleep: bool) -> None:
        """``attempt()`` to take a lock without blocking; with ``sleep``, again
        while it is held elsewhere (backing off) until it is granted or
        ``interrupt`` ends the wait."""
        with self._cond:
            generation = self._generation
        delay = _BACKOFF_START
        while True:
            try:
                attempt()
                return
            except OSError as e:
                if not sleep or e.errno not in _BUSY:
                    raise
            with self._cond:
                if self._generation == generation:
                    self._cond.wait(delay)
                if self._generation != generation:
                    raise OSError(errno.EINTR, "lock wait interrupted")
            delay = min(delay * 2, _BACKOFF_MAX)
