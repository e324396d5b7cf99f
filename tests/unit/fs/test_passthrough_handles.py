"""``--inode-file-handles``: nodes kept as file handles, through the Filesystem API."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.fs.api import ROOT_ID, Context, Lock, SetAttr
from virtiofsd_py.fs.passthrough.creds import DropCap
from virtiofsd_py.fs.passthrough.file_handles import FileHandleError
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.inodes import InodeData
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.export import path_of
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.host import syscalls
from virtiofsd_py.migration.envelope import StateProvider, decode

CTX = Context(uid=0, gid=0, pid=1)
CAP_DAC_READ_SEARCH = 2


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "dir" / "sub" / "file").write_bytes(b"hello world")
    (d / "file").write_bytes(b"0123456789")
    (d / "link").symlink_to("file")
    os.mkfifo(d / "fifo")
    (tmp_path / "outside").write_bytes(b"secret")
    return d


def make_fs(share: Path, mode: str = "prefer", **kw: object) -> PassthroughFS:
    cfg = PassthroughConfig(share, inode_file_handles=mode, **kw)  # type: ignore[arg-type]
    return PassthroughFS(cfg)


@pytest.fixture
def fs(share: Path) -> Iterator[PassthroughFS]:
    f = make_fs(share, xattr=True)
    assert f.file_handles.enabled, "this host's file system makes no file handles"
    yield f
    f.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def node(fs: PassthroughFS, nodeid: int) -> InodeData:
    n = fs.inodes.get(nodeid)
    assert n is not None
    return n


def walk(fs: PassthroughFS, path: str) -> int:
    nodeid = ROOT_ID
    for part in path.split("/"):
        nodeid = fs.lookup(CTX, nodeid, part.encode()).nodeid
    return nodeid


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)  # type: ignore[operator]
    assert ei.value.errno is not None
    return ei.value.errno


# -- nodes hold handles, no fds -----------------------------------------------------------
def test_looked_up_nodes_hold_no_fd(fs: PassthroughFS, share: Path) -> None:
    before = open_fds()
    ids = [walk(fs, p) for p in ("dir", "dir/sub", "dir/sub/file", "file", "link", "fifo")]
    assert open_fds() == before
    for i in ids:
        n = node(fs, i)
        assert n.fd == -1 and n.handle is not None and n.mount is not None
    assert fs.inodes.fd_nodes == 1  # the root only
    st = fs.getattr(CTX, ids[2], None).attr
    assert st.st_ino == (share / "dir/sub/file").stat().st_ino
    # One identity, one node: a second name for the file dedups as with fds.
    os.link(share / "file", share / "hard")
    assert fs.lookup(CTX, ROOT_ID, b"hard").nodeid == ids[3]


def test_node_operations_by_handle(fs: PassthroughFS, share: Path) -> None:
    f = walk(fs, "file")
    d = walk(fs, "dir")
    assert fs.readlink(CTX, walk(fs, "link")) == b"file"
    assert stat.S_ISLNK(fs.getattr(CTX, walk(fs, "link"), None).attr.st_mode)
    fs.access(CTX, f, os.R_OK)
    assert fs.statfs(CTX, f).f_bsize > 0
    assert fs.statx(CTX, f, None, 0, syscalls.STATX_BASIC_STATS).fields["size"] == 10
    # OPEN straight by handle, READ, directory listing with readdirplus.
    fh = fs.open(CTX, f, os.O_RDONLY).fh
    buf = bytearray(10)
    assert fs.read(CTX, f, fh, 0, 10, [memoryview(buf)]) == 10 and bytes(buf) == b"0123456789"
    fs.release(CTX, f, fh, 0)
    dfh = fs.opendir(CTX, d, os.O_RDONLY).fh
    entries = {e.name: e for e in fs.readdir(CTX, d, dfh, 0, True)}
    sub = entries[b"sub"].entry
    assert sub is not None and node(fs, sub.nodeid).handle is not None
    fs.releasedir(CTX, d, dfh, 0)
    # Creating nodes in a handle-node directory.
    e = fs.mkdir(CTX, d, b"new", 0o755, 0)
    fifo = fs.mknod(CTX, e.nodeid, b"p", stat.S_IFIFO | 0o644, 0, 0)
    sym = fs.symlink(CTX, e.nodeid, b"s", b"target")
    ce, opened = fs.create(CTX, e.nodeid, b"c", 0o644, os.O_RDWR, 0)
    assert fs.write(CTX, ce.nodeid, opened.fh, 0, [memoryview(b"abc")], False) == 3
    fs.release(CTX, ce.nodeid, opened.fh, 0)
    le = fs.link(CTX, ce.nodeid, d, b"c-link")
    assert le.nodeid == ce.nodeid
    te, topened = fs.tmpfile(CTX, e.nodeid, 0o600, os.O_RDWR, 0)
    for i in (e.nodeid, fifo.nodeid, sym.nodeid, ce.nodeid, te.nodeid):
        assert node(fs, i).fd == -1 and node(fs, i).handle is not None
    fs.release(CTX, te.nodeid, topened.fh, 0)
    assert (share / "dir/new/c").read_bytes() == b"abc"
    assert os.readlink(share / "dir/new/s") == "target"
    assert stat.S_ISFIFO((share / "dir/new/p").lstat().st_mode)
    # A fifo is never opened, by handle either (CVE-2020-35517).
    assert errno_of(fs.open, CTX, fifo.nodeid, os.O_RDONLY) == errno.EBADF
    # SETATTR without a handle: chmod, chown, truncate, times.
    fs.setattr(CTX, ce.nodeid, SetAttr(mode=0o600))
    fs.setattr(CTX, ce.nodeid, SetAttr(uid=12, gid=34))
    fs.setattr(CTX, ce.nodeid, SetAttr(size=1))
    fs.setattr(CTX, ce.nodeid, SetAttr(mtime_ns=10**9))
    st = (share / "dir/new/c").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 12, 34, 1)
    assert st.st_mtime_ns == 10**9
    # xattrs go through /proc/self/fd of the fd opened for the call.
    fs.setxattr(CTX, f, b"user.k", b"v", 0, False)
    assert fs.getxattr(CTX, f, b"user.k") == b"v"
    assert b"user.k\0" in fs.listxattr(CTX, f)
    fs.removexattr(CTX, f, b"user.k")
    assert errno_of(fs.getxattr, CTX, f, b"user.k") == errno.ENODATA
    # Renames and removals in handle-node directories.
    fs.rename(CTX, e.nodeid, b"c", d, b"moved", 0)
    fs.unlink(CTX, d, b"moved")
    fs.unlink(CTX, d, b"c-link")
    fs.unlink(CTX, e.nodeid, b"p")
    fs.unlink(CTX, e.nodeid, b"s")
    fs.rmdir(CTX, d, b"new")
    assert sorted(os.listdir(share / "dir")) == ["sub"]
    fs.syncfs(CTX, f)


def test_posix_locks_on_a_handle_node(fs: PassthroughFS, share: Path) -> None:
    f = walk(fs, "file")
    fh = fs.open(CTX, f, os.O_RDWR).fh
    fs.setlk(CTX, f, fh, 7, Lock(0, 9, fcntl.F_WRLCK), sleep=False, flock=False)
    got = fs.getlk(CTX, f, fh, 8, Lock(0, 9, fcntl.F_RDLCK))
    assert got.type == fcntl.F_WRLCK
    fs.release(CTX, f, fh, 0)


# -- the fd budget ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["never", "prefer"])
def test_more_nodes_than_the_fd_budget(tmp_path: Path, mode: str) -> None:
    share = tmp_path / "many"
    share.mkdir()
    for i in range(60):
        (share / f"f{i}").touch()
    fs = make_fs(share, mode)
    try:
        fs.fd_limit = 20
        found = []
        for i in range(60):
            try:
                found.append(fs.lookup(CTX, ROOT_ID, f"f{i}".encode()).nodeid)
            except OSError as e:
                assert mode == "never" and e.errno == errno.ENFILE
                break
        if mode == "never":
            assert len(found) == 19  # the root takes one fd of the 20
        else:
            assert len(found) == 60 and len(set(found)) == 60
            # Open files still count: the budget is about fds actually held.
            fhs = [fs.open(CTX, n, os.O_RDONLY).fh for n in found[:19]]
            assert errno_of(fs.open, CTX, found[19], os.O_RDONLY) == errno.ENFILE
            for fh, n in zip(fhs, found, strict=False):
                fs.release(CTX, n, fh, 0)
    finally:
        fs.close()


# -- hard cases ---------------------------------------------------------------------------
def test_file_unlinked_while_open(fs: PassthroughFS, share: Path) -> None:
    """The open fd keeps working; once nothing holds the inode, the node is ESTALE."""
    f = walk(fs, "file")
    fh = fs.open(CTX, f, os.O_RDWR).fh
    os.unlink(share / "file")  # by a host process
    assert fs.getattr(CTX, f, fh).attr.st_nlink == 0
    buf = bytearray(4)
    assert fs.read(CTX, f, fh, 0, 4, [memoryview(buf)]) == 4 and bytes(buf) == b"0123"
    assert fs.write(CTX, f, fh, 0, [memoryview(b"ab")], False) == 2
    fs.setattr(CTX, f, SetAttr(size=3, fh=fh))
    assert fs.getattr(CTX, f, fh).attr.st_size == 3
    fs.release(CTX, f, fh, 0)
    gc.collect()
    # As the Rust virtiofsd: the handle names an inode that no longer exists.
    assert errno_of(fs.getattr, CTX, f, None) == errno.ESTALE
    assert errno_of(fs.open, CTX, f, os.O_RDONLY) == errno.ESTALE
    fs.forget(f, 1)
    assert fs.inodes.get(f) is None


def test_inode_number_reused_by_another_file_gets_a_new_node(
    fs: PassthroughFS, share: Path
) -> None:
    """A handle node does not pin its inode: after the host deletes the file,
    a new file (here a directory) may get the same inode number, and must not
    be answered with the old node id (Linux would mark that inode bad: EIO)."""
    old = walk(fs, "file")
    ino = (share / "file").stat().st_ino
    os.unlink(share / "file")
    gc.collect()
    for i in range(500):  # ext4 hands a freed inode number out again at once
        d = share / f"new{i}"
        d.mkdir()
        if d.stat().st_ino == ino:
            break
    else:
        pytest.skip(f"this host's file system did not reuse inode {ino} in 500 creations")
    entry = fs.lookup(CTX, ROOT_ID, d.name.encode())
    assert entry.nodeid != old
    assert stat.S_ISDIR(entry.attr.st_mode) and entry.attr.st_ino == ino
    assert errno_of(fs.getattr, CTX, old, None) == errno.ESTALE
    # The stale node goes when the guest forgets it; the new one stays found.
    fs.forget(old, 1)
    assert fs.lookup(CTX, ROOT_ID, d.name.encode()).nodeid == entry.nodeid


def test_key_match_with_another_handle_or_type_is_a_new_node(fs: PassthroughFS) -> None:
    """The table's rule on its own, independent of the host's inode allocator."""
    table = fs.inodes
    mount = node(fs, walk(fs, "dir")).mount
    assert mount is not None
    key = (1, 12345, 1)
    first, _ = table.add_lookup(-1, key, stat.S_IFREG | 0o644, ROOT_ID, b"a", (b"h1", mount))
    same, _ = table.add_lookup(-1, key, stat.S_IFREG | 0o644, ROOT_ID, b"a", (b"h1", mount))
    assert same is first and first.lookups == 2
    other, _ = table.add_lookup(-1, key, stat.S_IFREG | 0o644, ROOT_ID, b"a", (b"h2", mount))
    assert other is not first
    retyped, _ = table.add_lookup(-1, key, stat.S_IFDIR | 0o755, ROOT_ID, b"a", (b"h2", mount))
    assert retyped is not other
    table.forget(first.nodeid, 2)
    table.forget(other.nodeid, 1)
    assert table.get(first.nodeid) is None and table.get(retyped.nodeid) is retyped
    again, _ = table.add_lookup(-1, key, stat.S_IFDIR | 0o755, ROOT_ID, b"a", (b"h2", mount))
    assert again is retyped


def test_directory_renamed_on_the_host(fs: PassthroughFS, share: Path) -> None:
    d = walk(fs, "dir/sub")
    f = walk(fs, "dir/sub/file")
    os.rename(share / "dir", share / "elsewhere")
    (share / "elsewhere/sub/late").write_bytes(b"late")
    assert fs.lookup(CTX, d, b"late").attr.st_size == 4
    assert fs.getattr(CTX, f, None).attr.st_size == 11
    assert path_of(fs, node(fs, f), fs.share_root()) == b"elsewhere/sub/file"


def test_handle_node_outside_the_share_after_a_host_move(
    fs: PassthroughFS, share: Path, tmp_path: Path
) -> None:
    """As with fds (and the Rust virtiofsd): a moved-out directory is followed; '..' is not."""
    d = walk(fs, "dir/sub")
    os.rename(share / "dir", tmp_path / "moved-out")
    assert errno_of(fs.lookup, CTX, d, b"..") == errno.EACCES


def test_mount_fds_are_shared_and_released(fs: PassthroughFS) -> None:
    ids = [walk(fs, p) for p in ("dir", "dir/sub", "file")]
    assert fs.file_handles.mounts() == 1
    mounts = {id(node(fs, i).mount) for i in ids}
    assert len(mounts) == 1
    assert node(fs, ids[0]).mount is fs.file_handles._root_mount


def test_submount_gets_its_own_mount_fd(fs: PassthroughFS, share: Path) -> None:
    target = share / "mnt"
    target.mkdir()
    mount = ["mount", "-t", "tmpfs", "vfsd-test", str(target)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (target / "x").write_bytes(b"on tmpfs")
        m = walk(fs, "mnt")
        x = fs.lookup(CTX, m, b"x").nodeid
        assert fs.file_handles.mounts() == 2
        assert node(fs, m).mount is not fs.file_handles._root_mount
        assert node(fs, x).mount is node(fs, m).mount
        fh = fs.open(CTX, x, os.O_RDONLY).fh
        buf = bytearray(8)
        assert fs.read(CTX, x, fh, 0, 8, [memoryview(buf)]) == 8 and bytes(buf) == b"on tmpfs"
        fs.release(CTX, x, fh, 0)
        fs.forget(x, 1)
        fs.forget(m, 1)
        gc.collect()
        assert fs.file_handles.mounts() == 1  # the submount is not kept busy
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


# -- modes --------------------------------------------------------------------------------
def test_prefer_without_the_capability_falls_back_to_fds(share: Path) -> None:
    with DropCap(CAP_DAC_READ_SEARCH) as dc:
        if not dc.dropped:
            pytest.skip("CAP_DAC_READ_SEARCH not held")
        fs = make_fs(share, "prefer")
    try:
        assert not fs.file_handles.enabled
        assert node(fs, walk(fs, "file")).fd >= 0
    finally:
        fs.close()


def test_mandatory_refuses_without_the_capability(share: Path) -> None:
    before = open_fds()
    with DropCap(CAP_DAC_READ_SEARCH) as dc:
        if not dc.dropped:
            pytest.skip("CAP_DAC_READ_SEARCH not held")
        with pytest.raises(FileHandleError, match="CAP_DAC_READ_SEARCH"):
            make_fs(share, "mandatory")
    assert open_fds() == before


def test_mandatory_refuses_a_file_system_without_handles() -> None:
    with pytest.raises(FileHandleError, match="mandatory"):
        make_fs(Path("/proc/self"), "mandatory")
    fs = make_fs(Path("/proc/self"), "prefer")  # prefer: fds
    try:
        assert not fs.file_handles.enabled
    finally:
        fs.close()


def test_a_node_without_handle_is_eio_when_mandatory_and_an_fd_when_preferred(
    share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mandatory = make_fs(share, "mandatory")
    prefer = make_fs(share, "prefer")
    try:

        def no_handle(fd: int) -> tuple[bytes, int]:
            raise OSError(errno.EOPNOTSUPP, "no handles here")

        monkeypatch.setattr(syscalls, "name_to_handle", no_handle)
        assert errno_of(mandatory.lookup, CTX, ROOT_ID, b"file") == errno.EIO
        assert len(mandatory.inodes) == 1
        f = prefer.lookup(CTX, ROOT_ID, b"file").nodeid
        assert node(prefer, f).fd >= 0 and node(prefer, f).handle is None
        assert prefer.inodes.fd_nodes == 2
    finally:
        mandatory.close()
        prefer.close()


# -- migration ----------------------------------------------------------------------------
@pytest.mark.parametrize("mig_mode", ["find-paths", "file-handles"])
@pytest.mark.parametrize(("src_mode", "dst_mode"), [("prefer", "prefer"), ("prefer", "never")])
def test_migration_with_handle_nodes(
    share: Path, mig_mode: str, src_mode: str, dst_mode: str
) -> None:
    mig = MigrationConfig(mode=mig_mode)  # type: ignore[arg-type]
    src = make_fs(share, src_mode)
    dst = make_fs(share, dst_mode)
    try:
        f = walk(src, "dir/sub/file")
        link = walk(src, "link")
        fh = src.open(CTX, f, os.O_RDONLY).fh
        g = walk(src, "file")
        gfh = src.open(CTX, g, os.O_RDWR).fh
        os.unlink(share / "file")  # unlinked but open: found by handle
        data = StateProvider(Dispatcher(src), PassthroughMigration(src, mig), str(share)).save()
        by_id = {i.id: i for i in decode(data).fs.inodes}
        assert by_id[f].path == b"dir/sub/file"
        assert by_id[g].path is None and by_id[g].handle == node(src, g).handle
        if mig_mode == "file-handles":
            assert by_id[f].handle == node(src, f).handle
        StateProvider(Dispatcher(dst), PassthroughMigration(dst, mig), str(share)).load(data)
        for i in (f, link, g):
            n = node(dst, i)
            assert (n.handle is not None) == (dst_mode == "prefer")
            assert (n.fd >= 0) == (dst_mode == "never")
        assert dst.readlink(CTX, link) == b"file"
        buf = bytearray(11)
        assert dst.read(CTX, f, fh, 0, 11, [memoryview(buf)]) == 11
        assert bytes(buf) == b"hello world"
        assert dst.getattr(CTX, g, gfh).attr.st_nlink == 0
    finally:
        src.close()
        dst.close()


def test_escape_attempts_leave_only_nodes_inside_the_share(
    fs: PassthroughFS, share: Path, tmp_path: Path
) -> None:
    """Every handle node opens to something inside the share, whatever was tried."""
    os.symlink(tmp_path, share / "out")
    for name in (b"..", b"out", b"../outside", b"."):
        try:
            e = fs.lookup(CTX, ROOT_ID, name)
        except OSError:
            continue
        for sub in (b"outside", b"..", b"share"):
            try:
                fs.lookup(CTX, e.nodeid, sub)
            except OSError:
                continue
    for n in fs.inodes:
        with n.opened() as fd:
            where = os.readlink(f"/proc/self/fd/{fd}")
        assert where == str(share) or where.startswith(f"{share}/"), where
    assert len(fs.inodes) > 1 and fs.inodes.fd_nodes == 1
