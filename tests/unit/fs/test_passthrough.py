"""The passthrough backend against a real temporary directory, through the Filesystem API."""

from __future__ import annotations

import errno
import gc
import os
import resource
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Opened
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.readonly import ReadOnlyFS

CTX = Context(uid=0, gid=0, pid=1)
SECRET = b"outside-secret-0123456789"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """share/ with files, plus a secret file outside it."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"hello world")
    (share / "dir").mkdir()
    (share / "dir" / "inner").write_bytes(b"inner")
    return share


MakeFS = Callable[..., PassthroughFS]
#: For the tests about the O_PATH fds nodes hold (or that lookups run out of);
#: test_passthrough_handles.py has their file-handle counterparts.
fd_per_node = pytest.mark.fd_per_node("asserts the O_PATH fds the nodes hold")


@pytest.fixture
def fs(tree: Path, make_fs: MakeFS) -> Iterator[PassthroughFS]:
    f = make_fs(tree)
    yield f
    f.close()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)  # type: ignore[operator]
    assert ei.value.errno is not None
    return ei.value.errno


def same_stat(a: os.stat_result, b: os.stat_result) -> None:
    for f in (
        "st_mode",
        "st_ino",
        "st_dev",
        "st_nlink",
        "st_uid",
        "st_gid",
        "st_size",
        "st_blocks",
        "st_blksize",
        "st_rdev",
        "st_atime_ns",
        "st_mtime_ns",
        "st_ctime_ns",
    ):
        assert getattr(a, f) == getattr(b, f), f


# -- construction ------------------------------------------------------------


def test_missing_shared_dir_is_a_clear_error(tmp_path: Path, make_fs: MakeFS) -> None:
    with pytest.raises(FileNotFoundError, match="shared directory"):
        make_fs(tmp_path / "nope")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="shared directory"):
        make_fs(tmp_path / "f")


def test_root_is_node_1(fs: PassthroughFS, tree: Path) -> None:
    same_stat(fs.getattr(CTX, ROOT_ID, None).attr, os.lstat(tree))


# -- lookup / forget -----------------------------------------------------------


@fd_per_node
def test_lookup_counts_and_forget_closes(fs: PassthroughFS, tree: Path) -> None:
    before = open_fds()
    e1 = fs.lookup(CTX, ROOT_ID, b"file")
    e2 = fs.lookup(CTX, ROOT_ID, b"file")
    assert e1.nodeid == e2.nodeid != ROOT_ID
    assert e1.generation == 0
    node = fs.inodes.get(e1.nodeid)
    assert node is not None and node.lookups == 2
    assert len(open_fds() - before) == 1  # one O_PATH fd for two lookups
    same_stat(e1.attr, os.lstat(tree / "file"))
    del node
    fs.forget(e1.nodeid, 1)
    assert fs.inodes.get(e1.nodeid) is not None
    fs.forget(e1.nodeid, 1)
    assert fs.inodes.get(e1.nodeid) is None
    assert open_fds() == before
    assert errno_of(fs.getattr, CTX, e1.nodeid, None) == errno.EBADF


def test_node_ids_are_not_reused_nor_host_inodes(fs: PassthroughFS, tree: Path) -> None:
    e1 = fs.lookup(CTX, ROOT_ID, b"file")
    fs.forget(e1.nodeid, 1)
    e2 = fs.lookup(CTX, ROOT_ID, b"file")
    assert e2.nodeid > e1.nodeid
    assert e1.nodeid != os.lstat(tree / "file").st_ino


def test_forget_of_unknown_or_root_is_harmless(fs: PassthroughFS) -> None:
    fs.forget(12345, 1)
    fs.forget(ROOT_ID, 1 << 40)
    fs.batch_forget([(ROOT_ID, 5), (999, 2)])
    assert fs.getattr(CTX, ROOT_ID, None).attr is not None
    assert len(fs.inodes) == 1


def test_child_keeps_parent_until_forgotten(fs: PassthroughFS) -> None:
    before = open_fds()
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    inner = fs.lookup(CTX, d.nodeid, b"inner")
    fs.forget(d.nodeid, 1)
    # The parent stays: migration needs the path root -> dir -> inner.
    dnode = fs.inodes.get(d.nodeid)
    inode = fs.inodes.get(inner.nodeid)
    assert dnode is not None and dnode.lookups == 0
    assert inode is not None and (inode.parent, inode.name) == (d.nodeid, b"inner")
    del dnode, inode
    fs.batch_forget([(inner.nodeid, 1)])
    assert len(fs.inodes) == 1
    assert open_fds() == before


def test_hard_links_share_a_node_and_record_the_last_name(fs: PassthroughFS, tree: Path) -> None:
    os.link(tree / "file", tree / "dir" / "link")
    a = fs.lookup(CTX, ROOT_ID, b"file")
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    b = fs.lookup(CTX, d.nodeid, b"link")
    assert a.nodeid == b.nodeid
    node = fs.inodes.get(a.nodeid)
    assert node is not None
    assert (node.parent, node.name, node.lookups) == (d.nodeid, b"link", 2)
    del node
    fs.forget(a.nodeid, 2)
    fs.forget(d.nodeid, 1)
    assert len(fs.inodes) == 1


def test_dot_and_dotdot(fs: PassthroughFS) -> None:
    assert fs.lookup(CTX, ROOT_ID, b"..").nodeid == ROOT_ID
    assert fs.lookup(CTX, ROOT_ID, b".").nodeid == ROOT_ID
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    assert fs.lookup(CTX, d.nodeid, b".").nodeid == d.nodeid
    assert fs.lookup(CTX, d.nodeid, b"..").nodeid == ROOT_ID
    node = fs.inodes.get(d.nodeid)
    assert node is not None and (node.parent, node.name, node.lookups) == (ROOT_ID, b"dir", 2)
    del node
    fs.forget(d.nodeid, 2)
    assert len(fs.inodes) == 1


def test_lookup_missing_and_in_a_file(fs: PassthroughFS) -> None:
    assert errno_of(fs.lookup, CTX, ROOT_ID, b"missing") == errno.ENOENT
    f = fs.lookup(CTX, ROOT_ID, b"file")
    assert errno_of(fs.lookup, CTX, f.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(fs.lookup, CTX, 4242, b"file") == errno.EBADF
    assert len(fs.inodes) == 2


def test_concurrent_lookup_and_forget_keep_the_table_exact(fs: PassthroughFS, tree: Path) -> None:
    names = [f"f{i}".encode() for i in range(8)]
    for n in names:
        (tree / n.decode()).write_bytes(n)
    gc.collect()  # fds of objects earlier tests left behind close now, not mid-test
    before = open_fds()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                for n in names:
                    e = fs.lookup(CTX, ROOT_ID, n)
                    fs.forget(e.nodeid, 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert errors == []
    assert len(fs.inodes) == 1
    assert open_fds() == before


# -- attributes -------------------------------------------------------------


def test_getattr_matches_lstat(fs: PassthroughFS, tree: Path) -> None:
    os.symlink("file", tree / "sym")
    os.mkfifo(tree / "fifo")
    for name in ("file", "dir", "sym", "fifo"):
        e = fs.lookup(CTX, ROOT_ID, name.encode())
        same_stat(e.attr, os.lstat(tree / name))
        same_stat(fs.getattr(CTX, e.nodeid, None).attr, os.lstat(tree / name))


def test_getattr_with_handle(fs: PassthroughFS, tree: Path) -> None:
    e = fs.lookup(CTX, ROOT_ID, b"file")
    o = fs.open(CTX, e.nodeid, os.O_RDONLY)
    same_stat(fs.getattr(CTX, e.nodeid, o.fh).attr, os.lstat(tree / "file"))
    assert errno_of(fs.getattr, CTX, ROOT_ID, o.fh) == errno.EBADF  # fh of another node


def test_statfs_readlink(fs: PassthroughFS, tree: Path) -> None:
    assert fs.statfs(CTX, ROOT_ID).f_blocks == os.statvfs(tree).f_blocks
    os.symlink(b"some/where\xff", os.fsencode(tree) + b"/sym")
    e = fs.lookup(CTX, ROOT_ID, b"sym")
    assert fs.readlink(CTX, e.nodeid) == b"some/where\xff"
    assert errno_of(fs.readlink, CTX, ROOT_ID) == errno.EINVAL  # not a symlink


def test_access_checks_mode_bits_for_the_caller(fs: PassthroughFS, tree: Path) -> None:
    p = tree / "file"
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    e = fs.lookup(CTX, ROOT_ID, b"file")
    owner = Context(uid=1000, gid=5, pid=1)
    group = Context(uid=2000, gid=1000, pid=1)
    suppl = Context(uid=2000, gid=7, pid=1, groups=(1000,))
    other = Context(uid=3000, gid=3000, pid=1)
    fs.access(owner, e.nodeid, os.R_OK | os.W_OK)
    fs.access(group, e.nodeid, os.R_OK)
    fs.access(suppl, e.nodeid, os.R_OK)
    fs.access(other, e.nodeid, os.F_OK)
    assert errno_of(fs.access, group, e.nodeid, os.W_OK) == errno.EACCES
    assert errno_of(fs.access, other, e.nodeid, os.R_OK) == errno.EACCES
    assert errno_of(fs.access, owner, e.nodeid, os.X_OK) == errno.EACCES
    fs.access(CTX, e.nodeid, os.R_OK | os.W_OK)
    assert errno_of(fs.access, CTX, e.nodeid, os.X_OK) == errno.EACCES
    fs.access(CTX, ROOT_ID, os.X_OK)


# -- files ------------------------------------------------------------------


def test_read_sparse_file_into_memoryviews(fs: PassthroughFS, tree: Path) -> None:
    with open(tree / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"DATA")
    e = fs.lookup(CTX, ROOT_ID, b"sparse")
    o = fs.open(CTX, e.nodeid, os.O_RDONLY)
    a, b = bytearray(b"x" * 10), bytearray(b"y" * 10)
    n = fs.read(CTX, e.nodeid, o.fh, (1 << 20) - 10, 20, [memoryview(a), memoryview(b)])
    assert n == 14
    assert a == bytes(10) and b == b"DATAyyyyyy"
    assert fs.read(CTX, e.nodeid, o.fh, 1 << 21, 8, [memoryview(bytearray(8))]) == 0
    fs.flush(CTX, e.nodeid, o.fh, 0)
    fs.release(CTX, e.nodeid, o.fh, 0)
    buf = memoryview(bytearray(4))
    assert errno_of(fs.read, CTX, e.nodeid, o.fh, 0, 4, [buf]) == errno.EBADF
    assert errno_of(fs.release, CTX, e.nodeid, o.fh, 0) == errno.EBADF


def test_handles_are_unique_and_closed_on_release(fs: PassthroughFS) -> None:
    e = fs.lookup(CTX, ROOT_ID, b"file")
    before = open_fds()
    fhs = [fs.open(CTX, e.nodeid, os.O_RDONLY).fh for _ in range(5)]
    assert len(set(fhs)) == 5
    assert len(open_fds() - before) == 5
    for fh in fhs:
        fs.release(CTX, e.nodeid, fh, 0)
    assert open_fds() == before
    assert fs.open(CTX, e.nodeid, os.O_RDONLY).fh > max(fhs)


def test_open_flags_reach_the_host(fs: PassthroughFS, tree: Path) -> None:
    e = fs.lookup(CTX, ROOT_ID, b"file")
    o = fs.open(CTX, e.nodeid, os.O_RDWR | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL)
    h = fs.handles.get(o.fh, e.nodeid)
    fl = __import__("fcntl").fcntl(h.fd, __import__("fcntl").F_GETFL)
    assert fl & os.O_ACCMODE == os.O_RDWR
    assert os.get_inheritable(h.fd) is False


def test_lseek_data_and_hole(fs: PassthroughFS, tree: Path) -> None:
    with open(tree / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    e = fs.lookup(CTX, ROOT_ID, b"sparse")
    o = fs.open(CTX, e.nodeid, os.O_RDONLY)
    assert fs.lseek(CTX, e.nodeid, o.fh, 0, os.SEEK_DATA) == 1 << 20
    assert fs.lseek(CTX, e.nodeid, o.fh, 1 << 20, os.SEEK_HOLE) == (1 << 20) + 4096
    assert fs.lseek(CTX, e.nodeid, o.fh, 0, os.SEEK_END) == (1 << 20) + 4096
    assert errno_of(fs.lseek, CTX, e.nodeid, o.fh, (1 << 20) + 4096, os.SEEK_DATA) == errno.ENXIO
    assert errno_of(fs.lseek, CTX, e.nodeid, o.fh, 0, 17) == errno.EINVAL


# -- directories ---------------------------------------------------------------


def read_all(fs: PassthroughFS, nodeid: int, fh: int, offset: int = 0, plus: bool = False) -> list:  # type: ignore[type-arg]
    return list(fs.readdir(CTX, nodeid, fh, offset, plus))


def test_readdir_cookies_and_resume(fs: PassthroughFS, tree: Path) -> None:
    for i in range(300):  # more than one getdents64 batch
        (tree / "dir" / f"entry-{i:03d}-{'x' * 40}").write_bytes(b"")
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    o = fs.opendir(CTX, d.nodeid, os.O_RDONLY)
    ents = read_all(fs, d.nodeid, o.fh)
    names = [x.name for x in ents]
    assert sorted(names) == sorted(
        [b".", b".."] + [os.fsencode(n) for n in os.listdir(tree / "dir")]
    )
    assert len(set(x.offset for x in ents)) == len(ents)
    assert all(x.entry is None for x in ents)
    inner = next(x for x in ents if x.name == b"inner")
    assert inner.type == stat.S_IFREG >> 12 and inner.ino == os.lstat(tree / "dir" / "inner").st_ino
    for k in (0, 1, 150, len(ents) - 1):
        assert [x.name for x in read_all(fs, d.nodeid, o.fh, ents[k].offset)] == names[k + 1 :]
    # Cookies stay valid on another handle (they are the kernel's d_off).
    o2 = fs.opendir(CTX, d.nodeid, os.O_RDONLY)
    assert [x.name for x in read_all(fs, d.nodeid, o2.fh, ents[100].offset)] == names[101:]
    # Lazy: the dispatcher may stop early and resume from the last cookie it used.
    it = fs.readdir(CTX, d.nodeid, o.fh, 0, False)
    first = [next(it) for _ in range(3)]
    it.close()  # type: ignore[attr-defined]
    rest = read_all(fs, d.nodeid, o.fh, first[-1].offset)
    assert [x.name for x in first + rest] == names
    fs.releasedir(CTX, d.nodeid, o.fh, 0)
    assert errno_of(fs.readdir, CTX, d.nodeid, o.fh, 0, False) == errno.EBADF


def test_readdirplus_looks_up_every_entry(fs: PassthroughFS, tree: Path) -> None:
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    (tree / "dir" / "sub").mkdir()
    o = fs.opendir(CTX, d.nodeid, os.O_RDONLY)
    ents = read_all(fs, d.nodeid, o.fh, plus=True)
    by = {x.name: x for x in ents}
    assert by[b"."].entry is None and by[b".."].entry is None
    for name in (b"inner", b"sub"):
        ent = by[name].entry
        assert isinstance(ent, Entry)
        same_stat(ent.attr, os.lstat(tree / "dir" / name.decode()))
        node = fs.inodes.get(ent.nodeid)
        assert node is not None and node.lookups == 1 and node.parent == d.nodeid
    # A second READDIRPLUS counts again; forgetting everything empties the table.
    ents2 = read_all(fs, d.nodeid, o.fh, plus=True)
    items = [(x.entry.nodeid, 1) for x in ents + ents2 if x.entry is not None]
    fs.releasedir(CTX, d.nodeid, o.fh, 0)
    fs.batch_forget([*items, (d.nodeid, 1)])
    assert len(fs.inodes) == 1


def test_readdirplus_skips_vanished_entries(fs: PassthroughFS, tree: Path) -> None:
    for i in range(5):
        (tree / "dir" / f"v{i}").write_bytes(b"")
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    o = fs.opendir(CTX, d.nodeid, os.O_RDONLY)
    it = fs.readdir(CTX, d.nodeid, o.fh, 0, True)
    first = next(it)  # the batch is read now
    for i in range(5):
        os.unlink(tree / "dir" / f"v{i}")
    rest = list(it)
    assert rest and not any(x.name.startswith(b"v") for x in rest)
    assert {x.name for x in [first, *rest]} >= {b".", b"..", b"inner"}


def test_opendir_on_a_file_fails(fs: PassthroughFS) -> None:
    f = fs.lookup(CTX, ROOT_ID, b"file")
    assert errno_of(fs.opendir, CTX, f.nodeid, os.O_RDONLY) == errno.ENOTDIR
    assert len(fs.handles) == 0


def test_destroy_keeps_only_the_root(fs: PassthroughFS) -> None:
    import gc

    gc.collect()  # fds of earlier tests' garbage must not close in the middle
    before = open_fds()
    d = fs.lookup(CTX, ROOT_ID, b"dir")
    fs.lookup(CTX, d.nodeid, b"inner")
    fs.opendir(CTX, d.nodeid, os.O_RDONLY)
    fs.destroy()
    assert len(fs.inodes) == 1 and len(fs.handles) == 0
    assert open_fds() == before
    assert fs.lookup(CTX, ROOT_ID, b"dir").nodeid > d.nodeid


# -- cache policy ---------------------------------------------------------------


_DIRECT = {"direct_io": True}
_KEEP = {"keep_cache": True}
_DIR_CACHE = {"cache_dir": True, "keep_cache": True}


@pytest.mark.parametrize(
    ("mode", "timeout", "file_cache", "dir_cache"),
    [
        ("never", 0.0, _DIRECT, {}),
        ("metadata", 86400.0, _DIRECT, _DIR_CACHE),
        ("auto", 1.0, {}, {}),
        ("always", 86400.0, _KEEP, _DIR_CACHE),
    ],
)
def test_cache_policy(
    tree: Path,
    make_fs: MakeFS,
    mode: str,
    timeout: float,
    file_cache: dict[str, bool],
    dir_cache: dict[str, bool],
) -> None:
    fs = make_fs(tree, cache=mode)
    try:
        e = fs.lookup(CTX, ROOT_ID, b"file")
        assert (e.entry_timeout, e.attr_timeout) == (timeout, timeout)
        assert fs.getattr(CTX, e.nodeid, None).timeout == timeout
        o = fs.open(CTX, e.nodeid, os.O_RDONLY)
        assert o == Opened(o.fh, **file_cache)
        o = fs.opendir(CTX, ROOT_ID, os.O_RDONLY)
        assert o == Opened(o.fh, **dir_cache)
        assert fs.policy.readdirplus == (mode != "never")
    finally:
        fs.close()


def test_bad_cache_mode(tree: Path, make_fs: MakeFS) -> None:
    with pytest.raises(ValueError, match="cache"):
        make_fs(tree, cache="sometimes")


# -- xattrs -------------------------------------------------------------------


def test_xattr_off_is_enosys(fs: PassthroughFS) -> None:
    assert errno_of(fs.getxattr, CTX, ROOT_ID, b"user.a") == errno.ENOSYS
    assert errno_of(fs.listxattr, CTX, ROOT_ID) == errno.ENOSYS


def test_xattrs(tree: Path, make_fs: MakeFS) -> None:
    os.setxattr(tree / "file", "user.colour", b"blue")
    os.setxattr(tree / "file", "user.shape", b"")
    os.symlink("file", tree / "sym")
    os.mkfifo(tree / "fifo")
    os.setxattr(tree / "fifo", "trusted.pipe", b"p")  # user.* is for files and dirs only
    fs = make_fs(tree, xattr=True)
    try:
        f = fs.lookup(CTX, ROOT_ID, b"file")
        assert fs.getxattr(CTX, f.nodeid, b"user.colour") == b"blue"
        assert fs.getxattr(CTX, f.nodeid, b"user.shape") == b""
        names = fs.listxattr(CTX, f.nodeid)
        assert names.endswith(b"\0")
        assert {b"user.colour", b"user.shape"} <= set(names.split(b"\0"))
        assert errno_of(fs.getxattr, CTX, f.nodeid, b"user.none") == errno.ENODATA
        assert errno_of(fs.getxattr, CTX, f.nodeid, b"bad\0name") == errno.EINVAL
        # A symlink's own xattrs: never the target's.
        s = fs.lookup(CTX, ROOT_ID, b"sym")
        assert errno_of(fs.getxattr, CTX, s.nodeid, b"user.colour") == errno.ENODATA
        p = fs.lookup(CTX, ROOT_ID, b"fifo")
        done = run_with_timeout(lambda: fs.getxattr(CTX, p.nodeid, b"trusted.pipe"))
        assert done == b"p"
        assert fs.listxattr(CTX, ROOT_ID) == b"".join(
            os.fsencode(n) + b"\0" for n in os.listxattr(tree)
        )
    finally:
        fs.close()


# -- confinement ----------------------------------------------------------------


def run_with_timeout(fn: object, timeout: float = 10.0) -> object:
    """Run ``fn`` in a thread; fail the test if it has not returned in time."""
    result: list[object] = []

    def target() -> None:
        try:
            result.append(fn())  # type: ignore[operator]
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call blocked"
    return result[0]


@pytest.mark.parametrize(
    "name", [b"../outside", b"dir/inner", b"/etc/passwd", b"a\0b", b"../outside/secret"]
)
def test_names_that_are_not_one_component_are_refused(fs: PassthroughFS, name: bytes) -> None:
    assert errno_of(fs.lookup, CTX, ROOT_ID, name) == errno.EINVAL
    assert len(fs.inodes) == 1


def test_empty_name(fs: PassthroughFS) -> None:
    assert errno_of(fs.lookup, CTX, ROOT_ID, b"") == errno.ENOENT


@pytest.mark.parametrize("target", ["abs", "../outside/secret", "../outside"])
def test_symlinks_out_of_the_share_are_never_followed(
    fs: PassthroughFS, tree: Path, target: str
) -> None:
    if target == "abs":
        target = str(tree.parent / "outside" / "secret")
    os.symlink(target, tree / "escape")
    e = fs.lookup(CTX, ROOT_ID, b"escape")
    assert stat.S_ISLNK(e.attr.st_mode)
    same_stat(e.attr, os.lstat(tree / "escape"))
    assert fs.readlink(CTX, e.nodeid) == target.encode()
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_NOFOLLOW, os.O_RDWR):
        assert errno_of(fs.open, CTX, e.nodeid, flags) in (errno.ELOOP, errno.EBADF)
    assert errno_of(fs.opendir, CTX, e.nodeid, os.O_RDONLY) in (errno.ELOOP, errno.EBADF)
    assert errno_of(fs.lookup, CTX, e.nodeid, b"secret") == errno.ENOTDIR
    assert len(fs.handles) == 0


@fd_per_node
def test_escape_attempts_never_read_outside(fs: PassthroughFS, tree: Path) -> None:
    """Try every way in this slice to reach ../outside/secret; none returns its bytes."""
    os.symlink(tree.parent / "outside", tree / "out")
    got: list[bytes] = []
    for parent, name in [(ROOT_ID, b".."), (ROOT_ID, b"out"), (ROOT_ID, b"../outside")]:
        try:
            e = fs.lookup(CTX, ROOT_ID if parent == ROOT_ID else parent, name)
        except OSError:
            continue
        for sub in (b"secret", b"..", b"outside"):
            try:
                e2 = fs.lookup(CTX, e.nodeid, sub)
            except OSError:
                continue
            if e2.nodeid == ROOT_ID:
                continue
            for n in (b"secret", b"outside"):
                try:
                    e3 = fs.lookup(CTX, e2.nodeid, n)
                    o = fs.open(CTX, e3.nodeid, os.O_RDONLY)
                except OSError:
                    continue
                buf = bytearray(100)
                got.append(bytes(buf[: fs.read(CTX, e3.nodeid, o.fh, 0, 100, [memoryview(buf)])]))
    assert all(SECRET not in g for g in got)
    nodes_paths = {os.readlink(f"/proc/self/fd/{n.fd}") for n in fs.inodes}
    assert all(p == str(tree) or p.startswith(str(tree) + "/") for p in nodes_paths)


def test_fifo_open_does_not_block(fs: PassthroughFS, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    e = fs.lookup(CTX, ROOT_ID, b"fifo")
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        r = run_with_timeout(lambda f=flags: fs.open(CTX, e.nodeid, f))
        assert isinstance(r, OSError) and r.errno == errno.EBADF
    r = run_with_timeout(lambda: fs.opendir(CTX, e.nodeid, os.O_RDONLY))
    assert isinstance(r, OSError) and r.errno == errno.EBADF
    assert len(fs.handles) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_device_node_is_never_opened(fs: PassthroughFS, tree: Path) -> None:
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    e = fs.lookup(CTX, ROOT_ID, b"null")
    assert stat.S_ISCHR(e.attr.st_mode) and e.attr.st_rdev == os.makedev(1, 3)
    assert errno_of(fs.open, CTX, e.nodeid, os.O_RDONLY) == errno.EBADF
    assert len(fs.handles) == 0


@fd_per_node
def test_emfile_goes_to_the_request_and_the_daemon_keeps_serving(
    fs: PassthroughFS, tree: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gc.collect()  # fds of objects other tests left behind close now, not mid-test
    limit = max(open_fds()) + 10
    count = limit + 5  # more files than fd numbers below the limit, whatever closes meanwhile
    for i in range(count):
        (tree / f"m{i}").write_bytes(b"m")
    got: list[Entry] = []
    failed = None
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for i in range(count):
            try:
                got.append(fs.lookup(CTX, ROOT_ID, f"m{i}".encode()))
            except OSError as e:
                failed = (i, e.errno)
                break
        assert failed is not None and failed[1] == errno.EMFILE
        nodes = len(fs.inodes)
        assert nodes == 1 + len(got)
        # Other requests fail the same way, and change nothing.
        assert errno_of(fs.open, CTX, got[0].nodeid, os.O_RDONLY) == errno.EMFILE
        assert errno_of(fs.opendir, CTX, ROOT_ID, os.O_RDONLY) == errno.EMFILE
        assert len(fs.handles) == 0 and len(fs.inodes) == nodes
        # A lookup needs an fd to identify the inode, even a known one.
        assert errno_of(fs.lookup, CTX, ROOT_ID, b"m0") == errno.EMFILE
        node = fs.inodes.get(got[0].nodeid)
        assert node is not None and node.lookups == 1
        del node
        # Requests that need no new fd still work; FORGET frees fds.
        assert fs.getattr(CTX, got[-1].nodeid, None).attr.st_size == 1
        fs.forget(got[0].nodeid, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    i = failed[0]
    e = fs.lookup(CTX, ROOT_ID, f"m{i}".encode())
    o = fs.open(CTX, e.nodeid, os.O_RDONLY)
    buf = bytearray(1)
    assert fs.read(CTX, e.nodeid, o.fh, 0, 1, [memoryview(buf)]) == 1 and buf == b"m"


# -- read-only ---------------------------------------------------------------------


def test_readonly_share(tree: Path, make_fs: MakeFS) -> None:
    inner = make_fs(tree)
    fs = ReadOnlyFS(inner)
    try:
        assert fs.readonly and not inner.readonly
        assert fs.policy is inner.policy  # what is not the seam is the backend's
        e = fs.lookup(CTX, ROOT_ID, b"file")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_CREAT):
            assert errno_of(fs.open, CTX, e.nodeid, flags) == errno.EROFS
        assert errno_of(fs.opendir, CTX, ROOT_ID, os.O_RDWR) == errno.EROFS
        assert errno_of(fs.access, CTX, e.nodeid, os.W_OK) == errno.EROFS
        fs.access(CTX, e.nodeid, os.R_OK)
        o = fs.open(CTX, e.nodeid, os.O_RDONLY)
        buf = bytearray(5)
        assert fs.read(CTX, e.nodeid, o.fh, 0, 5, [memoryview(buf)]) == 5 and buf == b"hello"
        assert (tree / "file").read_bytes() == b"hello world"
    finally:
        fs.close()
    assert inner.inodes.root.fd < 0  # close() reached the backend


@pytest.fixture
def submount(tree: Path) -> Iterator[Path]:
    """A tmpfs mounted at share/mnt (needs root and a mount-capable sandbox)."""
    import subprocess

    mnt = tree / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("announce", [False, True])
def test_submounts_are_announced_on_request(
    tree: Path, make_fs: MakeFS, submount: Path, announce: bool
) -> None:
    (submount / "f").write_bytes(b"")
    fs = make_fs(tree, announce_submounts=announce)
    try:
        m = fs.lookup(CTX, ROOT_ID, b"mnt")
        assert m.submount is announce
        assert fs.lookup(CTX, ROOT_ID, b"dir").submount is False
        assert fs.lookup(CTX, m.nodeid, b"f").submount is False
    finally:
        fs.close()


@fd_per_node
def test_guest_fd_budget_gives_enfile_and_recovers(fs: PassthroughFS, tree: Path) -> None:
    for i in range(6):
        (tree / f"b{i}").write_bytes(b"b")
    fs.fd_limit = len(fs.inodes) + 3  # room for three more guest fds
    got = [fs.lookup(CTX, ROOT_ID, f"b{i}".encode()) for i in range(3)]
    assert errno_of(fs.lookup, CTX, ROOT_ID, b"b3") == errno.ENFILE
    assert errno_of(fs.open, CTX, got[0].nodeid, os.O_RDONLY) == errno.ENFILE
    assert errno_of(fs.mkdir, CTX, ROOT_ID, b"newdir", 0o755, 0) == errno.ENFILE
    assert not (tree / "newdir").exists()  # refused before anything was created
    # What needs no new fd still works; a FORGET makes room again.
    assert fs.getattr(CTX, got[1].nodeid, None).attr.st_size == 1
    fs.forget(got[0].nodeid, 1)
    assert fs.lookup(CTX, ROOT_ID, b"b3").nodeid > ROOT_ID
