"""The write side of the passthrough backend, compared with the same syscalls on the host."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtiofsd_py.fs.api import NOW, ROOT_ID, Context, Lock, SessionInfo, SetAttr
from virtiofsd_py.fs.passthrough.creds import IS_ROOT, Credentials, thread_ids
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.locks import OFFSET_MAX
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.fs.readonly import ReadOnlyFS
from virtiofsd_py.host.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT

ROOT = Context(uid=0, gid=0, pid=1)
USER = Context(uid=1000, gid=1000, pid=2)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="credential switching needs root")


MakeFS = Callable[..., PassthroughFS]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / "file").write_bytes(b"hello world")
    (d / "dir").mkdir()
    return d


@pytest.fixture
def fs(share: Path, make_fs: MakeFS) -> Iterator[PassthroughFS]:
    f = make_fs(share)
    yield f
    f.close()


def errno_of(fn: object, *args: object, **kw: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)  # type: ignore[operator]
    assert ei.value.errno is not None
    return ei.value.errno


def host_errno(fn: object, *args: object, **kw: object) -> int:
    """errno of the same syscall on the host."""
    return errno_of(fn, *args, **kw)


def session(**agreed: bool) -> SessionInfo:
    return SessionInfo(7, 38, 1 << 20, 1 << 20, **agreed)


def mv(b: bytes) -> list[memoryview]:
    return [memoryview(bytearray(b))]


# -- creating ----------------------------------------------------------------------------


def test_create_opens_a_new_file_and_counts_a_lookup(fs: PassthroughFS, share: Path) -> None:
    e, o = fs.create(ROOT, ROOT_ID, b"new", stat.S_IFREG | 0o640, os.O_RDWR, 0)
    assert stat.S_ISREG(e.attr.st_mode) and stat.S_IMODE(e.attr.st_mode) == 0o640
    assert e.attr.st_ino == os.lstat(share / "new").st_ino
    node = fs.inodes.get(e.nodeid)
    assert node is not None and node.lookups == 1 and node.name == b"new"
    assert fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"abc"), False) == 3
    assert (share / "new").read_bytes() == b"abc"
    # The same name again: EEXIST with O_EXCL, else the existing file is opened.
    assert errno_of(fs.create, ROOT, ROOT_ID, b"new", 0o644, os.O_RDWR | os.O_EXCL, 0) == (
        errno.EEXIST
    )
    e2, o2 = fs.create(ROOT, ROOT_ID, b"new", 0o644, os.O_RDWR | os.O_TRUNC, 0)
    assert e2.nodeid == e.nodeid and (share / "new").read_bytes() == b""
    assert fs.inodes.get(e.nodeid).lookups == 2  # type: ignore[union-attr]
    fs.release(ROOT, e.nodeid, o.fh, 0)
    fs.release(ROOT, e.nodeid, o2.fh, 0)


def test_create_over_a_fifo_never_opens_it(fs: PassthroughFS, share: Path) -> None:
    os.mkfifo(share / "fifo")
    # Opening a fifo for reading would block: the backend must refuse instead.
    assert errno_of(fs.create, ROOT, ROOT_ID, b"fifo", 0o644, os.O_RDONLY, 0) == errno.EEXIST
    assert errno_of(fs.create, ROOT, ROOT_ID, b"dir", 0o644, os.O_RDONLY, 0) == errno.EISDIR


def test_umask_applies_per_request(fs: PassthroughFS, share: Path) -> None:
    e = fs.mkdir(ROOT, ROOT_ID, b"d", 0o777, 0o027)
    assert stat.S_IMODE(os.lstat(share / "d").st_mode) == 0o750
    assert stat.S_IMODE(e.attr.st_mode) == 0o750
    e, _ = fs.create(ROOT, ROOT_ID, b"f", 0o666, os.O_WRONLY, 0)
    assert stat.S_IMODE(e.attr.st_mode) == 0o666  # umask 0: the host's own umask is not used
    old = os.umask(0o022)
    os.umask(old)
    assert old == 0o022 or old == os.umask(old)  # this thread's umask is restored


def test_mknod_types(fs: PassthroughFS, share: Path) -> None:
    for name, fmt in ((b"reg", stat.S_IFREG), (b"fifo", stat.S_IFIFO), (b"sock", stat.S_IFSOCK)):
        e = fs.mknod(ROOT, ROOT_ID, name, fmt | 0o600, 0, 0)
        assert stat.S_IFMT(os.lstat(share / name.decode()).st_mode) == fmt
        assert stat.S_IFMT(e.attr.st_mode) == fmt
    assert errno_of(fs.mknod, ROOT, ROOT_ID, b"dir2", stat.S_IFDIR | 0o700, 0, 0) == errno.EINVAL
    # A device node: as the host allows (root with CAP_MKNOD here; never opened).
    dev = os.makedev(1, 3)
    try:
        os.mknod(share / "probe", stat.S_IFCHR | 0o600, dev)
    except PermissionError:
        assert errno_of(fs.mknod, ROOT, ROOT_ID, b"null", stat.S_IFCHR | 0o600, dev, 0) == (
            errno.EPERM
        )
    else:
        e = fs.mknod(ROOT, ROOT_ID, b"null", stat.S_IFCHR | 0o600, dev, 0)
        assert e.attr.st_rdev == dev
        assert errno_of(fs.open, ROOT, e.nodeid, os.O_RDWR) == errno.EBADF


def test_mkdir_symlink_link_unlink_rmdir(fs: PassthroughFS, share: Path) -> None:
    d = fs.mkdir(ROOT, ROOT_ID, b"sub", 0o755, 0)
    assert (share / "sub").is_dir()
    assert errno_of(fs.mkdir, ROOT, ROOT_ID, b"sub", 0o755, 0) == errno.EEXIST
    s = fs.symlink(ROOT, d.nodeid, b"ln", b"../file")
    assert os.readlink(share / "sub" / "ln") == "../file"
    assert fs.readlink(ROOT, s.nodeid) == b"../file"
    f = fs.lookup(ROOT, ROOT_ID, b"file")
    l1 = fs.link(ROOT, f.nodeid, d.nodeid, b"hard")
    assert l1.nodeid == f.nodeid and l1.attr.st_nlink == 2
    ls = fs.link(ROOT, s.nodeid, ROOT_ID, b"ln2")  # a hard link to the symlink itself
    assert ls.nodeid == s.nodeid and os.readlink(share / "ln2") == "../file"
    assert errno_of(fs.link, ROOT, f.nodeid, d.nodeid, b"hard") == errno.EEXIST
    assert errno_of(fs.rmdir, ROOT, ROOT_ID, b"sub") == host_errno(os.rmdir, share / "sub")
    assert errno_of(fs.unlink, ROOT, ROOT_ID, b"sub") == host_errno(os.unlink, share / "sub")
    fs.unlink(ROOT, d.nodeid, b"hard")
    fs.unlink(ROOT, d.nodeid, b"ln")
    fs.rmdir(ROOT, ROOT_ID, b"sub")
    assert not (share / "sub").exists()
    assert errno_of(fs.unlink, ROOT, ROOT_ID, b"nope") == errno.ENOENT
    assert errno_of(fs.unlink, ROOT, ROOT_ID, b"a/b") == errno.EINVAL


def test_rename_and_rename2_flags(fs: PassthroughFS, share: Path) -> None:
    (share / "a").write_bytes(b"A")
    (share / "b").write_bytes(b"B")
    assert errno_of(fs.rename, ROOT, ROOT_ID, b"a", ROOT_ID, b"b", RENAME_NOREPLACE) == (
        errno.EEXIST
    )
    fs.rename(ROOT, ROOT_ID, b"a", ROOT_ID, b"b", RENAME_EXCHANGE)
    assert (share / "a").read_bytes() == b"B" and (share / "b").read_bytes() == b"A"
    fs.rename(ROOT, ROOT_ID, b"a", ROOT_ID, b"c", RENAME_NOREPLACE)
    assert not (share / "a").exists() and (share / "c").read_bytes() == b"B"
    d = fs.lookup(ROOT, ROOT_ID, b"dir")
    fs.rename(ROOT, ROOT_ID, b"c", d.nodeid, b"b", 0)  # replaces nothing, moves directories
    fs.rename(ROOT, d.nodeid, b"b", ROOT_ID, b"b", 0)  # replaces b
    assert (share / "b").read_bytes() == b"B"
    assert errno_of(fs.rename, ROOT, ROOT_ID, b"b", ROOT_ID, b"x", 1 << 5) == errno.EINVAL
    try:
        fs.rename(ROOT, ROOT_ID, b"b", ROOT_ID, b"w", RENAME_WHITEOUT)
    except OSError as e:
        pytest.skip(f"RENAME_WHITEOUT not supported here: {e}")
    st = os.lstat(share / "b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (share / "w").read_bytes() == b"B"


def test_tmpfile(fs: PassthroughFS, share: Path) -> None:
    before = set(os.listdir(share))
    e, o = fs.tmpfile(ROOT, ROOT_ID, 0o600, os.O_RDWR, 0)
    assert set(os.listdir(share)) == before  # no name
    assert stat.S_ISREG(e.attr.st_mode) and e.attr.st_nlink == 0
    assert fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"tmp"), False) == 3
    buf = bytearray(3)
    assert fs.read(ROOT, e.nodeid, o.fh, 0, 3, [memoryview(buf)]) == 3 and buf == b"tmp"
    # linkat() of the unnamed file gives it a name, as on the host.
    fs.link(ROOT, e.nodeid, ROOT_ID, b"named")
    assert (share / "named").read_bytes() == b"tmp"
    assert errno_of(fs.tmpfile, ROOT, ROOT_ID, 0o600, os.O_RDONLY, 0) == errno.EINVAL


# -- setattr -------------------------------------------------------------------------------


def test_setattr_without_handle(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    r = fs.setattr(ROOT, e.nodeid, SetAttr(mode=0o4711))
    assert stat.S_IMODE(os.lstat(share / "file").st_mode) == 0o4711
    assert stat.S_IMODE(r.attr.st_mode) == 0o4711
    fs.setattr(ROOT, e.nodeid, SetAttr(uid=123, gid=456))
    st = os.lstat(share / "file")
    assert (st.st_uid, st.st_gid) == (123, 456)
    fs.setattr(ROOT, e.nodeid, SetAttr(size=5))
    assert (share / "file").read_bytes() == b"hello"
    fs.setattr(
        ROOT,
        e.nodeid,
        SetAttr(atime_ns=1_500_000_001, mtime_ns=7),
    )
    st = os.lstat(share / "file")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_001, 7)
    # MTIME_NOW with ATIME omitted.
    t0 = time.time_ns()
    fs.setattr(ROOT, e.nodeid, SetAttr(mtime_ns=NOW))
    st = os.lstat(share / "file")
    assert st.st_atime_ns == 1_500_000_001 and st.st_mtime_ns >= t0 - 10_000_000


def test_setattr_on_symlink_and_fifo_never_follows_or_opens(fs: PassthroughFS, share: Path) -> None:
    os.symlink("file", share / "ln")
    os.mkfifo(share / "fifo")
    target = os.lstat(share / "file")
    s = fs.lookup(ROOT, ROOT_ID, b"ln")
    fs.setattr(ROOT, s.nodeid, SetAttr(uid=77))
    fs.setattr(ROOT, s.nodeid, SetAttr(mtime_ns=5_000_000_000))
    assert os.lstat(share / "ln").st_uid == 77 and os.lstat(share / "ln").st_mtime_ns == 5 * 10**9
    assert os.lstat(share / "file").st_uid == target.st_uid
    assert os.lstat(share / "file").st_mtime_ns == target.st_mtime_ns
    f = fs.lookup(ROOT, ROOT_ID, b"fifo")
    fs.setattr(ROOT, f.nodeid, SetAttr(mode=0o600))  # would block if opened
    assert errno_of(fs.setattr, ROOT, f.nodeid, SetAttr(size=0)) == host_errno(
        os.truncate, share / "fifo", 0
    )
    d = fs.lookup(ROOT, ROOT_ID, b"dir")
    assert errno_of(fs.setattr, ROOT, d.nodeid, SetAttr(size=0)) == host_errno(
        os.truncate, share / "dir", 0
    )


def test_setattr_through_handle(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.setattr(ROOT, e.nodeid, SetAttr(fh=o.fh, size=2))
    assert (share / "file").read_bytes() == b"he"
    # The handle works after the name is gone: ftruncate on the handle's fd.
    os.unlink(share / "file")
    r = fs.setattr(
        ROOT,
        e.nodeid,
        SetAttr(fh=o.fh, size=9, mode=0o600),
    )
    assert r.attr.st_size == 9 and stat.S_IMODE(r.attr.st_mode) == 0o600
    assert errno_of(fs.setattr, ROOT, e.nodeid, SetAttr(size=0, fh=999)) == errno.EBADF


# -- writing ------------------------------------------------------------------------------


def test_write_from_several_buffers_and_append(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_WRONLY)
    assert fs.write(ROOT, e.nodeid, o.fh, 6, [*mv(b"WO"), *mv(b"RLD")], False) == 5
    assert (share / "file").read_bytes() == b"hello WORLD"
    a = fs.open(ROOT, e.nodeid, os.O_WRONLY | os.O_APPEND)
    with open(share / "file", "ab") as host:  # a host writer moves the end of file
        host.write(b"!")
    assert fs.write(ROOT, e.nodeid, a.fh, 0, mv(b"+"), False) == 1
    assert (share / "file").read_bytes() == b"hello WORLD!+"
    r = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    assert errno_of(fs.write, ROOT, e.nodeid, r.fh, 0, mv(b"x"), False) == errno.EBADF


def test_writeback_opens_write_only_files_readable(share: Path, make_fs: MakeFS) -> None:
    fs = make_fs(share)
    try:
        fs.init(session(writeback_cache=True))
        e = fs.lookup(ROOT, ROOT_ID, b"file")
        o = fs.open(ROOT, e.nodeid, os.O_WRONLY | os.O_APPEND)
        buf = bytearray(5)
        assert fs.read(ROOT, e.nodeid, o.fh, 0, 5, [memoryview(buf)]) == 5
        # The guest computes append offsets itself: the offset is honoured.
        fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"J"), False)
        assert (share / "file").read_bytes() == b"Jello world"
    finally:
        fs.close()


@needs_root
@pytest.mark.parametrize("killpriv", [False, True])
def test_kill_suidgid_on_write_truncate_open(share: Path, make_fs: MakeFS, killpriv: bool) -> None:
    fs = make_fs(share, killpriv_v2=killpriv)
    p = share / "file"
    try:
        e = fs.lookup(ROOT, ROOT_ID, b"file")
        o = fs.open(ROOT, e.nodeid, os.O_RDWR)
        os.chmod(p, 0o6755)
        fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"x"), False)
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o6755  # root keeps them (CAP_FSETID)
        fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"x"), True)
        want = 0o755 if killpriv else 0o6755
        assert stat.S_IMODE(os.lstat(p).st_mode) == want
        os.chmod(p, 0o6755)
        fs.setattr(ROOT, e.nodeid, SetAttr(size=1, kill_suidgid=True))
        assert stat.S_IMODE(os.lstat(p).st_mode) == want
        os.chmod(p, 0o6755)
        fs.open(ROOT, e.nodeid, os.O_RDWR | os.O_TRUNC, kill_suidgid=True)
        assert stat.S_IMODE(os.lstat(p).st_mode) == want
        # The thread got CAP_FSETID back.
        os.chmod(p, 0o6755)
        fs.write(ROOT, e.nodeid, o.fh, 0, mv(b"x"), False)
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o6755
    finally:
        fs.close()


def test_fsync_fsyncdir_syncfs_statfs(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.fsync(ROOT, e.nodeid, o.fh, False)
    fs.fsync(ROOT, e.nodeid, o.fh, True)
    d = fs.opendir(ROOT, ROOT_ID, os.O_RDONLY)
    fs.fsyncdir(ROOT, ROOT_ID, d.fh, False)
    fs.syncfs(ROOT, ROOT_ID)
    fs.syncfs(ROOT, e.nodeid)
    assert errno_of(fs.fsync, ROOT, e.nodeid, 12345, False) == errno.EBADF


def test_fallocate_modes(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.fallocate(ROOT, e.nodeid, o.fh, 0, 0, 1 << 20)
    assert os.lstat(share / "file").st_size == 1 << 20
    keep_size, punch_hole, zero_range = 0x01, 0x02, 0x10
    fs.fallocate(ROOT, e.nodeid, o.fh, keep_size, 0, 2 << 20)
    assert os.lstat(share / "file").st_size == 1 << 20
    assert os.lstat(share / "file").st_blocks * 512 >= 2 << 20
    for mode in (punch_hole | keep_size, zero_range):
        try:
            fs.fallocate(ROOT, e.nodeid, o.fh, mode, 0, 4096)
        except OSError as err:
            assert err.errno == errno.EOPNOTSUPP, err
            continue
        assert (share / "file").read_bytes()[:5] == b"\0" * 5
    assert errno_of(fs.fallocate, ROOT, e.nodeid, o.fh, 0, -1, 10) == errno.EINVAL


def test_copy_file_range(fs: PassthroughFS, share: Path) -> None:
    (share / "dst").write_bytes(b"0123456789")
    src = fs.lookup(ROOT, ROOT_ID, b"file")
    dst = fs.lookup(ROOT, ROOT_ID, b"dst")
    si = fs.open(ROOT, src.nodeid, os.O_RDONLY)
    do = fs.open(ROOT, dst.nodeid, os.O_WRONLY)
    n = fs.copy_file_range(ROOT, src.nodeid, si.fh, 6, dst.nodeid, do.fh, 2, 5, 0)
    assert n == 5 and (share / "dst").read_bytes() == b"01world789"
    assert (
        errno_of(fs.copy_file_range, ROOT, src.nodeid, si.fh, 0, dst.nodeid, do.fh, 0, 1, 1)
        == errno.EINVAL
    )
    assert (
        errno_of(fs.copy_file_range, ROOT, dst.nodeid, do.fh, 0, src.nodeid, si.fh, 0, 1, 0)
        == errno.EBADF
    )


def test_lseek_data_hole_after_write(fs: PassthroughFS, share: Path) -> None:
    e, o = fs.create(ROOT, ROOT_ID, b"sparse", 0o644, os.O_RDWR, 0)
    fs.write(ROOT, e.nodeid, o.fh, 1 << 20, mv(b"x"), False)
    fd = os.open(share / "sparse", os.O_RDONLY)
    assert fs.lseek(ROOT, e.nodeid, o.fh, 0, os.SEEK_DATA) == os.lseek(fd, 0, os.SEEK_DATA)
    assert fs.lseek(ROOT, e.nodeid, o.fh, 0, os.SEEK_HOLE) == os.lseek(fd, 0, os.SEEK_HOLE)
    os.close(fd)


def test_statx(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    r = fs.statx(ROOT, e.nodeid, None, 0, 0xFFF)
    st = os.lstat(share / "file")
    f = r.fields
    assert (f["ino"], f["size"], f["mode"], f["nlink"]) == (
        st.st_ino,
        st.st_size,
        st.st_mode,
        st.st_nlink,
    )
    assert f["mtime_sec"] * 10**9 + f["mtime_nsec"] == st.st_mtime_ns
    assert os.makedev(f["dev_major"], f["dev_minor"]) == st.st_dev
    o = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    assert fs.statx(ROOT, e.nodeid, o.fh, 0, 0x7FF).fields["ino"] == st.st_ino
    assert errno_of(fs.statx, ROOT, 999, None, 0, 0x7FF) == errno.EBADF


def test_ioctl_flags(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    get, set_ = 0x80086601, 0x40086602
    try:
        res, out = fs.ioctl(ROOT, e.nodeid, o.fh, get, 0, b"", 8)
    except OSError as err:
        pytest.skip(f"no FS_IOC_GETFLAGS here: {err}")
    assert res == 0 and len(out) == 4
    noatime = 0x80  # FS_NOATIME_FL
    flags = int.from_bytes(out, sys.byteorder) | noatime
    fs.ioctl(ROOT, e.nodeid, o.fh, set_, 0, flags.to_bytes(4, sys.byteorder), 0)
    out = subprocess.run(["lsattr", str(share / "file")], capture_output=True, text=True).stdout
    assert "A" in out.split()[0]
    assert errno_of(fs.ioctl, ROOT, e.nodeid, o.fh, 0x5401, 0, b"", 0) == errno.ENOTTY


# -- credentials --------------------------------------------------------------------------


@needs_root
def test_creation_runs_as_the_guest_user(fs: PassthroughFS, share: Path) -> None:
    os.chmod(share, 0o777)
    e, _ = fs.create(USER, ROOT_ID, b"mine", 0o644, os.O_WRONLY, 0)
    for made in (
        e,
        fs.mkdir(USER, ROOT_ID, b"mydir", 0o755, 0),
        fs.mknod(USER, ROOT_ID, b"myfifo", stat.S_IFIFO | 0o644, 0, 0),
        fs.symlink(USER, ROOT_ID, b"mylink", b"mine"),
    ):
        assert (made.attr.st_uid, made.attr.st_gid) == (1000, 1000)
    t, _ = fs.tmpfile(USER, ROOT_ID, 0o600, os.O_RDWR, 0)
    assert t.attr.st_uid == 1000
    st = os.lstat(share / "mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert thread_ids() == (0, 0, ())  # switched back
    # Guest root creates as root.
    r = fs.mkdir(ROOT, ROOT_ID, b"rootdir", 0o755, 0)
    assert r.attr.st_uid == 0


@needs_root
def test_permission_denied_where_the_host_denies(fs: PassthroughFS, share: Path) -> None:
    fs.init(session(create_supp_group=True))  # the guest tells us the groups
    d = fs.lookup(ROOT, ROOT_ID, b"dir")
    os.chmod(share / "dir", 0o755)  # root's: others may not create
    assert errno_of(fs.create, USER, d.nodeid, b"x", 0o644, os.O_WRONLY, 0) == errno.EACCES
    assert errno_of(fs.mkdir, USER, d.nodeid, b"x", 0o755, 0) == errno.EACCES
    assert errno_of(fs.symlink, USER, d.nodeid, b"x", b"t") == errno.EACCES
    # Group-writable for a supplementary group the guest sent: allowed.
    os.chown(share / "dir", 0, 2000)
    os.chmod(share / "dir", 0o775)
    ctx = Context(uid=1000, gid=1000, pid=3, groups=(2000,))
    e = fs.mkdir(ctx, d.nodeid, b"x", 0o755, 0)
    assert (e.attr.st_uid, e.attr.st_gid) == (1000, 1000)
    assert errno_of(fs.mkdir, USER, d.nodeid, b"y", 0o755, 0) == errno.EACCES
    # chattr on a file the caller does not own: EPERM as on the host.
    f = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, f.nodeid, os.O_RDONLY)
    try:
        fs.ioctl(ROOT, f.nodeid, o.fh, 0x80086601, 0, b"", 8)
    except OSError:
        return
    assert errno_of(fs.ioctl, USER, f.nodeid, o.fh, 0x40086602, 0, bytes(4), 0) == errno.EPERM


@needs_root
def test_without_supp_group_extension_the_guest_checks_dirs(fs: PassthroughFS, share: Path) -> None:
    # The guest's kernel checked the directory with the full group list that
    # we do not know: the host keeps CAP_DAC_OVERRIDE, ownership is the guest's.
    d = fs.lookup(ROOT, ROOT_ID, b"dir")
    e = fs.mkdir(USER, d.nodeid, b"x", 0o755, 0)
    assert e.attr.st_uid == 1000


@needs_root
def test_credentials_never_leak_between_threads(share: Path, make_fs: MakeFS) -> None:
    fs = make_fs(share)
    os.chmod(share, 0o777)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(uid: int) -> None:
        ctx = Context(uid=uid, gid=uid + 1, pid=uid)
        try:
            start.wait()
            for i in range(40):
                e = fs.mkdir(ctx, ROOT_ID, f"u{uid}-{i}".encode(), 0o755, 0)
                assert (e.attr.st_uid, e.attr.st_gid) == (uid, uid + 1)
                assert thread_ids()[:2] == (0, 0)
                fs.forget(e.nodeid, 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(u,)) for u in (0, 1001, 2002, 3003)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    fs.close()
    assert not errors, errors
    for name in os.listdir(share):
        if name.startswith("u"):
            uid = int(name[1:].split("-")[0])
            st = os.lstat(share / name)
            assert (st.st_uid, st.st_gid) == (uid, uid + 1), name


@needs_root
def test_credentials_restore_on_error_and_cost() -> None:
    with pytest.raises(ZeroDivisionError), Credentials(1000, 1000, (5,)):
        assert thread_ids() == (1000, 1000, (5,))
        1 / 0  # noqa: B018
    assert thread_ids() == (0, 0, ())
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        with Credentials(1000, 1000):
            pass
    per_switch = (time.perf_counter() - t0) / n
    print(f"credential switch+restore: {per_switch * 1e6:.1f} us")


# -- translate-uid / gid ----------------------------------------------------------------------


@needs_root
def test_translate_uid_gid(share: Path, make_fs: MakeFS) -> None:
    os.chmod(share, 0o777)
    os.chown(share / "file", 5000, 0)
    fs = make_fs(
        share,
        uid_map=IdMap(["map:1000:5000:10", "forbid-guest:666:1"]),
        gid_map=IdMap(["squash-guest:0:4242:100000", "squash-host:4242:7:1"]),
    )
    try:
        f = fs.lookup(ROOT, ROOT_ID, b"file")
        assert f.attr.st_uid == 1000  # host 5000 is guest 1000
        assert fs.getattr(ROOT, f.nodeid, None).attr.st_uid == 1000
        e = fs.mkdir(Context(uid=1003, gid=1003, pid=1), ROOT_ID, b"m", 0o755, 0)
        st = os.lstat(share / "m")
        assert (st.st_uid, st.st_gid) == (5003, 4242)
        assert (e.attr.st_uid, e.attr.st_gid) == (1003, 7)
        ctx = Context(uid=666, gid=1, pid=1)
        assert errno_of(fs.mkdir, ctx, ROOT_ID, b"no", 0o755, 0) == errno.EPERM
        fs.setattr(ROOT, f.nodeid, SetAttr(uid=1001))
        assert os.lstat(share / "file").st_uid == 5001
        assert fs.statx(ROOT, f.nodeid, None, 0, 0x7FF).fields["uid"] == 1001
    finally:
        fs.close()


# -- xattrs ------------------------------------------------------------------------------------


def test_setxattr_removexattr(share: Path, make_fs: MakeFS) -> None:
    fs = make_fs(share, xattr=True)
    try:
        e = fs.lookup(ROOT, ROOT_ID, b"file")
        fs.setxattr(ROOT, e.nodeid, b"user.a", b"1", 0, False)
        assert os.getxattr(share / "file", "user.a") == b"1"
        assert errno_of(fs.setxattr, ROOT, e.nodeid, b"user.a", b"2", os.XATTR_CREATE, False) == (
            errno.EEXIST
        )
        assert errno_of(fs.setxattr, ROOT, e.nodeid, b"user.b", b"2", os.XATTR_REPLACE, False) == (
            errno.ENODATA
        )
        assert fs.getxattr(ROOT, e.nodeid, b"user.a") == b"1"
        fs.removexattr(ROOT, e.nodeid, b"user.a")
        assert errno_of(fs.removexattr, ROOT, e.nodeid, b"user.a") == errno.ENODATA
        assert (
            errno_of(fs.setxattr, ROOT, e.nodeid, b"system.posix_acl_access", b"", 0, False)
            == errno.ENOTSUP
        )
    finally:
        fs.close()
    off = make_fs(share)
    try:
        e = off.lookup(ROOT, ROOT_ID, b"file")
        assert errno_of(off.setxattr, ROOT, e.nodeid, b"user.a", b"1", 0, False) == errno.ENOSYS
        assert errno_of(off.removexattr, ROOT, e.nodeid, b"user.a") == errno.ENOSYS
    finally:
        off.close()


def test_xattrmap_applied(share: Path, make_fs: MakeFS) -> None:
    os.setxattr(share / "file", "user.host_only", b"h")
    xm = XattrMap(
        ":prefix:all:trusted.:user.virtiofs.: :bad:server::trusted.:"
        " :bad:client:user.virtiofs.:: :ok:all:::"
    )
    fs = make_fs(share, xattr=True, xattrmap=xm)
    try:
        e = fs.lookup(ROOT, ROOT_ID, b"file")
        fs.setxattr(ROOT, e.nodeid, b"trusted.overlay", b"v", 0, False)
        assert os.getxattr(share / "file", "user.virtiofs.trusted.overlay") == b"v"
        assert fs.getxattr(ROOT, e.nodeid, b"trusted.overlay") == b"v"
        names = fs.listxattr(ROOT, e.nodeid).split(b"\0")[:-1]
        assert sorted(names) == [b"trusted.overlay", b"user.host_only"]
        # The guest cannot reach the mapped names directly.
        assert errno_of(fs.getxattr, ROOT, e.nodeid, b"user.virtiofs.trusted.overlay") == (
            errno.ENODATA
        )
        bad = (ROOT, e.nodeid, b"user.virtiofs.x", b"", 0, False)
        assert errno_of(fs.setxattr, *bad) == errno.EPERM
        fs.removexattr(ROOT, e.nodeid, b"trusted.overlay")
        assert "user.virtiofs.trusted.overlay" not in os.listxattr(share / "file")
    finally:
        fs.close()


@needs_root
def test_security_label_on_create(share: Path, make_fs: MakeFS) -> None:
    fs = make_fs(share, xattr=True)
    try:
        ctx = Context(uid=0, gid=0, pid=1, security_ctx=(b"user.label", b"lbl\0"))
        fs.create(ctx, ROOT_ID, b"lab", 0o644, os.O_RDWR, 0)
        assert os.getxattr(share / "lab", "user.label") == b"lbl\0"
        fs.mkdir(ctx, ROOT_ID, b"labd", 0o755, 0)
        assert os.getxattr(share / "labd", "user.label") == b"lbl\0"
        bad = Context(uid=0, gid=0, pid=1, security_ctx=(b"bogus.ns", b"x"))
        assert errno_of(fs.mkdir, bad, ROOT_ID, b"nolabel", 0o755, 0) == errno.EOPNOTSUPP
        assert not (share / "nolabel").exists()  # removed again
    finally:
        fs.close()


# -- locks --------------------------------------------------------------------------------------

_HOLD = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
arg = struct.pack("@hhqqi4x", {typ}, 0, {start}, {length}, 0)
try:
    fcntl.fcntl(fd, fcntl.{cmd}, arg)
    print("locked", flush=True)
except OSError as e:
    print("busy", e.errno, flush=True)
    sys.exit(0)
sys.stdin.readline()
"""


