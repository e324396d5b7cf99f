"""The one home of the raw Linux calls Python's ``os`` module lacks (ctypes).

Python 3.11 has no ``os.unshare``, ``mount``, ``pivot_root``, ``prctl``,
``statx``, ``getdents64``, ``renameat2``, file handles or per-thread
credential calls.  Every binding of the C library lives here, over one
``CDLL``; the wrappers raise ``OSError`` with the call's name, like ``os``.

* ``statx`` with ``STATX_MNT_ID``: the passthrough backend identifies an
  inode by (st_dev, st_ino, mount id), so that one file seen through two bind
  mounts is two nodes, as the Rust virtiofsd does.  One syscall gives both
  the attributes and the mount id.  Kernels without statx mount ids (< 5.8)
  fall back to ``fstat`` plus ``/proc/self/fdinfo``.
* ``getdents64``: directory entries with the kernel's ``d_off`` cookies, so
  a READDIR can resume at any cookie with ``lseek`` (``os.scandir`` hides
  the cookies).
* Confinement: ``unshare``, ``mount``, ``pivot_root``, ``prctl``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from typing import Final, NamedTuple

from virtiofsd_py.host.syscall_table import BY_MACHINE

_libc = ctypes.CDLL(None, use_errno=True)

#: Syscall numbers of this machine (empty on an unknown architecture).
SYSNO: Final[dict[str, int]] = BY_MACHINE.get(platform.machine(), {})

# sched.h
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# sys/mount.h
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MS_SLAVE: Final = 1 << 19
MS_RELATIME: Final = 1 << 21
MNT_DETACH: Final = 2

# linux/prctl.h
PR_SET_PDEATHSIG: Final = 1
PR_CAPBSET_READ: Final = 23
PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_GET_NO_NEW_PRIVS: Final = 39
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
PR_SET_SECCOMP: Final = 22
SECCOMP_MODE_FILTER: Final = 2

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_unshare = _libc.unshare
_unshare.argtypes = (ctypes.c_int,)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _check(rc: int, what: str, path: str | None = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return rc


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(_mount(_b(source), _b(target), _b(fstype), flags, _b(data) or None), "mount", target)


def umount2(target: str, flags: int) -> None:
    _check(_umount2(_b(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = ctypes.c_long(SYSNO["pivot_root"])
    _check(_syscall(nr, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_prctl(option, a2, a3, a4, a5), "prctl")


PR_SET_NAME: Final = 15


def set_thread_name(name: str) -> None:
    """Name the calling thread for ps -L / top -H (PR_SET_NAME, at most 15 bytes);
    best effort: a failure changes nothing else."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def prctl_ptr(option: int, a2: int, ptr: int) -> int:
    """prctl whose third argument is a pointer (PR_SET_SECCOMP)."""
    return _check(_prctl(option, a2, ptr, 0, 0), "prctl")


# -- file system calls ----------------------------------------------------------

AT_EMPTY_PATH: Final = 0x1000
AT_SYMLINK_NOFOLLOW: Final = 0x100
STATX_BASIC_STATS: Final = 0x7FF
STATX_MNT_ID: Final = 0x1000

# struct statx (include/uapi/linux/stat.h), up to stx_mnt_id.
_STATX = struct.Struct("=IIQIIIHHQQQQqIiqIiqIiqIiIIIIQ")
_STATX_BUFSIZE: Final = 256
# Only stx_mask, stx_mode, stx_ino, stx_dev_major/minor and stx_mnt_id of it.
_STATX_IDENTITY = struct.Struct("=I24xH2xQ96xIIQ")
STATX_TYPE: Final = 0x1
STATX_INO: Final = 0x100

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


def stat_identity(fd: int) -> tuple[int, int, int, int]:
    """(st_mode, st_dev, st_ino, mount id) of ``fd``: what identifies a node.

    ``stat_fd`` without the rest of the attributes and the ``stat_result``
    (about half its cost), for checks that need nothing else (migration
    loads one per inode).
    """
    if _have_mnt_id is False or _statx_fn is None:
        st, mnt_id = stat_fd(fd)
        return st.st_mode, st.st_dev, st.st_ino, mnt_id
    buf = _local.buf
    if _statx_fn(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, _IDENTITY_MASK, buf) != 0:
        raise _oserror("statx")
    mask, mode, ino, dev_maj, dev_min, mnt_id = _STATX_IDENTITY.unpack_from(buf)
    if not mask & STATX_MNT_ID:
        mnt_id = _mnt_id_from_fdinfo(fd)
    return mode, os.makedev(dev_maj, dev_min), ino, mnt_id


_IDENTITY_MASK: Final = STATX_TYPE | STATX_INO | STATX_MNT_ID


