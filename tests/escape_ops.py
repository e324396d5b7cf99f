"""Write-side FUSE requests for the escape and CVE tests, over a FuseClient.

FuseClient has the read side; these build the write-side argument structs
(fuse.abi layouts) the way Linux's virtiofs sends them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend import VhostUserFrontend
from virtiofsd_py.testing.fuse_client import Fields, FuseClient, Opened

ROOT = abi.FUSE_ROOT_ID


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
    g = fields.get
    args = abi.SETATTR_IN.pack(
        valid, 0, g("fh", 0), g("size", 0), 0, 0, 0, 0, 0, 0, g("mode", 0), 0,
        g("uid", 0), g("gid", 0), 0, 0,
    )  # fmt: skip
    c.call(abi.FUSE_SETATTR, nodeid, args, abi.ATTR_OUT.size)


@contextmanager
def daemon_session(
    root: Path, workdir: Path, *args: str, queues: int = 2
) -> Iterator[tuple[DaemonProcess, VhostUserFrontend, FuseClient]]:
    """A daemon with extra options, a started front-end and an INIT'ed client.

    After the block the daemon must exit by itself with status 0 and no
    traceback (the front-end's disconnect ends it).
    """
    d = DaemonProcess(root, workdir, extra_args=list(args)).start()
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=queues, queue_size=256)
        c = FuseClient(fe)
        c.init()
        yield d, fe, c
    finally:
        fe.close()
        status = d.stop(timeout=5.0)
        log = d.log()
        assert status == 0, f"daemon exit status {status}:\n{log}"
        assert "Traceback (most recent call last)" not in log, log