def host_probe(path: Path, typ: int, start: int = 0, length: int = 0) -> str:
    """A host process tries a non-blocking F_OFD_SETLK on ``path``."""
    code = _HOLD.format(typ=typ, start=start, length=length, cmd="F_OFD_SETLK")
    p = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        input="\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return p.stdout.split()[0]


class HostHolder:
    """A host process holding a classic POSIX lock until told to stop."""

    def __init__(self, path: Path, typ: int) -> None:
        code = _HOLD.format(typ=typ, start=0, length=0, cmd="F_SETLK")
        self.p = subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.p.stdout is not None
        assert self.p.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        self.p.wait(timeout=30)


WHOLE = (0, OFFSET_MAX)


def test_guest_locks_are_seen_by_host_processes(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(0, 9, fcntl.F_WRLCK), sleep=False, flock=False)
    assert host_probe(share / "file", fcntl.F_RDLCK, 0, 5) == "busy"
    assert host_probe(share / "file", fcntl.F_WRLCK, 10, 5) == "locked"  # outside the range
    fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(0, 9, fcntl.F_UNLCK), sleep=False, flock=False)
    assert host_probe(share / "file", fcntl.F_WRLCK) == "locked"
    # And the other way round: a host lock is seen by GETLK and refuses SETLK.
    holder = HostHolder(share / "file", fcntl.F_WRLCK)
    try:
        got = fs.getlk(ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_RDLCK))
        assert got.type == fcntl.F_WRLCK and (got.start, got.end) == WHOLE
        assert errno_of(
            fs.setlk,
            ROOT,
            e.nodeid,
            o.fh,
            1,
            Lock(*WHOLE, fcntl.F_RDLCK),
            sleep=False,
            flock=False,
        ) in (errno.EAGAIN, errno.EACCES)
    finally:
        holder.release()
    assert fs.getlk(ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_WRLCK)).type == fcntl.F_UNLCK


