"""``--readonly`` as a wrapper: any backend served, every change refused with EROFS.

An ability as a type of its own (as the Rust virtiofsd's
``passthrough/read_only.rs``): ``ReadOnlyFS(inner)`` forwards every request
that only reads to ``inner`` and answers every request that would change the
share with EROFS before ``inner`` sees it, so no backend has to test a
read-only flag on its write paths, and a writable share pays nothing.

What counts as a change: creating, removing or renaming names; SETATTR,
WRITE, FALLOCATE, COPY_FILE_RANGE; SETXATTR and REMOVEXATTR; OPEN (and
CREATE) for writing, truncating, creating or O_TMPFILE; ACCESS for W_OK
(checked after the node is found, as access(2) would); FS_IOC_SETFLAGS.
Other ioctls than FS_IOC_GETFLAGS are ENOTTY: their direction is unknown
here.  Locks, fsync and syncfs change no contents and are forwarded.

Attributes that are not part of the ``Filesystem`` seam (the cache policy,
``close()``, the backend's tables) are the inner backend's, looked up on it
(``__getattr__``), and so is live migration: the backend's state moves, the
share's contents do not change.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from typing import Any, Final

from virtiofsd_py.fs.api import (
    FS_IOC_GETFLAGS,
    FS_IOC_SETFLAGS,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SessionInfo,
    SetAttr,
    StatxReply,
    fs_error,
)

#: open(2) flags that would change the file: O_TMPFILE less its O_DIRECTORY bit.
_CHANGING_OPEN: Final = os.O_TRUNC | os.O_CREAT | os.O_EXCL | (os.O_TMPFILE & ~os.O_DIRECTORY)


def _erofs() -> OSError:
    return fs_error(errno.EROFS, "read-only share")


def _check_open(flags: int) -> None:
    if flags & os.O_ACCMODE != os.O_RDONLY or flags & _CHANGING_OPEN:
        raise _erofs()


class ReadOnlyFS(Filesystem):
    """``inner`` with every change refused (EROFS); see the module docstring."""

    readonly = True

    def __init__(self, inner: Filesystem) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- session -----------------------------------------------------------
    def init(self, session: SessionInfo) -> None:
        self.inner.init(session)

    def destroy(self) -> None:
        self.inner.destroy()

    # -- reads, forwarded --------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self.inner.lookup(ctx, parent, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inner.forget(nodeid, nlookup)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.inner.batch_forget(items)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        return self.inner.getattr(ctx, nodeid, fh)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return self.inner.statfs(ctx, nodeid)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        return self.inner.readlink(ctx, nodeid)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        if mask & os.W_OK:
            self.inner.access(ctx, nodeid, os.F_OK)  # a missing node fails as such first
            raise _erofs()
        self.inner.access(ctx, nodeid, mask)

    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        _check_open(flags)
        return self.inner.open(ctx, nodeid, flags)  # read-only: kill_suidgid has no effect

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        return self.inner.read(ctx, nodeid, fh, offset, size, bufs)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self.inner.flush(ctx, nodeid, fh, lock_owner)

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        if lock_owner is None:
            self.inner.release(ctx, nodeid, fh, flags)
        else:
            self.inner.release(ctx, nodeid, fh, flags, lock_owner=lock_owner)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return self.inner.lseek(ctx, nodeid, fh, offset, whence)

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        _check_open(flags)
        return self.inner.opendir(ctx, nodeid, flags)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        return self.inner.readdir(ctx, nodeid, fh, offset, plus)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.inner.releasedir(ctx, nodeid, fh, flags)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        return self.inner.getxattr(ctx, nodeid, name)

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        return self.inner.listxattr(ctx, nodeid)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.inner.fsync(ctx, nodeid, fh, datasync)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.inner.fsyncdir(ctx, nodeid, fh, datasync)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self.inner.syncfs(ctx, nodeid)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        return self.inner.statx(ctx, nodeid, fh, flags, mask)

    def ioctl(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        cmd: int,
        arg: int,
        in_data: bytes,
        out_size: int,
        *,
        compat32: bool = False,
    ) -> tuple[int, bytes]:
        if cmd in FS_IOC_GETFLAGS:
            return self.inner.ioctl(ctx, nodeid, fh, cmd, arg, in_data, out_size, compat32=compat32)
        if cmd in FS_IOC_SETFLAGS:
            raise _erofs()
        raise fs_error(errno.ENOTTY, f"ioctl {cmd:#x}")

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        return self.inner.getlk(ctx, nodeid, fh, owner, lock)

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
        self.inner.setlk(ctx, nodeid, fh, owner, lock, sleep=sleep, flock=flock)

    def interrupt_waits(self) -> None:
        self.inner.interrupt_waits()

    # -- changes, refused ----------------------------------------------------
    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        raise _erofs()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise _erofs()

    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        *,
        kill_suidgid: bool = False,
    ) -> tuple[Entry, Opened]:
        raise _erofs()

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        raise _erofs()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise _erofs()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise _erofs()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise _erofs()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _erofs()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _erofs()

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        raise _erofs()

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        raise _erofs()

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        raise _erofs()

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        raise _erofs()

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        raise _erofs()

    def copy_file_range(
        self,
        ctx: Context,
        nodeid_in: int,
        fh_in: int,
        off_in: int,
        nodeid_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> int:
        raise _erofs()
