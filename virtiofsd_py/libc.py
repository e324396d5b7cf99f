"""The few raw Linux calls the confinement code needs, through ctypes.

Python 3.11 has no ``os.unshare``, ``mount``, ``pivot_root``, ``prctl`` or
``capset``; these wrappers raise ``OSError`` with the call's name, like the
``os`` module does.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

from virtiofsd_py.syscall_table import BY_MACHINE

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


def prctl_ptr(option: int, a2: int, ptr: int) -> int:
    """prctl whose third argument is a pointer (PR_SET_SECCOMP)."""
    return _check(_prctl(option, a2, ptr, 0, 0), "prctl")
