"""Write-side FUSE requests for the escape and CVE tests, over a FuseClient.

FuseClient has the read side; these build the write-side argument structs
(fuse.abi layouts) the way Linux's virtiofs sends them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon_support import session

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import Fields, FuseClient, Opened
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

ROOT = abi.FUSE_ROOT_ID

# -- canaries outside the share --------------------------------------------------
SECRET = b"outside the share: never read this\n"

# -- inotify, for "never read" --------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
IN_ALL = (IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_OPEN | IN_MOVED_FROM
          | IN_MOVED_TO | IN_CREATE | IN_DELETE)  # fmt: skip
IN_NONBLOCK = os.O_NONBLOCK
EVENT = struct.Struct("iIII")


class Watch:
    """inotify on a directory (itself and its entries)."""

    def __init__(self, path: Path) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ALL) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def events(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, length = EVENT.unpack_from(data, pos)
                name = data[pos + EVENT.size : pos + EVENT.size + length].rstrip(b"\0")
                out.append((mask, name))
                pos += EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Outside:
    """A directory beside the share full of canaries, watched."""

    dir: Path
    watch: Watch
    before: dict[str, tuple[int, int, int, int, int]]

    def snapshot(self) -> dict[str, tuple[int, int, int, int, int]]:
        out = {}
        for p in sorted(self.dir.iterdir()):
            st = p.lstat()
            out[p.name] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_nlink)
        return out

    def check(self) -> None:
        events = self.watch.events()
        assert events == [], f"something touched the outside: {events}"
        assert self.snapshot() == self.before, "the outside changed"
        assert (self.dir / "secret").read_bytes() == SECRET
        # Reading it just now made events; start from a clean slate.
        self.watch.events()


@contextmanager
def watched_outside(d: Path, setup: Callable[[Path], None] | None = None) -> Iterator[Outside]:
    """Make ``d`` (with the canaries ``secret`` and ``victim``, then ``setup``) and watch it."""
    d.mkdir()
    (d / "secret").write_bytes(SECRET)
    (d / "victim").write_bytes(SECRET)
    if setup is not None:
        setup(d)
    w = Watch(d)
    try:
        o = Outside(d, w, {})
        o.before = o.snapshot()
        w.events()
        yield o
    finally:
        w.close()


class Swapper(threading.Thread):
    """Keeps swapping ``share/swap`` between a real directory and a symlink out."""

    def __init__(self, share: Path, outside_dir: Path) -> None:
        super().__init__(daemon=True)
        self.share = share
        self.stop = threading.Event()
        self.swaps = 0
        (share / "swap").mkdir()
        (share / "swap" / "secret").write_bytes(b"the inside one\n")
        os.symlink(str(outside_dir), share / "swap_link")

    def run(self) -> None:
        s = self.share
        while not self.stop.is_set():
            os.rename(s / "swap", s / "swap_dir")
            os.rename(s / "swap_link", s / "swap")
            os.rename(s / "swap", s / "swap_link")
            os.rename(s / "swap_dir", s / "swap")
            self.swaps += 1


#: The allow-list is tested with the sandbox (test_sandbox*); these tests
#: look at the file system rules, so a missing syscall must not mask them.
SECCOMP = ("--seccomp", "none")


def entry(data: bytes) -> Fields:
    return Fields.unpack(abi.ENTRY_OUT, abi.ENTRY_OUT_FIELDS, data)


def create(
    c: FuseClient, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_RDWR
) -> tuple[Fields, Opened]:
    args = abi.CREATE_IN.pack(flags | os.O_CREAT, stat.S_IFREG | mode, 0, 0) + name + b"\0"
    data = c.call(abi.FUSE_CREATE, parent, args, abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
    fh, oflags, _ = abi.OPEN_OUT.unpack_from(data, abi.ENTRY_OUT.size)
    return entry(data), Opened(fh, oflags)


def mknod(c: FuseClient, parent: int, name: bytes, mode: int, rdev: int = 0) -> Fields:
    args = abi.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0"
    return entry(c.call(abi.FUSE_MKNOD, parent, args, abi.ENTRY_OUT.size))


def mkdir(c: FuseClient, parent: int, name: bytes, mode: int = 0o755) -> Fields:
    args = abi.MKDIR_IN.pack(mode, 0) + name + b"\0"
    return entry(c.call(abi.FUSE_MKDIR, parent, args, abi.ENTRY_OUT.size))


def symlink(c: FuseClient, parent: int, name: bytes, target: bytes) -> Fields:
    return entry(
        c.call(abi.FUSE_SYMLINK, parent, name + b"\0" + target + b"\0", abi.ENTRY_OUT.size)
    )


def link(c: FuseClient, nodeid: int, newparent: int, name: bytes) -> Fields:
    args = abi.LINK_IN.pack(nodeid) + name + b"\0"
    return entry(c.call(abi.FUSE_LINK, newparent, args, abi.ENTRY_OUT.size))


def rename(c: FuseClient, parent: int, name: bytes, newparent: int, newname: bytes) -> None:
    args = abi.RENAME_IN.pack(newparent) + name + b"\0" + newname + b"\0"
    c.call(abi.FUSE_RENAME, parent, args, 0)


def unlink(c: FuseClient, parent: int, name: bytes) -> None:
    c.call(abi.FUSE_UNLINK, parent, name + b"\0", 0)


def setxattr(c: FuseClient, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> None:
    ext = c.init_out is not None and c.init_out.flags & abi.FUSE_SETXATTR_EXT
    head = (
        abi.SETXATTR_IN.pack(len(value), flags, 0, 0)
        if ext
        else abi.SETXATTR_IN_COMPAT.pack(len(value), flags)
    )
    args = head + name + b"\0" + value
    c.call(abi.FUSE_SETXATTR, nodeid, args, 0)


def setattr(c: FuseClient, nodeid: int, **fields: int) -> None:
    """SETATTR with ``size``, ``uid``, ``gid`` or ``mode`` (and ``fh``)."""
    bits = {"fh": abi.FATTR_FH, "size": abi.FATTR_SIZE, "uid": abi.FATTR_UID,
            "gid": abi.FATTR_GID, "mode": abi.FATTR_MODE}  # fmt: skip
    valid = 0
    for k in fields:
        valid |= bits[k]
    values = {**fields, "valid": valid}
    args = abi.SETATTR_IN.pack(*(values.get(name, 0) for name in abi.SETATTR_IN_FIELDS))
    c.call(abi.FUSE_SETATTR, nodeid, args, abi.ATTR_OUT.size)


@contextmanager
def daemon_session(
    root: Path, workdir: Path, *args: str, queues: int = 2
) -> Iterator[tuple[DaemonProcess, VhostUserFrontend, FuseClient]]:
    """A daemon with extra options, a started front-end and an INIT'ed client.

    After the block the daemon must exit by itself with status 0 and no
    traceback (the front-end's disconnect ends it).
    """
    d = DaemonProcess(root, workdir, extra_args=[*SECCOMP, *args]).start()
    try:
        fe, c = session(d, queues=queues)
    except BaseException:
        d.stop(timeout=5.0)
        raise
    try:
        yield d, fe, c
    finally:
        fe.close()
        status = d.stop(timeout=5.0)
        log = d.log()
        assert status == 0, f"daemon exit status {status}:\n{log}"
        assert "Traceback (most recent call last)" not in log, log
