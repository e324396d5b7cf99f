"""A budget of file descriptors the guest may make the daemon hold.

Every node the guest looks up keeps an O_PATH fd, every open file or
directory one more.  Without a cap a guest can use up RLIMIT_NOFILE, and
then the daemon can no longer accept a vhost-user message with fds, open a
migration state pipe or reopen a file for its own bookkeeping.  The budget
is RLIMIT_NOFILE minus a reserve for the daemon itself; past it, guest
requests that would take an fd fail with ENFILE (as in the Rust
virtiofsd's ``guest_fd_limit.rs``: "no more file descriptors available to
the guest", an errno the guest's programs understand) and the daemon keeps
working.

Thread-safe: requests run on worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import threading
from typing import Final

log = logging.getLogger(__name__)

#: fds kept for the daemon: the socket, eventfds (2 per queue, up to 17
#: queues), memory regions (up to 509 with CONFIGURE_MEM_SLOTS, closed once
#: mapped but transiently open), migration pipes, logging, Python itself.
DEFAULT_RESERVE: Final = 1024

#: fd table slots made at start-up (``reserve_fd_table``): a guest holding
#: up to this many fds never waits for the table to grow.
FD_TABLE_AT_START: Final = 16384


def reserve_fd_table(count: int) -> None:
    """Grow this process's fd table to ``count`` slots (at most RLIMIT_NOFILE) now.

    The kernel doubles the table as fds are opened, and in a multi-threaded
    process each grow waits for an RCU grace period (``expand_fdtable``),
    5-15 ms on the lab machine: the request or migration load that opens
    fd 256, 512, ... 8192 stalls that long, six times on the way to 10,000
    fds.  One grow to the size needed waits once (and not at all before the
    first thread starts).  Best effort: nothing happens if it fails.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        count = min(count, soft)
    if count <= 1:
        return
    try:
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # The lowest free fd from count - 1 up: never one in use (unlike dup2).
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, count - 1))
    except OSError:
        pass
    finally:
        os.close(fd)


class FdBudget:
    """Counts fds held for the guest; :meth:`take` refuses past the limit."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"fd budget must be positive, got {limit}")
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_rlimit(cls, reserve: int = DEFAULT_RESERVE) -> FdBudget:
        """RLIMIT_NOFILE (soft) minus ``reserve``, but at least a quarter of it."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return cls(max(soft - reserve, soft // 4, 1))

    @property
    def used(self) -> int:
        return self._used

    def take(self, n: int = 1) -> None:
        """Account for ``n`` more guest fds, or raise ENFILE without taking any."""
        with self._lock:
            if self._used + n > self.limit:
                if not self._warned:
                    self._warned = True
                    log.error(
                        "the guest holds %d file descriptors, the most it may (%d): "
                        "requests get ENFILE; consider a higher --rlimit-nofile",
                        self._used,
                        self.limit,
                    )
                raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))
            self._used += n

    def give_back(self, n: int = 1) -> None:
        with self._lock:
            if n > self._used:
                raise ValueError(f"returning {n} fds, only {self._used} taken")
            self._used -= n
            if self._used < self.limit * 9 // 10:
                self._warned = False

    def open(
        self, path: str | bytes, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        """``os.open`` counted against the budget (give it back when closing)."""
        self.take()
        try:
            return os.open(path, flags, mode, dir_fd=dir_fd)
        except BaseException:
            self.give_back()
            raise

    def close(self, fd: int) -> None:
        """``os.close`` of an fd from :meth:`open`."""
        try:
            os.close(fd)
        finally:
            self.give_back()
