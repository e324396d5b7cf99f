"""``--inode-file-handles``: nodes kept as file handles instead of O_PATH fds.

Why: a node that holds an O_PATH fd costs one fd for as long as the guest
remembers it, so a guest that walks a big tree runs into RLIMIT_NOFILE.  A
file handle (``name_to_handle_at(2)``) names the inode without holding
anything open; the fd is made again with ``open_by_handle_at(2)`` for the
length of one operation (``InodeData.opened``).

``open_by_handle_at`` takes a *mount fd*: any fd on the mount the handle
was made on, except an O_PATH one (the kernel's fdget refuses those).  One
``MountFd`` per mount id is opened from a node on that mount, O_RDONLY
through its /proc/self/fd magic link -- the shared directory for the root
mount, the first directory (or regular file) the guest finds on a submount.

Lifetime: every handle node holds a reference on its ``MountFd``, and the
registry keeps only weak references, so a mount fd closes once no node of
that mount is left (as the Rust virtiofsd's ``MountFds``): a submount the
guest has forgotten does not stay busy because of us.  The root mount's fd
is pinned for the daemon's life.

Modes (as the Rust virtiofsd): ``never`` -- fds only; ``prefer`` -- a handle
when the file system makes one and the daemon may open it
(CAP_DAC_READ_SEARCH), else an fd for that node (logged once);
``mandatory`` -- refuse to start when the shared directory cannot be served
by handle, and fail a lookup whose handle cannot be made with EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import weakref
from typing import Final, Literal

from virtiofsd_py.fs.passthrough.owned import OwnedFd
from virtiofsd_py.host import syscalls

log = logging.getLogger("virtiofsd_py.passthrough")

InodeFileHandles = Literal["never", "prefer", "mandatory"]
MODES: Final = ("never", "prefer", "mandatory")


class FileHandleError(OSError):
    """The shared directory cannot be served with ``--inode-file-handles=mandatory``."""

    def __str__(self) -> str:
        return str(self.strerror)


class MountFd(OwnedFd):
    """A non-O_PATH fd on one mount, closed when the last node using it dies."""

    __slots__ = ("__weakref__", "mnt_id")

    def __init__(self, fd: int, mnt_id: int) -> None:
        super().__init__(fd)
        self.mnt_id = mnt_id

    def open(self, handle: bytes, flags: int) -> int:
        """``open_by_handle_at(self.fd, handle, flags)``."""
        return syscalls.open_by_handle(self.fd, handle, flags | os.O_CLOEXEC)

    def __repr__(self) -> str:
        return f"MountFd(fd={self.fd}, mnt_id={self.mnt_id})"


#: A handle node's identity: the file handle and the mount it opens on.
NodeHandle = tuple[bytes, MountFd]


class InodeHandles:
    """Makes the file handle of a new node, per the ``--inode-file-handles`` mode.

    Thread-safe.  ``proc_prefix`` names /proc/self/fd as the backend does
    (it moves under a sandbox).
    """

    def __init__(self, mode: InodeFileHandles, root_fd: int, proc_prefix: str) -> None:
        if mode not in MODES:
            raise ValueError(f"--inode-file-handles {mode!r}")
        self.mode: InodeFileHandles = mode
        self._proc_prefix = proc_prefix
        self._lock = threading.Lock()
        self._mounts: weakref.WeakValueDictionary[int, MountFd] = weakref.WeakValueDictionary()
        self._root_mount: MountFd | None = None
        self._warned: set[str] = set()
        #: Whether nodes get handles at all (off in ``never`` mode and when
        #: ``prefer`` found at start that the share cannot do them).
        self.enabled = mode != "never"
        if self.enabled:
            self._check_root(root_fd)

    def _check_root(self, root_fd: int) -> None:
        """Make and open the shared directory's own handle once: can we work at all?"""
        try:
            handle, mnt_id = syscalls.name_to_handle(root_fd)
            mount = self._mount_for(root_fd, mnt_id, stat.S_IFDIR)
            os.close(mount.open(handle, syscalls.O_PATH_NOFOLLOW))
        except OSError as e:
            why = _why(e)
            if self.mode == "mandatory":
                raise FileHandleError(
                    e.errno,
                    f"--inode-file-handles=mandatory: the shared directory cannot be served "
                    f"by file handle: {why}",
                ) from None
            log.warning("--inode-file-handles=prefer: using fds for every inode: %s", why)
            self.enabled = False
            return
        self._root_mount = mount  # pinned: the root mount is needed for the daemon's life

    def make(self, fd: int, mode: int) -> NodeHandle | None:
        """(handle, mount fd) for the node ``fd`` (an O_PATH fd), or None to keep ``fd``.

        None only in ``prefer`` mode (logged once per reason); ``mandatory``
        raises EIO instead.
        """
        try:
            handle, mnt_id = syscalls.name_to_handle(fd)
            return handle, self._mount_for(fd, mnt_id, mode)
        except OSError as e:
            why = _why(e)
            if self.mode == "mandatory":
                log.error("--inode-file-handles=mandatory: no file handle: %s", why)
                raise OSError(errno.EIO, f"no file handle for the inode: {why}") from None
            if why not in self._warned:
                self._warned.add(why)
                log.warning("--inode-file-handles=prefer: an inode keeps an fd: %s", why)
            return None

    def _mount_for(self, fd: int, mnt_id: int, mode: int) -> MountFd:
        with self._lock:
            mount = self._mounts.get(mnt_id)
            if mount is not None:
                return mount
            # Never open a fifo or device (CVE-2020-35517); a symlink cannot be opened.
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise OSError(errno.EOPNOTSUPP, f"no mount fd for mount {mnt_id} yet")
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
            mount = MountFd(os.open(self._proc_prefix + str(fd), flags), mnt_id)
            self._mounts[mnt_id] = mount
            return mount

    def mounts(self) -> int:
        """How many mount fds are open (for tests)."""
        return len(self._mounts)


def _why(e: OSError) -> str:
    if e.errno == errno.EPERM:
        return "open_by_handle_at needs CAP_DAC_READ_SEARCH"
    if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
        return f"the file system has no file handles ({os.strerror(e.errno)})"
    return e.strerror or str(e)