def test_lock_owners_conflict_like_processes(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    o2 = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(0, 99, fcntl.F_WRLCK), sleep=False, flock=False)
    # Same owner, other handle: its own lock, no conflict (POSIX: per process).
    fs.setlk(ROOT, e.nodeid, o2.fh, 1, Lock(50, 60, fcntl.F_WRLCK), sleep=False, flock=False)
    assert fs.getlk(ROOT, e.nodeid, o.fh, 1, Lock(0, 99, fcntl.F_WRLCK)).type == fcntl.F_UNLCK
    # Another owner conflicts and sees the range.
    got = fs.getlk(ROOT, e.nodeid, o2.fh, 2, Lock(10, 10, fcntl.F_RDLCK))
    assert (got.type, got.start, got.end) == (fcntl.F_WRLCK, 0, 99)
    assert errno_of(
        fs.setlk, ROOT, e.nodeid, o2.fh, 2, Lock(10, 10, fcntl.F_RDLCK), sleep=False, flock=False
    ) in (errno.EAGAIN, errno.EACCES)
    fs.setlk(ROOT, e.nodeid, o2.fh, 2, Lock(100, 200, fcntl.F_WRLCK), sleep=False, flock=False)
    # FLUSH of owner 1 (its process closed an fd) drops all its locks.
    fs.flush(ROOT, e.nodeid, o.fh, 1)
    fs.setlk(ROOT, e.nodeid, o2.fh, 2, Lock(0, 99, fcntl.F_WRLCK), sleep=False, flock=False)
    assert host_probe(share / "file", fcntl.F_RDLCK, 150, 1) == "busy"
    fs.flush(ROOT, e.nodeid, o2.fh, 2)
    assert host_probe(share / "file", fcntl.F_WRLCK) == "locked"
    assert len(fs.locks) == 0


