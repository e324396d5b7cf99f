"""Write-side FUSE requests through the dispatcher into the real passthrough
backend on a temporary directory: the two halves agree on the interface, and
the effects show up on the host (including guest locks seen by host processes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from dispatcher_rig import Reply, call, init_args, split_at
from dispatcher_rig import request as _request

from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig

OFFSET_MAX = (1 << 63) - 1


def request(opcode: int, args: bytes = b"", nodeid: int = 1) -> tuple[bytes, int]:
    """A request from a root process in the guest (the share belongs to root)."""
    return _request(opcode, args, nodeid=nodeid, uid=0, gid=0)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def d(share: Path) -> Iterator[Dispatcher]:
    fs = PassthroughFS(PassthroughConfig(shared_dir=share, xattr=True))  # type: ignore[call-arg]
    disp = Dispatcher(fs, FuseConfig())
    assert call(disp, request(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF))).error == 0
    yield disp
    fs.destroy()
    fs.close()


def ok(r: Reply) -> Reply:
    assert r.n >= 16 and r.error == 0, r.error
    return r


def create(d: Dispatcher, name: bytes, flags: int = os.O_RDWR | os.O_CREAT) -> tuple[int, int]:
    args = abi.CREATE_IN.pack(flags, stat.S_IFREG | 0o644, 0o022, 0) + name + b"\0"
    r = ok(call(d, request(abi.FUSE_CREATE, args)))
    nodeid = abi.ENTRY_OUT.unpack_from(r.body)[0]
    fh = abi.OPEN_OUT.unpack_from(r.body, abi.ENTRY_OUT.size)[0]
    return nodeid, fh


def test_create_write_read_truncate(d: Dispatcher, share: Path) -> None:
    nodeid, fh = create(d, b"f")
    payload = os.urandom(20000)
    data, _ = request(
        abi.FUSE_WRITE,
        abi.WRITE_IN.pack(fh, 5, len(payload), 0, 0, os.O_RDWR, 0) + payload,
        nodeid=nodeid,
    )
    writable = [bytearray(16), bytearray(8)]
    n = d.handle(split_at(data, [40, 80, 81, 4177, 9000]), writable)
    assert n == 24 and abi.WRITE_OUT.unpack_from(writable[1]) == (len(payload), 0)
    assert (share / "f").read_bytes() == bytes(5) + payload
    read = abi.READ_IN.pack(fh, 5, 100, 0, 0, 0, 0)
    assert ok(call(d, request(abi.FUSE_READ, read, nodeid=nodeid))).body == payload[:100]
    vals = dict.fromkeys(abi.SETATTR_IN_FIELDS, 0)
    vals.update(valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=fh, size=7)
    args = abi.SETATTR_IN.pack(*(vals[f] for f in abi.SETATTR_IN_FIELDS))
    r = ok(call(d, request(abi.FUSE_SETATTR, args, nodeid=nodeid)))
    assert dict(zip(abi.ATTR_OUT_FIELDS, abi.ATTR_OUT.unpack(r.body), strict=True))["size"] == 7
    assert (share / "f").stat().st_size == 7
    ok(call(d, request(abi.FUSE_FSYNC, abi.FSYNC_IN.pack(fh, 1, 0), nodeid=nodeid)))
    ok(call(d, request(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid)))


def test_tree_changes_show_on_the_host(d: Dispatcher, share: Path) -> None:
    r = ok(call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o750, 0) + b"dir\0")))
    dir_id = abi.ENTRY_OUT.unpack_from(r.body)[0]
    assert stat.S_IMODE((share / "dir").stat().st_mode) == 0o750
    ok(call(d, request(abi.FUSE_SYMLINK, b"ln\0../target\0", nodeid=dir_id)))
    assert os.readlink(share / "dir" / "ln") == "../target"
    nodeid, _ = create(d, b"a")
    ok(call(d, request(abi.FUSE_LINK, abi.LINK_IN.pack(nodeid) + b"hard\0", nodeid=dir_id)))
    assert (share / "dir" / "hard").stat().st_ino == (share / "a").stat().st_ino
    args = abi.RENAME2_IN.pack(dir_id, abi.RENAME_NOREPLACE, 0) + b"a\0b\0"
    ok(call(d, request(abi.FUSE_RENAME2, args)))
    assert (share / "dir" / "b").exists() and not (share / "a").exists()
    args = abi.RENAME2_IN.pack(dir_id, abi.RENAME_NOREPLACE, 0) + b"b\0hard\0"
    assert call(d, request(abi.FUSE_RENAME2, args, nodeid=dir_id)).error == -errno.EEXIST
    ok(call(d, request(abi.FUSE_UNLINK, b"hard\0", nodeid=dir_id)))
    assert call(d, request(abi.FUSE_RMDIR, b"dir\0")).error == -errno.ENOTEMPTY
    assert not (share / "dir" / "hard").exists()


def test_xattrs_and_statx(d: Dispatcher, share: Path) -> None:
    nodeid, _ = create(d, b"x")
    args = abi.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.k\0abc"
    r = call(d, request(abi.FUSE_SETXATTR, args, nodeid=nodeid))
    if r.error == -errno.EOPNOTSUPP:
        pytest.skip("no user xattrs on this filesystem")
    ok(r)
    assert os.getxattr(share / "x", "user.k") == b"abc"
    ok(call(d, request(abi.FUSE_REMOVEXATTR, b"user.k\0", nodeid=nodeid)))
    assert "user.k" not in os.listxattr(share / "x")
    r = ok(call(d, request(abi.FUSE_STATX, abi.STATX_IN.pack(0, 0, 0, 0, 0xFFF), nodeid=nodeid)))
    out = dict(zip(abi.STATX_OUT_FIELDS, abi.STATX_OUT.unpack(r.body), strict=True))
    st = (share / "x").stat()
    assert (out["ino"], out["mode"], out["size"]) == (st.st_ino, st.st_mode, 0)


def test_guest_locks_are_seen_by_host_processes(d: Dispatcher, share: Path) -> None:
    nodeid, fh = create(d, b"locked")
    lk = abi.LK_IN.pack(fh, 0xAA, 0, OFFSET_MAX, fcntl.F_WRLCK, 1, 0, 0)
    ok(call(d, request(abi.FUSE_SETLK, lk, nodeid=nodeid)))
    with open(share / "locked", "r+b") as host:
        with pytest.raises(OSError) as ei:
            fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert ei.value.errno in (errno.EAGAIN, errno.EACCES)
    # another guest owner conflicts too, and GETLK reports the holder
    lk2 = abi.LK_IN.pack(fh, 0xBB, 0, 10, fcntl.F_WRLCK, 2, 0, 0)
    assert call(d, request(abi.FUSE_SETLK, lk2, nodeid=nodeid)).error == -errno.EAGAIN
    r = ok(call(d, request(abi.FUSE_GETLK, lk2, nodeid=nodeid)))
    assert abi.LK_OUT.unpack(r.body)[2] == fcntl.F_WRLCK
    unlock = abi.LK_IN.pack(fh, 0xAA, 0, OFFSET_MAX, fcntl.F_UNLCK, 1, 0, 0)
    ok(call(d, request(abi.FUSE_SETLK, unlock, nodeid=nodeid)))
    ok(call(d, request(abi.FUSE_SETLK, lk2, nodeid=nodeid)))


def test_tmpfile_copy_file_range_fallocate(d: Dispatcher, share: Path) -> None:
    args = abi.CREATE_IN.pack(os.O_RDWR, stat.S_IFREG | 0o600, 0, 0) + b"/\0"
    r = call(d, request(abi.FUSE_TMPFILE, args))
    if r.error == -errno.EOPNOTSUPP:
        pytest.skip("no O_TMPFILE on this filesystem")
    ok(r)
    tmp_id = abi.ENTRY_OUT.unpack_from(r.body)[0]
    tmp_fh = abi.OPEN_OUT.unpack_from(r.body, abi.ENTRY_OUT.size)[0]
    assert os.listdir(share) == []
    write = abi.WRITE_IN.pack(tmp_fh, 0, 6, 0, 0, os.O_RDWR, 0) + b"abcdef"
    assert ok(call(d, request(abi.FUSE_WRITE, write, nodeid=tmp_id))).body == b"\6\0\0\0\0\0\0\0"
    nodeid, fh = create(d, b"dst")
    args = abi.COPY_FILE_RANGE_IN.pack(tmp_fh, 2, nodeid, fh, 1, 3, 0)
    r = ok(call(d, request(abi.FUSE_COPY_FILE_RANGE, args, nodeid=tmp_id)))
    assert abi.WRITE_OUT.unpack(r.body) == (3, 0)
    assert (share / "dst").read_bytes() == b"\0cde"
    ok(
        call(
            d, request(abi.FUSE_FALLOCATE, abi.FALLOCATE_IN.pack(fh, 0, 8192, 0, 0), nodeid=nodeid)
        )
    )
    assert (share / "dst").stat().st_size == 8192
