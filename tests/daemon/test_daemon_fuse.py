"""FUSE requests against a real daemon, compared with what the host says (os.*).

One daemon serves the whole module (the ``session`` fixture): these tests
only read the tree.  FUSE ABI: Linux include/uapi/linux/fuse.h; virtio-fs:
virtio spec 5.11.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.frontend.fuse_client import (
    DEFAULT_INIT_FLAGS,
    Fields,
    FuseClient,
    FuseError,
)

if TYPE_CHECKING:
    from conftest import Session

ROOT = abi.FUSE_ROOT_ID


@pytest.fixture
def fuse(session: Session) -> FuseClient:
    return session.fuse


def assert_attr_matches(attr: Fields, st: os.stat_result) -> None:
    """fuse_attr fields against a host stat of the same file."""
    assert attr.ino == st.st_ino
    assert attr.mode == st.st_mode
    assert attr.size == st.st_size
    assert attr.nlink == st.st_nlink
    assert (attr.uid, attr.gid) == (st.st_uid, st.st_gid)
    assert attr.blocks == st.st_blocks
    assert (attr.mtime, attr.mtimensec) == divmod(st.st_mtime_ns, 1_000_000_000)
    assert (attr.ctime, attr.ctimensec) == divmod(st.st_ctime_ns, 1_000_000_000)


def lookup_open(fuse: FuseClient, name: str) -> tuple[int, int]:
    nodeid = fuse.lookup(ROOT, name).nodeid
    return nodeid, fuse.open(nodeid).fh


def test_init_reply(session: Session) -> None:
    out = session.fuse.init_out
    assert out is not None
    assert out.major == abi.FUSE_KERNEL_VERSION
    assert 27 <= out.minor <= 41  # never more than the client announced
    flags = abi.join_init_flags(out.flags, out.flags2)
    assert flags & ~DEFAULT_INIT_FLAGS == 0, f"flags not offered: {flags & ~DEFAULT_INIT_FLAGS:#x}"
    assert out.max_write >= 4096
    assert out.max_readahead <= 128 * 1024


def test_lookup_and_getattr_match_host(session: Session, fuse: FuseClient) -> None:
    for name in ("small.txt", "big.bin", "sparse.bin", "empty", "dir", "link"):
        st = os.lstat(session.tree.path(name))
        entry = fuse.lookup(ROOT, name)
        assert entry.nodeid not in (0, ROOT)
        assert_attr_matches(entry, st)
        assert_attr_matches(fuse.getattr(entry.nodeid), st)
    root = fuse.getattr(ROOT)
    assert_attr_matches(root, os.lstat(session.tree.root))
    assert stat.S_ISDIR(root.mode)


def test_lookup_is_stable_and_nested(session: Session, fuse: FuseClient) -> None:
    d = fuse.lookup(ROOT, "dir")
    assert fuse.lookup(ROOT, "dir").nodeid == d.nodeid
    a = fuse.lookup(d.nodeid, "a")
    assert_attr_matches(a, os.lstat(session.tree.path("dir/a")))


def test_lookup_missing(fuse: FuseClient) -> None:
    with pytest.raises(FuseError) as e:
        fuse.lookup(ROOT, "no-such-file")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FuseError) as e:
        fuse.lookup(fuse.lookup(ROOT, "small.txt").nodeid, "x")
    assert e.value.errno == errno.ENOTDIR


def test_readlink(fuse: FuseClient) -> None:
    assert fuse.readlink(fuse.lookup(ROOT, "link").nodeid) == b"small.txt"
    with pytest.raises(FuseError) as e:
        fuse.readlink(fuse.lookup(ROOT, "small.txt").nodeid)
    # readlink(2) says EINVAL; readlinkat(fd, "") on a non-link says ENOENT
    assert e.value.errno in (errno.EINVAL, errno.ENOENT)


def test_statfs(session: Session, fuse: FuseClient) -> None:
    out = fuse.statfs()
    vfs = os.statvfs(session.tree.root)
    assert out.blocks == vfs.f_blocks
    assert out.bsize == vfs.f_bsize
    assert out.frsize == vfs.f_frsize
    assert out.namelen == vfs.f_namemax
    assert out.files == vfs.f_files


def test_read_small(session: Session, fuse: FuseClient) -> None:
    nodeid, fh = lookup_open(fuse, "small.txt")
    small = session.tree.small
    assert fuse.read(nodeid, fh, 0, 4096) == small
    assert fuse.read(nodeid, fh, 7, 3) == small[7:10]
    assert fuse.read(nodeid, fh, len(small), 4096) == b""
    assert fuse.read(nodeid, fh, 1 << 40, 4096) == b""
    fuse.release(nodeid, fh)


@pytest.mark.parametrize("indirect", [True, False])
@pytest.mark.parametrize(
    ("offset", "size"), [(0, 1 << 20), (12345, 1 << 20), ((1 << 20) - 100, 1 << 20), (4095, 8193)]
)
def test_read_large(
    session: Session, fuse: FuseClient, indirect: bool, offset: int, size: int
) -> None:
    nodeid, fh = lookup_open(fuse, "big.bin")
    data = fuse.read(nodeid, fh, offset, size, indirect=indirect)
    assert data == session.tree.big[offset : offset + size]
    fuse.release(nodeid, fh)


@pytest.mark.parametrize("split", [1, 512, 1000, 3 * 4096])
def test_read_split_across_many_descriptors(session: Session, fuse: FuseClient, split: int) -> None:
    """Reply buffers cut into descriptors of odd sizes; data must land across all of them."""
    nodeid, fh = lookup_open(fuse, "big.bin")
    size = 200 if split == 1 else 64 * 1024
    data = fuse.read(nodeid, fh, 777, size, split=split)
    assert data == session.tree.big[777 : 777 + size]
    fuse.release(nodeid, fh)


def test_read_sparse(session: Session, fuse: FuseClient) -> None:
    t = session.tree
    nodeid, fh = lookup_open(fuse, "sparse.bin")
    assert fuse.read(nodeid, fh, 0, 65536) == bytes(65536)
    start = t.sparse_data_at - 100
    got = fuse.read(nodeid, fh, start, 100 + len(t.sparse_data) + 100)
    assert got == bytes(100) + t.sparse_data + bytes(100)
    tail = fuse.read(nodeid, fh, t.sparse_size - 10, 4096)
    assert tail == bytes(10)
    fuse.release(nodeid, fh)


def test_lseek_data_and_hole(session: Session, fuse: FuseClient) -> None:
    nodeid, fh = lookup_open(fuse, "sparse.bin")
    hostfd = os.open(session.tree.path("sparse.bin"), os.O_RDONLY)
    try:
        for offset, whence in [
            (0, os.SEEK_DATA),
            (0, os.SEEK_HOLE),
            (session.tree.sparse_data_at, os.SEEK_HOLE),
        ]:
            assert fuse.lseek(nodeid, fh, offset, whence) == os.lseek(hostfd, offset, whence)
        with pytest.raises(FuseError) as e:
            fuse.lseek(nodeid, fh, session.tree.sparse_size + 1, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(hostfd)
    fuse.release(nodeid, fh)


def test_many_reads_in_flight(session: Session, fuse: FuseClient) -> None:
    """16 requests published with one kick, completed in any order."""
    nodeid, fh = lookup_open(fuse, "big.bin")
    q = fuse.fe.queues[fuse.queue]
    kicks = q.kicks
    pendings = [
        fuse.submit(abi.FUSE_READ, nodeid, fuse.read_args(fh, i * 4096, 4096), 4096, kick=False)
        for i in range(16)
    ]
    q.kick(force=True)
    assert q.kicks == kicks + 1
    fuse.wait(pendings)
    for i, p in enumerate(pendings):
        assert fuse.reply(p).payload == session.tree.big[i * 4096 : (i + 1) * 4096]
    fuse.release(nodeid, fh)


def read_whole_dir(fuse: FuseClient, nodeid: int, *, plus: bool, size: int) -> list[bytes]:
    fh = fuse.opendir(nodeid).fh
    names: list[bytes] = []
    offset = 0
    while True:
        batch = (fuse.readdirplus if plus else fuse.readdir)(nodeid, fh, offset, size)
        if not batch:
            break
        for d in batch:
            names.append(d.name)
            if plus and d.entry is not None and d.entry.nodeid and d.name not in (b".", b".."):
                fuse.forget(d.entry.nodeid, 1)
        offset = batch[-1].off
    fuse.releasedir(nodeid, fh)
    return names


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_pages_through_everything(session: Session, fuse: FuseClient, plus: bool) -> None:
    many = fuse.lookup(ROOT, "many").nodeid
    names = read_whole_dir(fuse, many, plus=plus, size=1024)
    expected = sorted([b".", b".."] + [n.encode() for n in os.listdir(session.tree.path("many"))])
    assert sorted(names) == expected
    assert len(names) == session.tree.many + 2


def test_readdir_types_and_inodes(session: Session, fuse: FuseClient) -> None:
    d = fuse.lookup(ROOT, "dir").nodeid
    fh = fuse.opendir(d).fh
    entries = {e.name: e for e in fuse.readdir(d, fh, 0, 4096)}
    fuse.releasedir(d, fh)
    assert set(entries) == {b".", b"..", b"a", b"sub"}
    for name in ("a", "sub"):
        st = os.lstat(session.tree.path(f"dir/{name}"))
        assert entries[name.encode()].ino == st.st_ino
        assert entries[name.encode()].type == stat.S_IFMT(st.st_mode) >> 12


def test_readdirplus_entries(session: Session, fuse: FuseClient) -> None:
    d = fuse.lookup(ROOT, "dir").nodeid
    fh = fuse.opendir(d).fh
    entries = {e.name: e for e in fuse.readdirplus(d, fh, 0, 8192)}
    fuse.releasedir(d, fh)
    assert set(entries) == {b".", b"..", b"a", b"sub"}
    for name in ("a", "sub"):
        e = entries[name.encode()].entry
        assert e is not None
        assert_attr_matches(e, os.lstat(session.tree.path(f"dir/{name}")))
        # the entry is looked up: the same node as a LOOKUP returns
        assert fuse.lookup(d, name).nodeid == e.nodeid
        fuse.batch_forget([(e.nodeid, 2)])


def test_getxattr(session: Session, fuse: FuseClient) -> None:
    t = session.tree
    if not t.xattrs:
        pytest.skip("host file system has no user xattrs")
    nodeid = fuse.lookup(ROOT, "small.txt").nodeid
    assert fuse.getxattr(nodeid, t.xattr_name, 0) == len(t.xattr_value)
    assert fuse.getxattr(nodeid, t.xattr_name, 256) == t.xattr_value
    with pytest.raises(FuseError) as e:
        fuse.getxattr(nodeid, t.xattr_name, 3)
    assert e.value.errno == errno.ERANGE
    with pytest.raises(FuseError) as e:
        fuse.getxattr(nodeid, b"user.nonexistent", 256)
    assert e.value.errno == errno.ENODATA
    names = fuse.listxattr(nodeid, 4096)
    assert isinstance(names, bytes)
    assert t.xattr_name in names.split(b"\0")


def test_forget_and_batch_forget_on_hiprio(fuse: FuseClient) -> None:
    hiprio = fuse.fe.queues[0]
    before = hiprio.avail_idx
    ids = [fuse.lookup(ROOT, "small.txt").nodeid for _ in range(3)]
    assert len(set(ids)) == 1
    fuse.forget(ids[0], 1)
    fuse.batch_forget([(ids[0], 1), (ids[0], 1)])
    assert hiprio.avail_idx == (before + 2) & 0xFFFF
    assert hiprio.used_idx == hiprio.avail_idx
    # the daemon still knows the file
    assert fuse.lookup(ROOT, "small.txt").size == len(b"hello, virtio-fs\n")


def test_release_invalidates_handle(fuse: FuseClient) -> None:
    nodeid, fh = lookup_open(fuse, "small.txt")
    fuse.release(nodeid, fh)
    with pytest.raises(FuseError) as e:
        fuse.read(nodeid, fh, 0, 10)
    assert e.value.errno == errno.EBADF


def test_bad_names_at_root(session: Session, fuse: FuseClient) -> None:
    """Nothing outside the share is reachable by name, and the daemon keeps answering."""
    root_ino = os.lstat(session.tree.root).st_ino
    for name in (b"../outside", b"/etc", b"..", b"dir/../..", b"dir/../../outside"):
        try:
            entry = fuse.lookup(ROOT, name)
        except FuseError as e:
            assert e.errno in (errno.EINVAL, errno.ENOENT, errno.EPERM, errno.EACCES), name
        else:
            # ".." of the root is the root (as in a chroot), never the host parent.
            assert entry.ino == root_ino, name


@pytest.mark.ours_only
def test_names_with_slash_or_nul_are_rejected(fuse: FuseClient) -> None:
    """A guest kernel never sends these: EINVAL, not a path walk (virtiofsd 1.13
    walks "dir/a" and its queue thread panics on an interior NUL)."""
    for name in (b"dir/a", b"dir/", b"/", b"a\0b", b""):
        try:
            entry = fuse.lookup(ROOT, name)
        except FuseError as e:
            assert e.errno in (errno.EINVAL, errno.ENOENT), name
        else:
            pytest.fail(f"{name!r} was looked up: ino {entry.ino}")
    assert fuse.lookup(ROOT, "small.txt").size > 0


@pytest.mark.ours_only
def test_dotdot_lookup(session: Session, fuse: FuseClient) -> None:
    """With FUSE_EXPORT_SUPPORT the kernel may look up ".." (fuse.h); virtiofsd 1.13
    answers with the directory itself."""
    root_ino = os.lstat(session.tree.root).st_ino
    d = fuse.lookup(ROOT, "dir").nodeid
    sub = fuse.lookup(d, "sub").nodeid
    assert fuse.lookup(sub, "..").ino == os.lstat(session.tree.path("dir")).st_ino
    assert fuse.lookup(d, "..").ino == root_ino
    assert fuse.lookup(ROOT, "..").ino == root_ino


@pytest.mark.parametrize("name", ["escape_abs", "escape_rel"])
def test_symlink_out_of_share(session: Session, fuse: FuseClient, name: str) -> None:
    """Lookup sees the link itself; nothing outside the share is ever read."""
    entry = fuse.lookup(ROOT, name)
    assert stat.S_ISLNK(entry.mode)
    assert entry.ino == os.lstat(session.tree.path(name)).st_ino
    assert fuse.readlink(entry.nodeid) == os.readlink(session.tree.path(name)).encode()
    try:
        fh = fuse.open(entry.nodeid).fh
    except FuseError:
        pass  # virtiofsd says EBADF, a host open(O_NOFOLLOW) ELOOP: either is safe
    else:
        try:
            data = fuse.read(entry.nodeid, fh, 0, 4096)
        except FuseError:
            data = b""
        assert session.tree.outside_secret not in data
        fuse.release(entry.nodeid, fh)
    with pytest.raises(FuseError):
        fuse.lookup(entry.nodeid, "x")