def test_setlkw_waits_and_is_interrupted(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_WRLCK), sleep=False, flock=False)
    result: list[object] = []
    started = threading.Event()

    def waiter(owner: int) -> None:
        started.set()
        try:
            fs.setlk(
                ROOT, e.nodeid, o.fh, owner, Lock(*WHOLE, fcntl.F_WRLCK), sleep=True, flock=False
            )
            result.append("granted")
        except OSError as err:
            result.append(err.errno)

    # Granted once the holder unlocks.
    t = threading.Thread(target=waiter, args=(2,))
    t.start()
    started.wait(10)
    t.join(0.1)
    assert t.is_alive() and not result  # still waiting while the lock is held
    fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_UNLCK), sleep=False, flock=False)
    t.join(10)
    assert result == ["granted"]
    # Interrupted: EINTR promptly, and later waits are not affected.
    result.clear()
    started.clear()
    t = threading.Thread(target=waiter, args=(3,))
    t.start()
    started.wait(10)
    t.join(0.1)
    assert t.is_alive() and not result
    fs.interrupt_waits()
    t.join(10)
    assert not t.is_alive() and result == [errno.EINTR]
    assert host_probe(share / "file", fcntl.F_RDLCK) == "busy"  # owner 2 still holds it


def test_setlkw_waits_for_a_host_process(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR)
    holder = HostHolder(share / "file", fcntl.F_WRLCK)
    done = threading.Event()

    def waiter() -> None:
        fs.setlk(ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_RDLCK), sleep=True, flock=False)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.1)
    holder.release()
    assert done.wait(10)
    t.join(10)


