"""The passthrough backend: serve a host directory, confined to it.

Confinement rules (the guest is not trusted):

* Every host object is reached relative to an inode's O_PATH fd, one name
  at a time: ``openat(parent_fd, name, O_PATH | O_NOFOLLOW)``.  Names with
  ``/`` or NUL are refused, so a name never walks more than one step, and a
  symlink is never followed by the daemon (the guest resolves symlinks; we
  return their target bytes on READLINK).  ``..`` looked up at the root is
  the root.  (A directory that a host process moves out of the share takes
  its O_PATH fd along; only a sandbox -- mount namespace / chroot -- closes
  that gap, as for the Rust virtiofsd.)
* OPEN reopens the O_PATH fd through ``/proc/self/fd/N`` and only for
  regular files and directories: fifos, sockets and device nodes are never
  opened other than O_PATH (CVE-2020-35517); OPEN of one fails with EBADF as
  in the Rust virtiofsd (``is_safe_inode``).  Reopening a symlink's O_PATH
  fd fails with ELOOP in the kernel.
* An error of one request (EMFILE/ENFILE included, CVE-2020-10717) is raised
  to that request only and leaves the tables as they were.

Hot path: LOOKUP is openat + statx (attributes and mount id in one call);
GETATTR is one fstat; READ is one preadv straight into the guest buffers.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from .base import (
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    SessionInfo,
)
from .cache import CacheMode, CachePolicy
from .handles import HandleData, HandleTable
from .inodes import InodeData, InodeTable
from .linux import getdents64, stat_fd

FUSE_ATTR_SUBMOUNT: Final = 1 << 0  # fuse_attr.flags (fuse.h, 7.32)

_O_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# open(2) flags passed through to the host on OPEN; everything else (O_CREAT,
# O_EXCL, O_NOCTTY, O_NOFOLLOW, O_PATH, O_TMPFILE's extra bit, ...) is dropped.
_OPEN_PASS: Final = (
    os.O_ACCMODE
    | os.O_TRUNC
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_DIRECT
    | os.O_LARGEFILE
    | os.O_NOATIME
    | os.O_DIRECTORY
)
_O_TMPFILE_BIT: Final = os.O_TMPFILE & ~os.O_DIRECTORY
_SEEK_WHENCE: Final = frozenset((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE))
_DIRENT_BUF: Final = 8192
_DOTS: Final = (b".", b"..")


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


def check_name(name: bytes) -> None:
    """Refuse names that are not one path component (FUSE sends single names)."""
    if not name:
        raise _err(errno.ENOENT, "empty name")
    if b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL, f"invalid name {name!r}")


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    """What the passthrough backend serves and how (``virtiofsd`` options)."""

    shared_dir: str | os.PathLike[str]
    cache: CacheMode = "auto"
    readonly: bool = False
    #: Extended attributes; off by default as in the Rust virtiofsd (ENOSYS).
    xattr: bool = False
    #: Flag directories on another mount with FUSE_ATTR_SUBMOUNT.
    announce_submounts: bool = False
    #: Honour the guest's O_DIRECT (the Rust virtiofsd drops it by default).
    allow_direct_io: bool = False
    #: Keep the guest's O_NOATIME (dropped by default: it needs file ownership).
    preserve_noatime: bool = False
    #: Where this process's fds appear (changes once a sandbox pivots root).
    proc_self_fd: str = "/proc/self/fd"


class PassthroughFS(Filesystem):
    """``Filesystem`` over a host directory.  Thread-safe."""

    def __new__(cls, config: PassthroughConfig) -> PassthroughFS:
        if config.readonly and not cls.readonly:
            cls = ReadOnlyPassthroughFS
        return super().__new__(cls)

    def __init__(self, config: PassthroughConfig) -> None:
        self.config = config
        self.policy = CachePolicy.from_mode(config.cache)
        self._entry_timeout = self.policy.entry_timeout
        self._attr_timeout = self.policy.attr_timeout
        self._file_open_flags = self.policy.file_open_flags
        self._dir_open_flags = self.policy.dir_open_flags
        self._proc_prefix = config.proc_self_fd.rstrip("/") + "/"
        self._drop_flags = (0 if config.allow_direct_io else os.O_DIRECT) | (
            0 if config.preserve_noatime else os.O_NOATIME
        )
        self.session: SessionInfo | None = None
        path = os.fspath(config.shared_dir)
        try:
            root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"shared directory {path!r}: {e.strerror}", path) from None
        try:
            self._proc_fd = os.open(config.proc_self_fd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(root_fd)
            raise
        st, mnt_id = stat_fd(root_fd)
        root = InodeData(ROOT_ID, root_fd, (st.st_dev, st.st_ino, mnt_id), st.st_mode, 0, b"")
        self.inodes = InodeTable(root)
        self.handles = HandleTable()

    def close(self) -> None:
        """Close every fd, the root's included (for tests and shutdown)."""
        self.destroy()
        self.inodes.root.close()
        if self._proc_fd >= 0:
            os.close(self._proc_fd)
            self._proc_fd = -1

    # -- helpers ---------------------------------------------------------
    def _node(self, nodeid: int) -> InodeData:
        node = self.inodes.get(nodeid)
        if node is None:
            raise _err(errno.EBADF, f"no node {nodeid}")
        return node

    def _entry(self, node: InodeData, st: os.stat_result, attr_flags: int = 0) -> Entry:
        return Entry(node.nodeid, 0, st, self._entry_timeout, self._attr_timeout, attr_flags)

    def _reopen(self, node: InodeData, flags: int) -> int:
        """A real fd for ``node`` (regular file or directory only) via /proc/self/fd."""
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise _err(errno.EBADF, "not a regular file or directory")
        return os.open(str(node.fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd)

    # -- session ---------------------------------------------------------
    def init(self, session: SessionInfo) -> None:
        self.session = session

    def destroy(self) -> None:
        self.handles.clear()
        self.inodes.clear()

    # -- names -----------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        check_name(name)
        p = self._node(parent)
        if parent == ROOT_ID and name == b"..":
            name = b"."
        fd = os.open(name, _O_PATH_FLAGS, dir_fd=p.fd)
        try:
            st, mnt_id = stat_fd(fd)
            node, taken = self.inodes.add_lookup(
                fd, (st.st_dev, st.st_ino, mnt_id), st.st_mode, parent, name
            )
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
        attr_flags = 0
        if (
            self.config.announce_submounts
            and stat.S_ISDIR(st.st_mode)
            and (st.st_dev != p.key[0] or mnt_id != p.key[2])
        ):
            attr_flags = FUSE_ATTR_SUBMOUNT
        return self._entry(node, st, attr_flags)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inodes.forget(nodeid, nlookup)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.inodes.forget_many(items)

    # -- attributes ------------------------------------------------------
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        if fh is not None:
            h = self.handles.get(fh, nodeid)
            return AttrReply(os.stat(h.fd), self._attr_timeout)
        node = self._node(nodeid)
        return AttrReply(os.stat(node.fd), self._attr_timeout)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        node = self._node(nodeid)
        return os.fstatvfs(node.fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        node = self._node(nodeid)
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL, "not a symlink")
        return os.readlink(b"", dir_fd=node.fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Permission check of the mode bits for ``ctx`` as the host kernel does it.

        POSIX classes (owner, else group incl. supplementary groups, else
        other); uid 0 passes reads and writes, and executes when any x bit is
        set or the node is a directory.  ACLs are not consulted.  (Issue 3:
        run the check under the request's effective ids instead.)
        """
        node = self._node(nodeid)
        st = os.stat(node.fd)
        want = mask & (os.R_OK | os.W_OK | os.X_OK)
        if want & os.W_OK and self.readonly:
            raise _err(errno.EROFS, "read-only share")
        if want == os.F_OK:
            return
        mode = st.st_mode
        if ctx.uid == 0:
            if want & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
                raise _err(errno.EACCES, "access")
            return
        if st.st_uid == ctx.uid:
            bits = (mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in ctx.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if want & ~bits:
            raise _err(errno.EACCES, "access")

    # -- files -----------------------------------------------------------
    def _check_open_flags(self, flags: int) -> None:
        """Refusals of the read-only share (issue 3 adds the write path)."""

    def _open(self, nodeid: int, flags: int, cache_flags: int) -> Opened:
        self._check_open_flags(flags)
        node = self._node(nodeid)
        host_flags = flags & _OPEN_PASS & ~self._drop_flags
        fd = self._reopen(node, host_flags)
        h = self.handles.add(nodeid, fd, flags)
        return Opened(h.fh, cache_flags)

    def open(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        # As the Rust virtiofsd: cache flags follow O_DIRECTORY, not the node type.
        cache = self._dir_open_flags if flags & os.O_DIRECTORY else self._file_open_flags
        return self._open(nodeid, flags, cache)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        h = self.handles.get(fh, nodeid)
        if not bufs:
            return 0
        return os.preadv(h.fd, bufs, offset)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        # What close(2) of the guest's fd means on the host: close a dup, so
        # close-time work (NFS flush, lock release) happens now.
        h = self.handles.get(fh, nodeid)
        os.close(os.dup(h.fd))

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.handles.remove(fh, nodeid)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence not in _SEEK_WHENCE:
            raise _err(errno.EINVAL, f"lseek whence {whence}")
        h = self.handles.get(fh, nodeid)
        return os.lseek(h.fd, offset, whence)

    # -- directories -----------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        return self._open(nodeid, flags | os.O_DIRECTORY, self._dir_open_flags)

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
        buf = bytearray(_DIRENT_BUF)
        cookie = offset
        while True:
            with h.lock:  # the fd's position is shared by every READDIR on it
                os.lseek(h.fd, cookie, os.SEEK_SET)
                batch = getdents64(h.fd, buf)
            if not batch:
                return
            for d in batch:
                cookie = d.off
                entry = None
                if plus and d.name not in _DOTS:
                    try:
                        entry = self.lookup(ctx, h.nodeid, d.name)
                    except FileNotFoundError:
                        continue
                yield DirEntry(d.ino, d.off, d.type, d.name, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.handles.remove(fh, nodeid)

    # -- extended attributes --------------------------------------------
    def _xattr_path(self, nodeid: int, name: bytes | None) -> tuple[str, InodeData]:
        if not self.config.xattr:
            raise _err(errno.ENOSYS, "xattr support is off")
        if name is not None and (not name or b"\0" in name):
            raise _err(errno.EINVAL, f"invalid xattr name {name!r}")
        node = self._node(nodeid)
        # f*xattr() refuse O_PATH fds; the /proc/self/fd/N magic link names
        # the inode itself (a symlink's own xattrs, a device node's without
        # opening it), so one path call serves every file type.
        return self._proc_prefix + str(node.fd), node

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        path, node = self._xattr_path(nodeid, name)
        value = os.getxattr(path, name)
        del node
        return value

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        path, node = self._xattr_path(nodeid, None)
        names = os.listxattr(path)
        del node
        return b"".join(os.fsencode(n) + b"\0" for n in names)


class ReadOnlyPassthroughFS(PassthroughFS):
    """``--readonly``: every request that could change the share gets EROFS."""

    readonly = True

    def _check_open_flags(self, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (
            os.O_TRUNC | os.O_CREAT | os.O_EXCL | _O_TMPFILE_BIT
        ):
            raise _err(errno.EROFS, "read-only share")
