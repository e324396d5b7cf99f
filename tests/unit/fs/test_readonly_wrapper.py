"""``ReadOnlyFS`` (``--readonly``) over any backend: reads forwarded, changes EROFS.

The passthrough's own read-only suites (test_passthrough, test_passthrough_write)
check it against a host directory; here it wraps the memory backend, whose
contents show directly whether anything changed.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pytest

from virtiofsd_py.fs.api import ROOT_ID, Context, Filesystem, Lock, SetAttr
from virtiofsd_py.fs.memory import MemoryFS
from virtiofsd_py.fs.readonly import ReadOnlyFS

CTX = Context(uid=0, gid=0, pid=1)
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602


def errno_of(fn: Any, *args: Any, **kw: Any) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno is not None
    return ei.value.errno


@pytest.fixture
def inner() -> MemoryFS:
    fs = MemoryFS()
    e, o = fs.create(CTX, ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0)
    fs.write(CTX, e.nodeid, o.fh, 0, [memoryview(b"content")], False)
    fs.release(CTX, e.nodeid, o.fh, 0)
    fs.mkdir(CTX, ROOT_ID, b"d", 0o755, 0)
    fs.setxattr(CTX, e.nodeid, b"user.k", b"v", 0, False)
    fs.forget(e.nodeid, 1)
    return fs


def snapshot(fs: Filesystem) -> list[tuple[bytes, int, int, bytes]]:
    """Every name of the root with its mode, size and data, read through ``fs``."""
    out = []
    o = fs.opendir(CTX, ROOT_ID, os.O_RDONLY)
    for de in fs.readdir(CTX, ROOT_ID, o.fh, 0, False):
        if de.name in (b".", b".."):
            continue
        e = fs.lookup(CTX, ROOT_ID, de.name)
        data = b""
        if stat.S_ISREG(e.attr.st_mode):
            h = fs.open(CTX, e.nodeid, os.O_RDONLY)
            buf = bytearray(64)
            data = bytes(buf[: fs.read(CTX, e.nodeid, h.fh, 0, 64, [memoryview(buf)])])
            fs.release(CTX, e.nodeid, h.fh, 0)
        out.append((de.name, e.attr.st_mode, e.attr.st_size, data))
        fs.forget(e.nodeid, 1)
    fs.releasedir(CTX, ROOT_ID, o.fh, 0)
    return out


def test_reads_are_the_backends(inner: MemoryFS) -> None:
    ro = ReadOnlyFS(inner)
    assert ro.readonly and not inner.readonly
    assert snapshot(ro) == snapshot(inner)
    e = ro.lookup(CTX, ROOT_ID, b"f")
    assert ro.getattr(CTX, e.nodeid, None).attr.st_size == 7
    assert ro.getxattr(CTX, e.nodeid, b"user.k") == b"v"
    assert ro.listxattr(CTX, e.nodeid) == b"user.k\0"
    assert ro.statfs(CTX, ROOT_ID).f_bsize == inner.statfs(CTX, ROOT_ID).f_bsize
    ro.access(CTX, e.nodeid, os.R_OK | os.X_OK)
    o = ro.open(CTX, e.nodeid, os.O_RDONLY)
    ro.fsync(CTX, e.nodeid, o.fh, True)
    ro.flush(CTX, e.nodeid, o.fh, 0)
    ro.release(CTX, e.nodeid, o.fh, 0)
    ro.syncfs(CTX, ROOT_ID)
    ro.forget(e.nodeid, 1)
    # Not the seam: the backend's own attributes, looked up on it.
    assert ro.policy is inner.policy and ro.config is inner.config


def test_every_change_is_erofs(inner: MemoryFS) -> None:
    ro = ReadOnlyFS(inner)
    before = snapshot(inner)
    f = ro.lookup(CTX, ROOT_ID, b"f")
    o = ro.open(CTX, f.nodeid, os.O_RDONLY)
    calls: list[tuple[Any, ...]] = [
        (ro.create, CTX, ROOT_ID, b"n", 0o644, os.O_RDWR, 0),
        (ro.mknod, CTX, ROOT_ID, b"n", stat.S_IFIFO | 0o644, 0, 0),
        (ro.mkdir, CTX, ROOT_ID, b"n", 0o755, 0),
        (ro.symlink, CTX, ROOT_ID, b"n", b"t"),
        (ro.link, CTX, f.nodeid, ROOT_ID, b"n"),
        (ro.unlink, CTX, ROOT_ID, b"f"),
        (ro.rmdir, CTX, ROOT_ID, b"d"),
        (ro.rename, CTX, ROOT_ID, b"f", ROOT_ID, b"n", 0),
        (ro.tmpfile, CTX, ROOT_ID, 0o600, os.O_RDWR, 0),
        (ro.setattr, CTX, f.nodeid, SetAttr(mode=0o600)),
        (ro.setattr, CTX, f.nodeid, SetAttr(size=0)),
        (ro.write, CTX, f.nodeid, o.fh, 0, [memoryview(b"x")], False),
        (ro.fallocate, CTX, f.nodeid, o.fh, 0, 0, 10),
        (ro.copy_file_range, CTX, f.nodeid, o.fh, 0, f.nodeid, o.fh, 0, 1, 0),
        (ro.setxattr, CTX, f.nodeid, b"user.x", b"1", 0, False),
        (ro.removexattr, CTX, f.nodeid, b"user.k"),
        (ro.ioctl, CTX, f.nodeid, o.fh, FS_IOC_SETFLAGS, 0, bytes(4), 0),
        (ro.access, CTX, f.nodeid, os.W_OK),
    ]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_CREAT):
        calls.append((ro.open, CTX, f.nodeid, flags))
    calls.append((ro.opendir, CTX, ROOT_ID, os.O_RDWR))
    for fn, *args in calls:
        assert errno_of(fn, *args) == errno.EROFS, (fn.__name__, args)
    assert snapshot(inner) == before
    assert inner.getxattr(CTX, f.nodeid, b"user.k") == b"v"


def test_missing_node_fails_as_such_before_erofs(inner: MemoryFS) -> None:
    """ACCESS(W_OK) finds the node first, as access(2) on a read-only mount does."""
    assert errno_of(ReadOnlyFS(inner).access, CTX, 999, os.W_OK) == errno.ESTALE


def test_ioctls(inner: MemoryFS) -> None:
    """GETFLAGS is forwarded, SETFLAGS refused; others are not served (their direction
    is unknown), whatever the backend would do."""

    class Recording(MemoryFS):
        def __init__(self) -> None:
            super().__init__()
            self.ioctls: list[tuple[int, bool]] = []

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
            self.ioctls.append((cmd, compat32))
            return 0, bytes(out_size)

    rec = Recording()
    ro = ReadOnlyFS(rec)
    assert ro.ioctl(CTX, ROOT_ID, 1, FS_IOC_GETFLAGS, 0, b"", 4, compat32=True) == (0, bytes(4))
    assert errno_of(ro.ioctl, CTX, ROOT_ID, 1, FS_IOC_SETFLAGS, 0, bytes(4), 0) == errno.EROFS
    assert errno_of(ro.ioctl, CTX, ROOT_ID, 1, 0x5401, 0, b"", 0) == errno.ENOTTY
    assert rec.ioctls == [(FS_IOC_GETFLAGS, True)]


def test_locks_and_release_keyword_are_forwarded() -> None:
    seen: list[tuple[Any, ...]] = []

    class Locking(Filesystem):
        def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock, *,
                  sleep: bool, flock: bool) -> None:  # fmt: skip
            seen.append(("setlk", nodeid, fh, owner, lock, sleep, flock))

        def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
            seen.append(("getlk", nodeid, fh, owner, lock))
            return lock

        def release(self, ctx: Context, nodeid: int, fh: int, flags: int, **kw: Any) -> None:
            seen.append(("release", nodeid, fh, flags, kw))

        def interrupt_waits(self) -> None:
            seen.append(("interrupt",))

    ro = ReadOnlyFS(Locking())
    lock = Lock(0, 10, 0)
    ro.setlk(CTX, 2, 3, 4, lock, sleep=True, flock=False)
    assert ro.getlk(CTX, 2, 3, 4, lock) is lock
    ro.release(CTX, 2, 3, 0)
    ro.release(CTX, 2, 3, 0, lock_owner=9)
    ro.interrupt_waits()
    assert seen == [
        ("setlk", 2, 3, 4, lock, True, False),
        ("getlk", 2, 3, 4, lock),
        ("release", 2, 3, 0, {}),  # keyword only when the guest sent it, as the dispatcher
        ("release", 2, 3, 0, {"lock_owner": 9}),
        ("interrupt",),
    ]
