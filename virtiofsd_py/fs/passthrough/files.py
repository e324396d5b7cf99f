"""Passthrough operations on open files: OPEN, READ, WRITE, FLUSH, RELEASE,
LSEEK, FSYNC, FALLOCATE, COPY_FILE_RANGE, SYNCFS and IOCTL.

READ and WRITE go straight between the host fd and the guest's buffers
(preadv / pwritev), one syscall each.  Before anything that modifies a file,
the security.capability remapped by --xattrmap is removed
(``_drop_capability``, CVE-2021-20263).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Final

from virtiofsd_py.fs.api import FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, Context, Opened, fs_error
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fs.passthrough.creds import CAP_FSETID, DropCap
from virtiofsd_py.host import syscalls

_SEEK_WHENCE: Final = frozenset((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE))


class FileOps(PassthroughCore):
    """The operations on open files (and SYNCFS, IOCTL)."""

    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        # As the Rust virtiofsd: cache flags follow O_DIRECTORY, not the node type.
        return self._open(nodeid, flags, bool(flags & os.O_DIRECTORY), kill_suidgid)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        h = self.handles.get(fh, nodeid)
        if not bufs:
            return 0
        return os.preadv(h.fd, bufs, offset)

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        """pwritev straight from guest memory; the host fd's O_APPEND appends.

        ``kill_suidgid`` (with --killpriv-v2): the writer may not keep
        setuid/setgid, so the write runs without CAP_FSETID and the host kernel
        clears them.
        """
        h = self.handles.get(fh, nodeid)
        if not bufs:
            return 0
        self._drop_capability(h.fd)
        if kill_suidgid and self.config.killpriv_v2:
            with DropCap(CAP_FSETID):
                return os.pwritev(h.fd, bufs, offset)
        return os.pwritev(h.fd, bufs, offset)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        # What close(2) of the guest's fd means on the host: close a dup, so
        # close-time work (NFS flush, lock release) happens now.
        h = self.handles.get(fh, nodeid)
        os.close(os.dup(h.fd))
        self.locks.drop_owner(nodeid, lock_owner)

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        if lock_owner is not None:  # FUSE_RELEASE_FLOCK_UNLOCK
            h = self.handles.get(fh, nodeid)
            self.locks.flock(h.fd, fcntl.F_UNLCK, sleep=False)
            del h
        self.handles.remove(fh, nodeid)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence not in _SEEK_WHENCE:
            raise fs_error(errno.EINVAL, f"lseek whence {whence}")
        h = self.handles.get(fh, nodeid)
        return os.lseek(h.fd, offset, whence)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        h = self.handles.get(fh, nodeid)
        (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        h = self.handles.get(fh, nodeid)
        self._drop_capability(h.fd)
        syscalls.fallocate(h.fd, mode, offset, length)

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
        if flags:
            raise fs_error(errno.EINVAL, "copy_file_range flags must be 0")
        src = self.handles.get(fh_in, nodeid_in)
        dst = self.handles.get(fh_out, nodeid_out)
        self._drop_capability(dst.fd)
        return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        node = self._node(nodeid)
        # syncfs(2) refuses O_PATH fds; a fifo or device is never opened, so
        # those sync the filesystem of the share's root.
        target = node if stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode) else self.inodes.root
        fd = self._reopen(target, os.O_RDONLY | os.O_NONBLOCK)
        try:
            syscalls.syncfs(fd)
        finally:
            os.close(fd)

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
        """FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (chattr/lsattr) only; ENOTTY otherwise.

        SETFLAGS runs under the caller's credentials: the guest kernel checks
        nothing for a FUSE ioctl, the host checks ownership and
        CAP_LINUX_IMMUTABLE.
        """
        h = self.handles.get(fh, nodeid)
        if cmd in FS_IOC_GETFLAGS:
            buf = fcntl.ioctl(h.fd, cmd, bytes(4))
            return 0, bytes(buf[:4])
        if cmd in FS_IOC_SETFLAGS:
            if len(in_data) < 4:
                raise fs_error(errno.EINVAL, "FS_IOC_SETFLAGS needs an int")
            with self._creds(ctx):
                fcntl.ioctl(h.fd, cmd, in_data[:4])
            return 0, b""
        raise fs_error(errno.ENOTTY, f"ioctl {cmd:#x}")