def test_flock_follows_the_handle(fs: PassthroughFS, share: Path) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o1 = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    o2 = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    fs.setlk(ROOT, e.nodeid, o1.fh, 1, Lock(0, 0, fcntl.F_WRLCK), sleep=False, flock=True)
    with open(share / "file", "rb") as host, pytest.raises(BlockingIOError):
        fcntl.flock(host, fcntl.LOCK_SH | fcntl.LOCK_NB)
    # Another handle (another open file) conflicts even for the same owner.
    assert errno_of(
        fs.setlk, ROOT, e.nodeid, o2.fh, 1, Lock(0, 0, fcntl.F_RDLCK), sleep=False, flock=True
    ) in (errno.EAGAIN, errno.EWOULDBLOCK)
    # FUSE_RELEASE_FLOCK_UNLOCK on release drops it.
    fs.release(ROOT, e.nodeid, o1.fh, 0, lock_owner=1)
    fs.setlk(ROOT, e.nodeid, o2.fh, 1, Lock(0, 0, fcntl.F_RDLCK), sleep=False, flock=True)
    fs.setlk(ROOT, e.nodeid, o2.fh, 1, Lock(0, 0, fcntl.F_UNLCK), sleep=False, flock=True)
    with open(share / "file", "rb") as host:
        fcntl.flock(host, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lock_argument_errors(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, ROOT_ID, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDONLY)
    bad = Lock(10, 5, fcntl.F_RDLCK)
    assert errno_of(fs.setlk, ROOT, e.nodeid, o.fh, 1, bad, sleep=False, flock=False) == (
        errno.EINVAL
    )
    # A write lock needs a handle open for writing, as on the host.
    assert (
        errno_of(
            fs.setlk, ROOT, e.nodeid, o.fh, 1, Lock(*WHOLE, fcntl.F_WRLCK), sleep=False, flock=False
        )
        == errno.EBADF
    )


# -- read-only -----------------------------------------------------------------------------------


def test_readonly_refuses_every_change(share: Path, make_fs: MakeFS) -> None:
    fs = ReadOnlyFS(make_fs(share, xattr=True))
    try:
        f = fs.lookup(ROOT, ROOT_ID, b"file")
        o = fs.open(ROOT, f.nodeid, os.O_RDONLY)
        calls = [
            (fs.create, ROOT, ROOT_ID, b"n", 0o644, os.O_RDWR, 0),
            (fs.mknod, ROOT, ROOT_ID, b"n", stat.S_IFIFO | 0o644, 0, 0),
            (fs.mkdir, ROOT, ROOT_ID, b"n", 0o755, 0),
            (fs.symlink, ROOT, ROOT_ID, b"n", b"t"),
            (fs.link, ROOT, f.nodeid, ROOT_ID, b"n"),
            (fs.unlink, ROOT, ROOT_ID, b"file"),
            (fs.rmdir, ROOT, ROOT_ID, b"dir"),
            (fs.rename, ROOT, ROOT_ID, b"file", ROOT_ID, b"n", 0),
            (fs.tmpfile, ROOT, ROOT_ID, 0o600, os.O_RDWR, 0),
            (fs.setattr, ROOT, f.nodeid, SetAttr(mode=0o600)),
            (fs.write, ROOT, f.nodeid, o.fh, 0, mv(b"x"), False),
            (fs.fallocate, ROOT, f.nodeid, o.fh, 0, 0, 10),
            (fs.copy_file_range, ROOT, f.nodeid, o.fh, 0, f.nodeid, o.fh, 0, 1, 0),
            (fs.setxattr, ROOT, f.nodeid, b"user.x", b"1", 0, False),
            (fs.removexattr, ROOT, f.nodeid, b"user.x"),
            (fs.ioctl, ROOT, f.nodeid, o.fh, 0x40086602, 0, bytes(4), 0),
        ]
        before = sorted(os.listdir(share))
        for fn, *args in calls:
            assert errno_of(fn, *args) == errno.EROFS, fn.__name__
        assert sorted(os.listdir(share)) == before
        assert (share / "file").read_bytes() == b"hello world"
    finally:
        fs.close()


def test_emfile_on_create_goes_to_the_request(fs: PassthroughFS, share: Path) -> None:
    import gc
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds: list[int] = []
    gc.collect()
    gc.disable()  # no fd may close behind the test's back
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with pytest.raises(OSError) as ei:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        assert ei.value.errno == errno.EMFILE
        assert errno_of(fs.create, ROOT, ROOT_ID, b"e", 0o644, os.O_RDWR, 0) == errno.EMFILE
        # One fd free: the file opens, its O_PATH fd cannot; nothing leaks.
        os.close(fds.pop())
        assert errno_of(fs.create, ROOT, ROOT_ID, b"e", 0o644, os.O_RDWR, 0) == errno.EMFILE
        assert len(fs.handles) == 0
        fds.append(os.open("/dev/null", os.O_RDONLY))  # the fd is free again
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()
    e, o = fs.create(ROOT, ROOT_ID, b"e2", 0o644, os.O_RDWR, 0)
    fs.release(ROOT, e.nodeid, o.fh, 0)
