"""The in-memory backend (fs/memory/), through the Filesystem API and the Dispatcher."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
from dispatcher_rig import call, init_args, request
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofsd_py.fs.api import ROOT_ID, Context, SetAttr
from virtiofsd_py.fs.memory import MemoryConfig, MemoryFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig

CTX = Context(uid=0, gid=0, pid=1)
USER = Context(uid=1000, gid=1000, pid=2)


def errno_of(exc: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc.value.errno


@pytest.fixture
def fs() -> MemoryFS:
    return MemoryFS()


def mkfile(fs: MemoryFS, name: bytes, data: bytes = b"", parent: int = ROOT_ID) -> int:
    entry, opened = fs.create(CTX, parent, name, 0o644, os.O_RDWR, 0o022)
    if data:
        assert fs.write(CTX, entry.nodeid, opened.fh, 0, [memoryview(data)], False) == len(data)
    fs.release(CTX, entry.nodeid, opened.fh, 0)
    return entry.nodeid


def read_all(fs: MemoryFS, nodeid: int) -> bytes:
    opened = fs.open(CTX, nodeid, os.O_RDONLY)
    size = fs.getattr(CTX, nodeid, None).attr.st_size
    bufs = [memoryview(bytearray(7)), memoryview(bytearray(size + 10))]
    n = fs.read(CTX, nodeid, opened.fh, 0, size + 17, bufs)
    fs.release(CTX, nodeid, opened.fh, 0)
    return (bytes(bufs[0]) + bytes(bufs[1]))[:n]


def names(fs: MemoryFS, nodeid: int, offset: int = 0) -> list[bytes]:
    opened = fs.opendir(CTX, nodeid, 0)
    out = [de.name for de in fs.readdir(CTX, nodeid, opened.fh, offset, False)]
    fs.releasedir(CTX, nodeid, opened.fh, 0)
    return out


def test_files_dirs_and_attributes(fs: MemoryFS) -> None:
    d = fs.mkdir(USER, ROOT_ID, b"d", 0o777, 0o022)
    assert stat.S_IMODE(d.attr.st_mode) == 0o755 and (d.attr.st_uid, d.attr.st_gid) == (1000, 1000)
    f = mkfile(fs, b"f", b"hello world", parent=d.nodeid)
    assert read_all(fs, f) == b"hello world"
    assert fs.getattr(CTX, d.nodeid, None).attr.st_nlink == 2
    fs.mkdir(CTX, d.nodeid, b"sub", 0o700, 0)
    assert fs.getattr(CTX, d.nodeid, None).attr.st_nlink == 3
    assert fs.getattr(CTX, ROOT_ID, None).attr.st_nlink == 3
    with pytest.raises(OSError) as e:
        fs.mkdir(CTX, d.nodeid, b"sub", 0o700, 0)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(OSError) as e:
        fs.lookup(CTX, ROOT_ID, b"missing")
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(OSError) as e:
        fs.mkdir(CTX, ROOT_ID, b"x" * 256, 0o700, 0)
    assert errno_of(e) == errno.ENAMETOOLONG


def test_setattr_truncate_chmod_chown_times(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"0123456789")
    r = fs.setattr(CTX, f, SetAttr(size=4))
    assert r.attr.st_size == 4 and read_all(fs, f) == b"0123"
    fs.setattr(CTX, f, SetAttr(size=6))
    assert read_all(fs, f) == b"0123\0\0"
    r = fs.setattr(CTX, f, SetAttr(mode=0o4711, uid=5, gid=6, mtime_ns=1_500_000_000))
    a = r.attr
    assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == (
        stat.S_IFREG | 0o4711,
        5,
        6,
        1_500_000_000,
    )
    with pytest.raises(OSError) as e:
        fs.setattr(CTX, ROOT_ID, SetAttr(size=0))
    assert errno_of(e) == errno.EISDIR


def test_symlinks_and_hard_links(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"x")
    ln = fs.symlink(CTX, ROOT_ID, b"ln", b"../somewhere")
    assert stat.S_ISLNK(ln.attr.st_mode) and ln.attr.st_size == len(b"../somewhere")
    assert fs.readlink(CTX, ln.nodeid) == b"../somewhere"
    h = fs.link(CTX, f, ROOT_ID, b"h")
    assert h.nodeid == f and h.attr.st_nlink == 2
    fs.unlink(CTX, ROOT_ID, b"f")
    assert fs.getattr(CTX, f, None).attr.st_nlink == 1 and read_all(fs, f) == b"x"
    with pytest.raises(OSError) as e:
        fs.link(CTX, ROOT_ID, ROOT_ID, b"dirlink")
    assert errno_of(e) == errno.EPERM


def test_lookup_counts_decide_when_a_node_goes(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"data")  # create took one lookup
    fs.lookup(CTX, ROOT_ID, b"f")
    fs.unlink(CTX, ROOT_ID, b"f")
    fs.forget(f, 1)
    assert fs.getattr(CTX, f, None).attr.st_nlink == 0  # one lookup left
    fs.forget(f, 1)
    with pytest.raises(OSError) as e:
        fs.getattr(CTX, f, None)
    assert errno_of(e) == errno.ESTALE


def test_open_handles_keep_unlinked_files(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"still here")
    opened = fs.open(CTX, f, os.O_RDONLY)
    fs.unlink(CTX, ROOT_ID, b"f")
    fs.forget(f, 1)
    buf = memoryview(bytearray(20))
    assert fs.read(CTX, f, opened.fh, 0, 20, [buf]) == 10
    fs.release(CTX, f, opened.fh, 0)
    with pytest.raises(OSError):
        fs.getattr(CTX, f, None)


def test_rename_rules(fs: MemoryFS) -> None:
    a = fs.mkdir(CTX, ROOT_ID, b"a", 0o755, 0).nodeid
    b = fs.mkdir(CTX, a, b"b", 0o755, 0).nodeid
    f = mkfile(fs, b"f", b"1")
    g = mkfile(fs, b"g", b"2")
    cases = [
        ((ROOT_ID, b"a", b, b"x", 0), errno.EINVAL),  # into its own subtree
        ((ROOT_ID, b"f", ROOT_ID, b"a", 0), errno.EISDIR),
        ((ROOT_ID, b"a", ROOT_ID, b"f", 0), errno.ENOTDIR),
        ((ROOT_ID, b"f", ROOT_ID, b"g", abi.RENAME_NOREPLACE), errno.EEXIST),
        ((ROOT_ID, b"f", ROOT_ID, b"none", abi.RENAME_EXCHANGE), errno.ENOENT),
        ((ROOT_ID, b"none", ROOT_ID, b"f", 0), errno.ENOENT),
        ((ROOT_ID, b"f", ROOT_ID, b"w", abi.RENAME_WHITEOUT), errno.EINVAL),
    ]
    for (p, n, np_, nn, flags), code in cases:
        with pytest.raises(OSError) as e:
            fs.rename(CTX, p, n, np_, nn, flags)
        assert errno_of(e) == code, (n, nn, flags)
    mkfile(fs, b"keep", parent=b)
    fs.mkdir(CTX, ROOT_ID, b"full", 0o755, 0)
    mkfile(fs, b"x", parent=fs.lookup(CTX, ROOT_ID, b"full").nodeid)
    fs.mkdir(CTX, ROOT_ID, b"empty", 0o755, 0)
    with pytest.raises(OSError) as e:
        fs.rename(CTX, ROOT_ID, b"empty", ROOT_ID, b"full", 0)
    assert errno_of(e) == errno.ENOTEMPTY
    fs.rename(CTX, ROOT_ID, b"f", ROOT_ID, b"g", 0)  # replaces g
    assert fs.lookup(CTX, ROOT_ID, b"g").nodeid == f
    assert fs.getattr(CTX, g, None).attr.st_nlink == 0
    fs.rename(CTX, ROOT_ID, b"a", ROOT_ID, b"empty", 0)  # a dir over an empty dir
    assert fs.lookup(CTX, ROOT_ID, b"empty").nodeid == a
    assert fs.getattr(CTX, ROOT_ID, None).attr.st_nlink == 4  # ., .., full, empty
    fs.rename(CTX, ROOT_ID, b"g", a, b"b", abi.RENAME_EXCHANGE)  # file <-> dir
    assert fs.lookup(CTX, a, b"b").nodeid == f
    assert fs.lookup(CTX, ROOT_ID, b"g").nodeid == b
    assert fs.getattr(CTX, a, None).attr.st_nlink == 2
    assert fs.lookup(CTX, b, b"..").nodeid == ROOT_ID


def test_readdir_cookies_are_stable(fs: MemoryFS) -> None:
    for i in range(10):
        mkfile(fs, b"f%d" % i)
    assert names(fs, ROOT_ID) == [b".", b".."] + [b"f%d" % i for i in range(10)]
    opened = fs.opendir(CTX, ROOT_ID, 0)
    first = list(fs.readdir(CTX, ROOT_ID, opened.fh, 0, False))[:5]
    # Changes elsewhere in the directory do not move the names already listed.
    fs.unlink(CTX, ROOT_ID, b"f1")
    fs.unlink(CTX, ROOT_ID, b"f7")
    mkfile(fs, b"new")
    rest = [de.name for de in fs.readdir(CTX, ROOT_ID, opened.fh, first[-1].offset, False)]
    assert rest == [b"f3", b"f4", b"f5", b"f6", b"f8", b"f9", b"new"]
    fs.releasedir(CTX, ROOT_ID, opened.fh, 0)


def test_readdirplus_takes_lookups(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f")
    fs.forget(f, 1)
    opened = fs.opendir(CTX, ROOT_ID, 0)
    entries = list(fs.readdir(CTX, ROOT_ID, opened.fh, 0, True))
    assert [e.entry is None for e in entries] == [True, True, False]
    fs.unlink(CTX, ROOT_ID, b"f")
    assert fs.getattr(CTX, f, None).attr.st_nlink == 0  # readdirplus's lookup holds it
    fs.forget(f, 1)
    with pytest.raises(OSError):
        fs.getattr(CTX, f, None)


def test_xattrs(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f")
    fs.setxattr(CTX, f, b"user.a", b"1", 0, False)
    fs.setxattr(CTX, f, b"trusted.b", b"22", 0, False)
    assert fs.getxattr(CTX, f, b"user.a") == b"1"
    assert fs.listxattr(CTX, f) == b"user.a\0trusted.b\0"
    for name, flags, code in [
        (b"user.a", 1, errno.EEXIST),  # XATTR_CREATE
        (b"user.c", 2, errno.ENODATA),  # XATTR_REPLACE
        (b"system.posix_acl_access", 0, errno.EOPNOTSUPP),
    ]:
        with pytest.raises(OSError) as e:
            fs.setxattr(CTX, f, name, b"v", flags, False)
        assert errno_of(e) == code
    ln = fs.symlink(CTX, ROOT_ID, b"ln", b"f").nodeid
    with pytest.raises(OSError) as e:
        fs.setxattr(CTX, ln, b"user.x", b"v", 0, False)
    assert errno_of(e) == errno.EPERM
    fs.removexattr(CTX, f, b"user.a")
    with pytest.raises(OSError) as e:
        fs.getxattr(CTX, f, b"user.a")
    assert errno_of(e) == errno.ENODATA
    off = MemoryFS(MemoryConfig(xattr=False))
    with pytest.raises(OSError) as e:
        off.listxattr(CTX, ROOT_ID)
    assert errno_of(e) == errno.ENOSYS


def test_capacity_statfs_and_readonly() -> None:
    fs = MemoryFS(MemoryConfig(capacity=64 * 1024, max_nodes=4))
    f = mkfile(fs, b"f", b"x" * 40000)
    sv = fs.statfs(CTX, ROOT_ID)
    assert (sv.f_bsize, sv.f_blocks, sv.f_bfree, sv.f_files) == (4096, 16, 6, 4)
    opened = fs.open(CTX, f, os.O_WRONLY)
    with pytest.raises(OSError) as e:
        fs.write(CTX, f, opened.fh, 40000, [memoryview(b"y" * 30000)], False)
    assert errno_of(e) == errno.ENOSPC
    mkfile(fs, b"g")
    mkfile(fs, b"h")
    with pytest.raises(OSError) as e:
        mkfile(fs, b"i")
    assert errno_of(e) == errno.ENOSPC
    ro = MemoryFS(MemoryConfig(readonly=True))
    with pytest.raises(OSError) as e:
        ro.mkdir(CTX, ROOT_ID, b"d", 0o755, 0)
    assert errno_of(e) == errno.EROFS
    assert ro.statfs(CTX, ROOT_ID).f_flag & os.ST_RDONLY


def test_append_tmpfile_lseek_fallocate(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"abc")
    opened = fs.open(CTX, f, os.O_WRONLY | os.O_APPEND)
    fs.write(CTX, f, opened.fh, 0, [memoryview(b"de")], False)
    fs.fallocate(CTX, f, opened.fh, 0, 0, 8)
    assert read_all(fs, f) == b"abcde\0\0\0"
    assert fs.lseek(CTX, f, opened.fh, 2, 3) == 2  # SEEK_DATA
    assert fs.lseek(CTX, f, opened.fh, 2, 4) == 8  # SEEK_HOLE
    fs.release(CTX, f, opened.fh, 0)
    entry, _ = fs.tmpfile(CTX, ROOT_ID, 0o600, os.O_RDWR, 0)
    assert entry.attr.st_nlink == 0 and b"" not in names(fs, ROOT_ID)[2:]
    fs.link(CTX, entry.nodeid, ROOT_ID, b"now-named")
    assert fs.lookup(CTX, ROOT_ID, b"now-named").nodeid == entry.nodeid


def test_destroy_drops_lookups_and_handles_not_contents(fs: MemoryFS) -> None:
    f = mkfile(fs, b"f", b"kept")
    opened = fs.open(CTX, f, os.O_RDONLY)
    fs.destroy()
    with pytest.raises(OSError) as e:
        fs.read(CTX, f, opened.fh, 0, 4, [memoryview(bytearray(4))])
    assert errno_of(e) == errno.EBADF
    assert read_all(fs, fs.lookup(CTX, ROOT_ID, b"f").nodeid) == b"kept"


def test_threads_creating_and_removing_concurrently(fs: MemoryFS) -> None:
    def worker(n: int) -> None:
        d = fs.mkdir(CTX, ROOT_ID, b"t%d" % n, 0o755, 0).nodeid
        for i in range(200):
            f = mkfile(fs, b"f%d" % i, b"%d" % i, parent=d)
            if i % 2:
                fs.unlink(CTX, d, b"f%d" % i)
            fs.forget(f, 1)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(4):
        d = fs.lookup(CTX, ROOT_ID, b"t%d" % n).nodeid
        assert names(fs, d)[2:] == [b"f%d" % i for i in range(0, 200, 2)]
    assert len(fs._nodes) == 1 + 4 + 4 * 100  # nothing unreachable is kept


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.binary(max_size=300)), max_size=12))
def test_writes_match_a_bytearray_model(writes: list[tuple[int, bytes]]) -> None:
    fs = MemoryFS()
    f = mkfile(fs, b"f")
    opened = fs.open(CTX, f, os.O_RDWR)
    model = bytearray()
    for off, data in writes:
        fs.write(CTX, f, opened.fh, off, [memoryview(data[:100]), memoryview(data[100:])], False)
        if data:
            if len(model) < off + len(data):
                model.extend(bytes(off + len(data) - len(model)))
            model[off : off + len(data)] = data
    assert read_all(fs, f) == bytes(model)
    assert fs.statfs(CTX, ROOT_ID).f_bfree == (1 << 30) // 4096 - (len(model) + 4095) // 4096


# -- through the dispatcher ---------------------------------------------------------


def test_through_the_dispatcher() -> None:
    fs = MemoryFS()
    d = Dispatcher(fs, FuseConfig(posix_locks=False, flock_locks=False))
    assert call(d, request(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF))).error == 0
    r = call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o750, 0) + b"dir\0", uid=0, gid=0))
    dir_id = abi.ENTRY_OUT.unpack_from(r.body)[0]
    args = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, 0o022, 0) + b"f\0"
    r = call(d, request(abi.FUSE_CREATE, args, nodeid=dir_id))
    assert r.error == 0
    nodeid = abi.ENTRY_OUT.unpack_from(r.body)[0]
    fh = abi.OPEN_OUT.unpack_from(r.body, abi.ENTRY_OUT.size)[0]
    payload = os.urandom(9000)
    w = abi.WRITE_IN.pack(fh, 0, len(payload), 0, 0, os.O_RDWR, 0) + payload
    assert call(d, request(abi.FUSE_WRITE, w, nodeid=nodeid)).error == 0
    read = abi.READ_IN.pack(fh, 100, 5000, 0, 0, 0, 0)
    r = call(d, request(abi.FUSE_READ, read, nodeid=nodeid), wsizes=(16, 1000, 4000))
    assert r.body == payload[100:5100]
    r = call(d, request(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), nodeid=dir_id))
    dfh = abi.OPEN_OUT.unpack_from(r.body)[0]
    r = call(
        d, request(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(dfh, 0, 4096, 0, 0, 0, 0), nodeid=dir_id)
    )
    assert r.error == 0 and b"f" in r.body
    r = call(d, request(abi.FUSE_STATFS, nodeid=ROOT_ID))
    assert r.error == 0
    r = call(d, request(abi.FUSE_RMDIR, b"dir\0"))
    assert r.error == -errno.ENOTEMPTY
    assert (
        call(d, request(abi.FUSE_GETLK, bytes(abi.LK_IN.size), nodeid=nodeid)).error
        == -errno.ENOSYS
    )
