"""Per-thread credentials, capabilities and umask for requests run as the guest's user.

Why raw syscalls: glibc's ``setresuid``/``setresgid``/``setgroups`` (and so
Python's ``os.setresuid`` ...) change the credentials of *every* thread of
the process (the "setxid" broadcast POSIX asks for).  The kernel keeps
credentials per thread, and the raw syscalls change only the calling
thread's.  A request switches its own thread to the guest's ids, runs, and
switches back before the thread serves anything else, so requests running
at the same time in other threads (and the event-loop thread) never see
each other's ids.

Only the *effective* ids change (real and saved stay 0), so the thread keeps
its permitted capabilities and can switch back; the kernel clears the
effective capability set while the effective uid is not 0 (capabilities(7),
"Effect of user ID changes on capabilities") and restores it from the
permitted set when it returns to 0.

What runs under the guest's credentials (the same choice as the Rust
virtiofsd, ``passthrough/mod.rs``): the operations that create a node
(CREATE, MKNOD, MKDIR, SYMLINK, TMPFILE), so that the new node belongs to the
guest user and the host kernel checks the right to create it.  The guest
mounts virtio-fs with ``default_permissions``: its kernel has already checked
every other operation against the attributes we returned, with the process's
full group list, which the daemon does not know (FUSE_EXT_GROUPS carries at
most the one supplementary group that owns the parent directory, and only for
creation, FUSE_CREATE_SUPP_GROUP).  Re-checking those operations on the host
under incomplete groups would refuse what a local disk allows.  For the same
reason, when the guest did not negotiate FUSE_CREATE_SUPP_GROUP, creation
keeps CAP_DAC_OVERRIDE in the effective set (as the Rust virtiofsd does):
ownership is the guest's, the directory permission check was the guest's.

Cost (measured on the 2-core development VM, ctypes calls included): a
switch and restore of uid+gid is about 13 us (4 syscalls), about 21 us with
a supplementary group or with CAP_DAC_OVERRIDE kept (capget/capset); the
per-thread umask adds about 2 syscalls.  Only creating requests with a
non-root uid or gid pay it; the rest of the hot path (LOOKUP, GETATTR, READ,
WRITE) never switches.  ``test_credentials_restore_on_error_and_cost``
prints the number.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Final

from virtiofsd_py.host import syscalls
from virtiofsd_py.host.capabilities import set_thread_caps, thread_caps

log = logging.getLogger(__name__)

_CLONE_FS: Final = 0x200

#: Only root switches; an unprivileged daemon owns everything it creates.
IS_ROOT: Final = os.geteuid() == 0

# capabilities(7) numbers used here
CAP_DAC_OVERRIDE: Final = 1
CAP_FSETID: Final = 4


def _set_ids(gid: bool, eid: int) -> None:
    (syscalls.thread_set_egid if gid else syscalls.thread_set_euid)(eid)


def _set_groups(groups: tuple[int, ...]) -> None:
    syscalls.thread_set_groups(groups)


def _set_effective_cap(cap: int, on: bool) -> bool:
    """Turn ``cap`` on/off in this thread's effective set; whether it changed."""
    data = thread_caps()
    word, bit = divmod(cap, 32)
    mask = 1 << bit
    if bool(data[word].effective & mask) == on:
        return False
    if on and not data[word].permitted & mask:
        return False
    if on:
        data[word].effective |= mask
    else:
        data[word].effective &= ~mask
    set_thread_caps(data)
    return True


def has_effective_cap(cap: int) -> bool:
    """Whether this thread has ``cap`` in its effective set now."""
    data = thread_caps()
    word, bit = divmod(cap, 32)
    return bool(data[word].effective & (1 << bit))


def _restore_failed(e: BaseException) -> None:
    # A thread left running with a guest's credentials would serve the next
    # request with them: that must never happen, so stop the daemon.
    log.critical("could not restore the daemon's credentials: %s; aborting", e)
    os.abort()