class Dirent(NamedTuple):
    """One getdents64 record: ``off`` is the cookie to resume *after* it."""

    ino: int
    off: int
    type: int
    name: bytes


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
        n = _libc.syscall(SYSNO["getdents64"], fd, cbuf, len(buf))
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


# -- write-side calls ------------------------------------------------------------

RENAME_NOREPLACE: Final = 1 << 0
RENAME_EXCHANGE: Final = 1 << 1
RENAME_WHITEOUT: Final = 1 << 2

_renameat2 = getattr(_libc, "renameat2", None)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fchownat = _libc.fchownat
_fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
_syncfs = getattr(_libc, "syncfs", None)


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """renameat2(2): RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    if _renameat2 is not None:
        rc = _renameat2(olddirfd, old, newdirfd, new, ctypes.c_uint(flags))
    else:
        rc = _libc.syscall(SYSNO["renameat2"], olddirfd, old, newdirfd, new, ctypes.c_uint(flags))
    if rc != 0:
        raise _oserror("renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate knows only mode 0)."""
    if _fallocate(fd, mode, offset, length) != 0:
        raise _oserror("fallocate")


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH): chown through an O_PATH fd.

    -1 (as 0xffffffff) leaves an id unchanged.
    """
    if _fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH) != 0:
        raise _oserror("fchownat")


def syncfs(fd: int) -> None:
    """syncfs(2): flush the whole filesystem that ``fd`` is on."""
    rc = _syncfs(fd) if _syncfs is not None else _libc.syscall(SYSNO["syncfs"], fd)
    if rc != 0:
        raise _oserror("syncfs")


STATX_ALL_FIELDS: Final = 0xFFF  # STATX_BASIC_STATS | STATX_BTIME


def statx_fields(fd: int, flags: int, mask: int) -> dict[str, int]:
    """statx(2) of ``fd`` itself (AT_EMPTY_PATH), as fuse_statx member names.

    ``flags`` carries the caller's AT_STATX_* sync bits; symlinks are never
    followed (``fd`` is the object).
    """
    buf = _local.buf
    sync = flags & 0x6000  # AT_STATX_SYNC_TYPE
    rc = (_statx_fn or _libc.statx)(
        fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | sync, mask & STATX_ALL_FIELDS, buf
    )
    if rc != 0:
        raise _oserror("statx")
    v = _STATX.unpack_from(buf)
    return {
        "mask": v[0],
        "blksize": v[1],
        "attributes": v[2],
        "nlink": v[3],
        "uid": v[4],
        "gid": v[5],
        "mode": v[6],
        "ino": v[8],
        "size": v[9],
        "blocks": v[10],
        "attributes_mask": v[11],
        "atime_sec": v[12],
        "atime_nsec": v[13],
        "btime_sec": v[15],
        "btime_nsec": v[16],
        "ctime_sec": v[18],
        "ctime_nsec": v[19],
        "mtime_sec": v[21],
        "mtime_nsec": v[22],
        "rdev_major": v[24],
        "rdev_minor": v[25],
        "dev_major": v[26],
        "dev_minor": v[27],
    }


# -- file handles (name_to_handle_at / open_by_handle_at) --------------------------------

MAX_HANDLE_SZ: Final = 128
_FH_HDR = struct.Struct("=Ii")  # handle_bytes, handle_type
_name_to_handle_at = getattr(_libc, "name_to_handle_at", None)
_open_by_handle_at = getattr(_libc, "open_by_handle_at", None)


class _HandleLocal(threading.local):
    """Per-thread buffers of name_to_handle (allocating them costs more than the call)."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(_FH_HDR.size + MAX_HANDLE_SZ)
        self.mnt = ctypes.c_int()
        self.mnt_ref = ctypes.byref(self.mnt)


_handle_local = _HandleLocal()


def name_to_handle(fd: int) -> tuple[bytes, int]:
    """(file handle, mount id) of the object ``fd`` refers to (AT_EMPTY_PATH).

    The handle bytes are the whole ``struct file_handle`` (header included),
    ready for ``open_by_handle``.  EOPNOTSUPP where the fs has no handles.
    """
    if _name_to_handle_at is None:
        raise OSError(errno.ENOSYS, "name_to_handle_at is not available")
    local = _handle_local
    buf = local.buf
    _FH_HDR.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    if _name_to_handle_at(fd, b"", buf, local.mnt_ref, AT_EMPTY_PATH) != 0:
        raise _oserror("name_to_handle_at")
    nbytes, _type = _FH_HDR.unpack_from(buf)
    return buf.raw[: _FH_HDR.size + nbytes], local.mnt.value


