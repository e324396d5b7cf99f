"""In-memory operations on attributes and file contents: GETATTR, STATFS,
READLINK, ACCESS, SETATTR, OPEN, READ, WRITE, FLUSH, RELEASE, FSYNC, LSEEK,
FALLOCATE, COPY_FILE_RANGE, SYNCFS."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Final

from virtiofsd_py.fs.api import NOW, AttrReply, Context, Opened, SetAttr, fs_error
from virtiofsd_py.fs.memory.core import MemoryCore
from virtiofsd_py.fs.memory.nodes import BLOCK, NAME_MAX

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


class FileOps(MemoryCore):
    """Attributes and the operations on open files."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        with self._lock:
            return AttrReply(self._node(nodeid).stat(), self.policy.attr_timeout)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        with self._lock:
            cfg = self.config
            blocks = cfg.capacity // BLOCK
            free = max(0, cfg.capacity - self._used) // BLOCK
            files_free = max(0, cfg.max_nodes - len(self._nodes))
            flag = os.ST_RDONLY if cfg.readonly else 0
            return os.statvfs_result(
                (BLOCK, BLOCK, blocks, free, free, cfg.max_nodes, files_free, files_free, flag,
                 NAME_MAX)
            )  # fmt: skip

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        with self._lock:
            node = self._node(nodeid)
            if not stat.S_ISLNK(node.mode):
                raise fs_error(errno.EINVAL, "not a symlink")
            return node.target

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Existence only: the guest kernel checks permissions (default_permissions)."""
        with self._lock:
            self._node(nodeid)
            if mask & os.W_OK and self.config.readonly:
                raise fs_error(errno.EROFS, "read-only file system")

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        with self._lock:
            self._check_write()
            node = self._node(nodeid)
            if attr.fh is not None:
                self._handle(attr.fh, nodeid)
            now = time.time_ns()
            if attr.size is not None:
                if not stat.S_ISREG(node.mode):
                    code = errno.EISDIR if node.is_dir else errno.EINVAL
                    raise fs_error(code, "truncate of a file that is not regular")
                self._truncate(node, attr.size)
                node.touch(now, data=True)
            if attr.mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (attr.mode & 0o7777)
            if attr.uid is not None:
                node.uid = attr.uid
            if attr.gid is not None:
                node.gid = attr.gid
            if attr.kill_suidgid and stat.S_ISREG(node.mode):
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if attr.atime_ns is not None:
                node.atime_ns = now if attr.atime_ns is NOW else attr.atime_ns
            if attr.mtime_ns is not None:
                node.mtime_ns = now if attr.mtime_ns is NOW else attr.mtime_ns
            node.ctime_ns = attr.ctime_ns if attr.ctime_ns is not None else now
            return AttrReply(node.stat(), self.policy.attr_timeout)

    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        with self._lock:
            node = self._node(nodeid)
            writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
            if writing:
                self._check_write()
            if node.is_dir and writing:
                raise fs_error(errno.EISDIR, "open a directory for writing")
            if not (stat.S_ISREG(node.mode) or node.is_dir):
                # The guest opens fifos and devices itself; one reaching us is refused.
                raise fs_error(errno.ENXIO, "only regular files and directories are opened")
            if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
                self._truncate(node, 0)
                node.touch(time.time_ns(), data=True)
                if kill_suidgid:
                    node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            return self._open_handle(node, flags)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        with self._lock:
            _, node = self._handle(fh, nodeid)
            if node.is_dir:
                raise fs_error(errno.EISDIR, "read of a directory")
            data = memoryview(node.data)[offset : offset + size]
            done = 0
            for buf in bufs:
                n = min(len(buf), len(data) - done)
                if n <= 0:
                    break
                buf[:n] = data[done : done + n]
                done += n
            data.release()
            return done

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        with self._lock:
            self._check_write()
            h, node = self._handle(fh, nodeid)
            if h.flags & os.O_ACCMODE == os.O_RDONLY:
                raise fs_error(errno.EBADF, "handle not open for writing")
            if h.flags & os.O_APPEND:
                offset = len(node.data)
            total = sum(len(b) for b in bufs)
            if total == 0:
                return 0  # write(2) of nothing changes nothing, not even the size
            end = offset + total
            if end > len(node.data):
                self._charge(end - len(node.data))
                node.data.extend(bytes(end - len(node.data)))
            pos = offset
            for buf in bufs:
                node.data[pos : pos + len(buf)] = buf
                pos += len(buf)
            if kill_suidgid:
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            node.touch(time.time_ns(), data=True)
            return total

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        with self._lock:
            self._handle(fh, nodeid)

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        with self._lock:
            _, node = self._handle(fh, nodeid)
            del self._handles[fh]
            node.opens -= 1
            self._maybe_drop(node)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._lock:
            self._handle(fh, nodeid)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE: files here have no holes (the kernel does the rest)."""
        with self._lock:
            _, node = self._handle(fh, nodeid)
            size = len(node.data)
            if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
                raise fs_error(errno.EINVAL, f"whence {whence}")
            if offset < 0 or offset >= size:
                raise fs_error(errno.ENXIO, "offset beyond end of file")
            return offset if whence == os.SEEK_DATA else size

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        with self._lock:
            self._check_write()
            _, node = self._handle(fh, nodeid)
            end = offset + length
            if mode & _FALLOC_FL_PUNCH_HOLE:
                if not mode & _FALLOC_FL_KEEP_SIZE:
                    raise fs_error(errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
                stop = min(end, len(node.data))
                if offset < stop:
                    node.data[offset:stop] = bytes(stop - offset)
            elif mode & ~_FALLOC_FL_KEEP_SIZE:
                raise fs_error(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
            elif not mode & _FALLOC_FL_KEEP_SIZE and end > len(node.data):
                self._truncate(node, end)
            node.touch(time.time_ns(), data=True)

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
        with self._lock:
            _, src = self._handle(fh_in, nodeid_in)
            data = bytes(src.data[off_in : off_in + length])
        if not data:
            return 0
        return self.write(ctx, nodeid_out, fh_out, off_out, [memoryview(data)], False)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """Nothing to sync: memory is the storage."""
