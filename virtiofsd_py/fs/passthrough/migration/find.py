"""``NodeFinder``: the nodes of one migrated state found again on this host.

A node is opened by file handle (when the state has one and this daemon may
use them) or by path, one component at a time with O_NOFOLLOW from the
share, so a hostile state cannot reach outside it; then its identity is
checked.  The load finds its nodes this way, and ``DeferredNodes`` the ones
it leaves for after the switch-over, with the same finder.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from virtiofsd_py.fs.passthrough.file_handles import NodeHandle
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeKey
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.schema import (
    InodeState,
    MigrationError,
    PassthroughState,
)
from virtiofsd_py.host import syscalls

_S_IFMT = 0o170000
#: Last path components that are not a name in the directory before them.
_NOT_NAMES = frozenset((b"", b".", b".."))

#: What finding a node gives: fd (-1 when kept as a handle), key, mode, handle.
Found = tuple[int, InodeKey, int, NodeHandle | None]


class NodeFinder:
    """Finds nodes of ``state`` on this host; not thread-safe (callers serialise)."""

    def __init__(self, fs: PassthroughFS, cfg: MigrationConfig, state: PassthroughState) -> None:
        self.fs = fs
        self.cfg = cfg
        root_key = state.root_key
        #: The state is from this host and file system: its keys and file
        #: handles name the inodes they named on the source.
        self.same_fs = (
            state.host == socket.gethostname()
            and root_key is not None
            and root_key[:2] == fs.inodes.root.key[:2]
        )
        self.mount_fd = -1
        #: Why nodes (and handles) could not be found, for the log.
        self.failed: list[str] = []
        #: Path -> the directory nodes found so far with an fd (b"": the share):
        #: a child is then one openat away instead of a walk.
        self.dirs: dict[bytes, InodeData] = {b"": fs.inodes.root}
        handles = fs.file_handles
        self._make_handle = handles.make if handles.enabled else None

    def find(self, i: InodeState) -> Found:
        """Open and check the node ``i`` describes: OSError or MigrationError if it
        cannot be found.  With ``--inode-file-handles`` the result keeps the handle
        and no fd (the fd is closed)."""
        fd = self._open(i)
        try:
            mode, key = self._check_identity(fd, i)
            handle = self._make_handle(fd, mode) if self._make_handle is not None else None
        except BaseException:
            os.close(fd)
            raise
        if handle is not None:
            os.close(fd)
            fd = -1
        return fd, key, mode, handle

    def failed_to_find(self, i: InodeState, e: Exception) -> None:
        """Record (guest-error) or raise (abort) that the node ``i`` was not found."""
        if self.cfg.on_error == "abort":
            raise MigrationError(self.reason(i, e)) from None
        self.failed.append(self.reason(i, e))

    @staticmethod
    def reason(i: InodeState, e: Exception) -> str:
        if i.path is not None:
            where = i.path.decode("utf-8", "backslashreplace")
        else:
            where = "unlinked" if i.unlinked else "no path"
        return f"inode {i.id} ({where}): {e}"

    def remember_dir(self, node: InodeData, i: InodeState) -> None:
        """Children of a directory found with an fd are then opened from it."""
        if node.mode & _S_IFMT == stat.S_IFDIR and node.fd >= 0 and i.path is not None:
            self.dirs[i.path] = node

    def close(self) -> None:
        self.dirs.clear()
        fd, self.mount_fd = self.mount_fd, -1
        if fd >= 0:
            os.close(fd)

    def _open(self, i: InodeState) -> int:
        problems = ""
        if i.handle is not None:
            try:
                return self._by_handle(i.handle)
            except OSError as e:
                problems = f"file handle: {e.strerror or e}; "
        if i.path is not None:
            try:
                return self._by_path(i.path)
            except OSError as e:
                problems += f"path {i.path!r}: {e.strerror or e}"
            except ValueError as e:  # a NUL byte: no such name
                problems += f"path {i.path!r}: {e}"
        raise MigrationError(problems.removesuffix("; ") or "neither a path nor a file handle")

    def _mount_fd(self) -> int:
        if self.mount_fd < 0:
            self.mount_fd = os.open(
                os.fspath(self.fs.config.shared_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        return self.mount_fd

    def _by_handle(self, handle: bytes) -> int:
        if not syscalls.well_formed_handle(handle):
            raise OSError(errno.EINVAL, "malformed file handle")
        fd = syscalls.open_by_handle(self._mount_fd(), handle, os.O_PATH | os.O_NOFOLLOW)
        # A file handle names any file of the file system: keep only what lies
        # inside the share (or is unlinked, reachable only through open fds).
        try:
            if os.fstat(fd).st_nlink != 0 and self.fs.share_path(fd) is None:
                raise OSError(errno.EACCES, "file handle names a file outside the shared directory")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _by_path(self, path: bytes) -> int:
        """``open_beneath`` from the share, or from the node of the path's
        directory when it was found already (it was found the same strict way)."""
        parent, _, name = path.rpartition(b"/")
        dir_node = self.dirs.get(parent)
        dir_fd = dir_node.fd if dir_node is not None else -1
        if dir_fd < 0 or name in _NOT_NAMES or path[:1] == b"/":
            return syscalls.open_beneath(self.fs.inodes.root.fd, path)
        return os.open(name, syscalls.O_PATH_NOFOLLOW, dir_fd=dir_fd)

    def _check_identity(self, fd: int, i: InodeState) -> tuple[int, InodeKey]:
        """The mode and key of ``fd``, once it is known to be the node ``i`` describes."""
        mode, dev, ino, mnt_id = syscalls.stat_identity(fd)
        if (mode ^ i.mode) & _S_IFMT:
            raise MigrationError(
                f"file type {mode & _S_IFMT:o} is not the source's {i.mode & _S_IFMT:o}"
            )
        if self.same_fs:
            if i.key is None:
                raise MigrationError("the state gives no (st_dev, st_ino) to check it against")
            if i.key[0] != dev or i.key[1] != ino:
                raise MigrationError("found a different inode than the source had")
        if self.cfg.verify_handles and i.handle != syscalls.name_to_handle(fd)[0]:
            raise MigrationError("file handle differs from the source's")
        return mode, (dev, ino, mnt_id)