class DropCap:
    """``with DropCap(CAP_FSETID):`` run without one effective capability.

    Used for FUSE_WRITE_KILL_SUIDGID / FATTR_KILL_SUIDGID: without CAP_FSETID
    the host kernel clears the setuid/setgid bits on write and truncate as it
    does for an unprivileged writer.
    """

    __slots__ = ("cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.dropped = False

    def __enter__(self) -> DropCap:
        self.dropped = _set_effective_cap(self.cap, False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dropped:
            try:
                _set_effective_cap(self.cap, True)
            except OSError as e:
                _restore_failed(e)


class _FsLocal(threading.local):
    unshared: bool = False


_fs_local = _FsLocal()


def _own_fs_struct() -> bool:
    """Give this thread its own umask/cwd (unshare(CLONE_FS)); once per thread."""
    if not _fs_local.unshared:
        try:
            syscalls.unshare(_CLONE_FS)
        except OSError:
            return False
        _fs_local.unshared = True
    return True


class Umask:
    """``with Umask(m):`` this thread's umask is ``m`` for the block.

    The creating guest process's umask (fuse_create_in / mknod_in / mkdir_in)
    applies on the host, so a default ACL on the parent takes precedence as it
    does on a local disk.  The umask is per fs_struct, shared by all threads,
    so each thread first gets its own (unshare(CLONE_FS), which the Rust and C
    virtiofsd also do per worker thread).  If that is impossible the mode is
    masked by hand instead (``mode()``).
    """

    __slots__ = ("old", "umask")

    def __init__(self, umask: int) -> None:
        self.umask = umask & 0o777
        self.old: int | None = None

    def mode(self, mode: int) -> int:
        """``mode`` to pass to the syscall inside the block."""
        return mode if self.old is not None else mode & ~self.umask

    def __enter__(self) -> Umask:
        if _own_fs_struct():
            self.old = os.umask(self.umask)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            os.umask(self.old)


class Credentials:
    """``with Credentials(uid, gid, groups, keep_dac_override):`` run as the guest user.

    A no-op when the daemon is not root or the ids are 0 (the guest's root
    acts as the daemon's root, as in the Rust virtiofsd).  ``groups`` are the
    supplementary groups to hold (FUSE_EXT_GROUPS); the daemon itself holds
    none (``drop_supplementary_groups`` at startup, CVE-2022-0358).
    """

    __slots__ = ("dac", "gid", "groups", "set_gid", "set_groups", "set_uid", "uid")

    def __init__(
        self, uid: int, gid: int, groups: tuple[int, ...] = (), keep_dac_override: bool = False
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.dac = keep_dac_override
        self.set_uid = self.set_gid = self.set_groups = False

    def __enter__(self) -> Credentials:
        if not IS_ROOT:
            return self
        try:
            if self.groups:
                _set_groups(self.groups)
                self.set_groups = True
            if self.gid != 0:
                _set_ids(True, self.gid)
                self.set_gid = True
            if self.uid != 0:
                _set_ids(False, self.uid)
                self.set_uid = True
                if self.dac:
                    _set_effective_cap(CAP_DAC_OVERRIDE, True)
        except OSError as e:
            self.__exit__()
            raise OSError(e.errno or errno.EPERM, f"switching to the guest's ids: {e}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.set_uid:  # first: back to euid 0 restores the capabilities
                _set_ids(False, 0)
                self.set_uid = False
            if self.set_gid:
                _set_ids(True, 0)
                self.set_gid = False
            if self.set_groups:
                _set_groups(())
                self.set_groups = False
        except OSError as e:
            _restore_failed(e)


def thread_ids() -> tuple[int, int, tuple[int, ...]]:
    """(euid, egid, groups) of the calling thread (for tests).

    The get*id/getgroups system calls answer for the calling thread (only
    glibc's set* wrappers act on the whole process), and need no /proc.
    """
    return os.geteuid(), os.getegid(), tuple(sorted(os.getgroups()))


def drop_supplementary_groups() -> None:
    """Drop the daemon's own supplementary groups, in every thread (CVE-2022-0358).

    Otherwise a file the guest creates in a setgid directory, or any
    permission check, could use a group the operator's root shell had.
    """
    if IS_ROOT:
        os.setgroups([])
