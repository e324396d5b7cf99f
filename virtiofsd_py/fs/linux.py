"""Thin ctypes wrappers for the Linux syscalls Python's ``os`` module lacks.

* ``statx`` with ``STATX_MNT_ID``: the passthrough backend identifies an
  inode by (st_dev, st_ino, mount id), so that one file seen through two bind
  mounts is two nodes, as the Rust virtiofsd does.  One syscall gives both
  the attributes and the mount id.  Kernels without statx mount ids (< 5.8)
  fall back to ``fstat`` plus ``/proc/self/fdinfo``.
* ``getdents64``: directory entries with the kernel's ``d_off`` cookies, so
  a READDIR can resume at any cookie with ``lseek`` (``os.scandir`` hides
  the cookies).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from typing import Final, NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)

AT_EMPTY_PATH: Final = 0x1000
AT_SYMLINK_NOFOLLOW: Final = 0x100
STATX_BASIC_STATS: Final = 0x7FF
STATX_MNT_ID: Final = 0x1000

# struct statx (include/uapi/linux/stat.h), up to stx_mnt_id.
_STATX = struct.Struct("=IIQIIIHHQQQQqIiqIiqIiqIiIIIIQ")
_STATX_BUFSIZE: Final = 256

# struct linux_dirent64 (getdents64(2)): d_ino, d_off, d_reclen, d_type, d_name.
_DIRENT = struct.Struct("=QqHB")
_DIRENT_NAME: Final = _DIRENT.size

_NS: Final = 1_000_000_000


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class _Local(threading.local):
    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(_STATX_BUFSIZE)


_local = _Local()
_statx_fn = getattr(_libc, "statx", None)
# No argtypes: ctypes' default int/bytes/buffer conversions fit statx(2)'s
# arguments and are about twice as fast.
_have_mnt_id: bool | None = None if _statx_fn is not None else False


def _mnt_id_from_fdinfo(fd: int) -> int:
    """Mount id of ``fd`` from /proc/self/fdinfo (kernels before statx mount ids)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    return 0


def stat_fd(fd: int) -> tuple[os.stat_result, int]:
    """Attributes and mount id of the file ``fd`` refers to (an O_PATH fd works).

    Never follows a symlink: ``fd`` itself is the object (AT_EMPTY_PATH).
    """
    global _have_mnt_id
    if _have_mnt_id is False or _statx_fn is None:
        return os.stat(fd), _mnt_id_from_fdinfo(fd)
    buf = _local.buf
    rc = _statx_fn(
        fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS | STATX_MNT_ID, buf
    )
    if rc != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _have_mnt_id = False
            return stat_fd(fd)
        raise _oserror("statx")
    (
        mask,
        blksize,
        _attrs,
        nlink,
        uid,
        gid,
        mode,
        _spare,
        ino,
        size,
        blocks,
        _amask,
        a_s,
        a_ns,
        _r0,
        _b_s,
        _b_ns,
        _r1,
        c_s,
        c_ns,
        _r2,
        m_s,
        m_ns,
        _r3,
        rdev_maj,
        rdev_min,
        dev_maj,
        dev_min,
        mnt_id,
    ) = _STATX.unpack_from(buf)
    if not mask & STATX_MNT_ID:
        _have_mnt_id = False
        mnt_id = _mnt_id_from_fdinfo(fd)
    atime_ns = a_s * _NS + a_ns
    mtime_ns = m_s * _NS + m_ns
    ctime_ns = c_s * _NS + c_ns
    # The full 19-field form (sequence fields, then st_atime..st_rdev) is
    # much cheaper to build than the 10-field form plus a dict.
    st = os.stat_result(
        (
            mode,
            ino,
            os.makedev(dev_maj, dev_min),
            nlink,
            uid,
            gid,
            size,
            a_s,
            m_s,
            c_s,
            atime_ns / _NS,
            mtime_ns / _NS,
            ctime_ns / _NS,
            atime_ns,
            mtime_ns,
            ctime_ns,
            blksize,
            blocks,
            os.makedev(rdev_maj, rdev_min),
        )
    )
    return st, mnt_id


class Dirent(NamedTuple):
    """One getdents64 record: ``off`` is the cookie to resume *after* it."""

    ino: int
    off: int
    type: int
    name: bytes


_SYS_GETDENTS64: Final = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine, 217)
_getdents64 = getattr(_libc, "getdents64", None)
if _getdents64 is not None:
    _getdents64.restype = ctypes.c_ssize_t


def getdents64(fd: int, buf: bytearray) -> list[Dirent]:
    """One getdents64(2) call on ``fd`` into ``buf``; returns its records.

    An empty list means end of directory.  The caller positions the
    directory with ``os.lseek(fd, cookie, SEEK_SET)`` beforehand.
    """
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    if _getdents64 is not None:
        n = _getdents64(fd, cbuf, len(buf))
    else:  # glibc < 2.30
        n = _libc.syscall(_SYS_GETDENTS64, fd, cbuf, len(buf))
    del cbuf
    if n < 0:
        raise _oserror("getdents64")
    out: list[Dirent] = []
    pos = 0
    unpack = _DIRENT.unpack_from
    while pos < n:
        d_ino, d_off, reclen, d_type = unpack(buf, pos)
        start = pos + _DIRENT_NAME
        end = buf.index(0, start, pos + reclen)
        out.append(Dirent(d_ino, d_off, d_type, bytes(buf[start:end])))
        pos += reclen
    return out