def well_formed_handle(handle: bytes) -> bool:
    """Whether ``handle`` is a whole ``struct file_handle``: its handle_bytes field
    says how many bytes follow the header, and the kernel reads that many, so a
    handle from outside (a migration state) that says more than it holds would
    make it read past the buffer."""
    if len(handle) < _FH_HDR.size:
        return False
    nbytes = _FH_HDR.unpack_from(handle)[0]
    return bool(nbytes == len(handle) - _FH_HDR.size and nbytes <= MAX_HANDLE_SZ)


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2): needs CAP_DAC_READ_SEARCH and a real (not O_PATH) ``mount_fd``."""
    if _open_by_handle_at is None:
        raise OSError(errno.ENOSYS, "open_by_handle_at is not available")
    # The kernel only reads the handle: the bytes object's own buffer will do.
    fd = _open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        raise _oserror("open_by_handle_at")
    return int(fd)


# -- timestamps ------------------------------------------------------------------------

UTIME_NOW: Final = (1 << 30) - 1
UTIME_OMIT: Final = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_utimensat = _libc.utimensat
_utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(*divmod(ns, _NS))


def utimens(
    dirfd: int,
    path: bytes | None,
    atime_ns: int | None,
    mtime_ns: int | None,
    *,
    atime_now: bool = False,
    mtime_now: bool = False,
) -> None:
    """utimensat(2) with per-field UTIME_NOW / UTIME_OMIT (None omits a field).

    ``path`` None sets the times of ``dirfd`` itself (futimens).
    """
    ts = (_Timespec * 2)(_timespec(atime_ns, atime_now), _timespec(mtime_ns, mtime_now))
    if _utimensat(dirfd, path, ts, 0) != 0:
        raise _oserror("utimensat")


#: An O_PATH fd of the name itself, never of a symlink's target (the daemon never
#: follows a guest's symlink), closed on exec: how every node is first opened.
O_PATH_NOFOLLOW: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(root_fd: int, path: bytes) -> int:
    """O_PATH fd of the relative ``path`` under ``root_fd``, one component at a
    time, never following a symlink or ``..`` (so it cannot leave ``root_fd``)."""
    parts = path.split(b"/")
    if not path or any(p in (b"", b".", b"..") for p in parts):
        raise OSError(errno.EINVAL, f"not a plain relative path: {path!r}")
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            flags = O_PATH_NOFOLLOW if i == len(parts) - 1 else O_PATH_NOFOLLOW | os.O_DIRECTORY
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- per-thread credentials, capabilities, signals -------------------------------------
# The glibc wrappers of setresuid/setresgid/setgroups broadcast to every
# thread (setxid); the raw syscalls change only the calling thread's.

_KEEP: Final = -1
_sys_ids = _libc["syscall"]
_sys_ids.restype = ctypes.c_long
_sys_ids.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long)
_sys_groups = _libc["syscall"]
_sys_groups.restype = ctypes.c_long
_sys_groups.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p)


def thread_set_euid(uid: int) -> None:
    """setresuid(-1, uid, -1) for the calling thread only."""
    if _sys_ids(SYSNO.get("setresuid", -1), _KEEP, uid, _KEEP) != 0:
        raise _oserror("setresuid")


def thread_set_egid(gid: int) -> None:
    """setresgid(-1, gid, -1) for the calling thread only."""
    if _sys_ids(SYSNO.get("setresgid", -1), _KEEP, gid, _KEEP) != 0:
        raise _oserror("setresgid")


def thread_set_groups(groups: tuple[int, ...]) -> None:
    """setgroups(2) for the calling thread only."""
    arr = (ctypes.c_uint32 * len(groups))(*groups) if groups else None
    if _sys_groups(SYSNO.get("setgroups", -1), len(groups), arr) != 0:
        raise _oserror("setgroups")


class CapHeader(ctypes.Structure):
    """``struct __user_cap_header_struct``."""

    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class CapData(ctypes.Structure):
    """One 32-bit word of each set (``struct __user_cap_data_struct``); there are two."""

    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_CAP_V3: Final = 0x20080522
_capget = _libc.capget
_capget.argtypes = (ctypes.POINTER(CapHeader), ctypes.POINTER(CapData))
_capset = _libc.capset
_capset.argtypes = (ctypes.POINTER(CapHeader), ctypes.POINTER(CapData))


def capget() -> ctypes.Array[CapData]:
    """The calling thread's capability sets (capget(2), pid 0, version 3), as two words."""
    data = (CapData * 2)()
    if _capget(ctypes.byref(CapHeader(_CAP_V3, 0)), data) != 0:
        raise _oserror("capget")
    return data


def capset(data: ctypes.Array[CapData]) -> None:
    """capset(2) the calling thread's sets (capabilities are per thread)."""
    if _capset(ctypes.byref(CapHeader(_CAP_V3, 0)), data) != 0:
        raise _oserror("capset")


def sigaction(signum: int, act: ctypes.Structure) -> None:
    """sigaction(2) with a caller-built ``struct sigaction`` (no old action)."""
    if _libc.sigaction(signum, ctypes.byref(act), None) != 0:
        raise _oserror("sigaction")
