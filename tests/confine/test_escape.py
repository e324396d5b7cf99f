"""Escapes from the shared directory, tried through the real daemon process.

Files outside the share are canaries: a watcher (inotify on the outside
directory: IN_OPEN, IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CREATE, ...) must
see nothing, their bytes and metadata must not change, no new file may
appear outside, and no reply may ever carry their content.  The attempts:
``..`` and names with '/', absolute and relative symlinks, a host thread
swapping a directory and a symlink to the outside while the front-end
works through the name (the rename race), hard links, O_PATH and other
open flags, set-id and xattr namespaces for unprivileged guest users, and
a directory moved out of the share by the host while the guest holds it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from escape_ops import (
    ROOT,
    SECRET,
    Outside,
    Swapper,
    create,
    daemon_session,
    link,
    mkdir,
    rename,
    setattr,
    setxattr,
    symlink,
    watched_outside,
)

from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseError


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    def setup(d: Path) -> None:
        os.chmod(d / "victim", 0o644)
        (d / "subdir").mkdir()

    with watched_outside(tmp_path / "outside", setup) as o:
        yield o


@pytest.fixture
def share(tmp_path: Path, outside: Outside) -> Path:
    s = tmp_path / "share"
    s.mkdir()
    (s / "file").write_bytes(b"inside\n")
    (s / "dir").mkdir()
    (s / "dir" / "inner").write_bytes(b"inner\n")
    os.symlink(str(outside.dir), s / "abs_dir")
    os.symlink("../outside", s / "rel_dir")
    os.symlink(str(outside.dir / "secret"), s / "abs_file")
    os.symlink("../outside/victim", s / "rel_file")
    os.symlink("dir/../../outside/secret", s / "dotdot_file")
    os.chmod(s, 0o755)
    return s


def no_secret(data: bytes) -> bytes:
    assert SECRET.strip() not in data, "a reply carried bytes from outside the share"
    return data


def attempt(fn: object, *args: object, **kw: object) -> None:
    """Call ``fn``; a FUSE error is a fine outcome of an escape attempt."""
    try:
        result = fn(*args, **kw)  # type: ignore[operator]
    except FuseError:
        return
    if isinstance(result, bytes):
        no_secret(result)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (guest users)")


# -- names --------------------------------------------------------------------------------------
BAD_NAMES = [b"..", b"../outside", b"../outside/secret", b"/etc/passwd", b"dir/../..", b"a\0b"]


def test_names_never_leave_the_share(share: Path, tmp_path: Path, outside: Outside) -> None:
    with daemon_session(share, tmp_path / "run") as (_d, _fe, c):
        # '..' at the root is the root (or refused): never the parent.
        try:
            up = c.lookup(ROOT, "..")
        except FuseError:
            pass
        else:
            assert up.ino in (share.stat().st_ino, 1)
        dirnode = c.lookup(ROOT, "dir")
        for name in BAD_NAMES[1:]:
            attempt(c.lookup, ROOT, name)
            attempt(create, c, ROOT, name)
            attempt(mkdir, c, ROOT, name)
            attempt(symlink, c, ROOT, name, b"x")
            attempt(link, c, dirnode.nodeid, ROOT, name)
            attempt(rename, c, ROOT, b"file", ROOT, name)
            attempt(rename, c, ROOT, name, ROOT, b"stolen")
        assert not (share / "stolen").exists()
        outside.check()


# -- symlinks -----------------------------------------------------------------------------------
SYMLINKS = ["abs_dir", "rel_dir", "abs_file", "rel_file", "dotdot_file"]


@pytest.mark.parametrize("name", SYMLINKS)
def test_symlinks_out_are_never_followed(
    share: Path, tmp_path: Path, outside: Outside, name: str
) -> None:
    with daemon_session(share, tmp_path / "run") as (_d, _fe, c):
        e = c.lookup(ROOT, name)
        assert stat.S_ISLNK(e.mode)
        assert c.readlink(e.nodeid) == os.readlink(share / name).encode()
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_PATH,
                      os.O_RDONLY | os.O_DIRECTORY, os.O_RDONLY | os.O_NOFOLLOW):  # fmt: skip
            attempt(c.open, e.nodeid, flags)
        attempt(c.opendir, e.nodeid)
        for sub in ("secret", "victim", "subdir", "new"):
            attempt(c.lookup, e.nodeid, sub)
            attempt(create, c, e.nodeid, sub.encode())
            attempt(mkdir, c, e.nodeid, sub.encode())
        attempt(create, c, ROOT, name.encode(), 0o644, os.O_RDWR | os.O_TRUNC)
        attempt(setattr, c, e.nodeid, size=0)
        attempt(setattr, c, e.nodeid, mode=0o777)
        attempt(setxattr, c, e.nodeid, b"user.x", b"y")
        attempt(c.getxattr, e.nodeid, "user.x", 64)
        attempt(c.listxattr, e.nodeid, 4096)
        # A hard link of the symlink is a second symlink, not a link to the target.
        try:
            link(c, e.nodeid, ROOT, b"hard_" + name.encode())
        except FuseError:
            pass
        else:
            assert (share / f"hard_{name}").is_symlink()
        outside.check()


# -- the rename race ----------------------------------------------------------------------------
RACE_ROUNDS = 400


def test_rename_race_symlink_swapped_in(share: Path, tmp_path: Path, outside: Outside) -> None:
    """Lookups, opens, creates and mkdirs through a name that is sometimes a link out."""
    swapper = Swapper(share, outside.dir)
    outside.watch.events()
    with daemon_session(share, tmp_path / "run") as (_d, _fe, c):
        swapper.start()
        try:
            dirs = 0
            for i in range(RACE_ROUNDS):
                try:
                    node = c.lookup(ROOT, "swap")
                except FuseError:
                    continue
                dirs += stat.S_ISDIR(node.mode)
                attempt(_read_through, c, node.nodeid, "secret")
                attempt(create, c, node.nodeid, f"new{i}".encode())
                attempt(mkdir, c, node.nodeid, f"newdir{i}".encode())
                attempt(_read_through, c, node.nodeid, f"new{i}")
                c.forget(node.nodeid, 1)
        finally:
            swapper.stop.set()
            swapper.join(5)
        assert swapper.swaps > 0
        assert dirs > 0, "the race never saw the directory"
    outside.check()


def _read_through(c: FuseClient, parent: int, name: str) -> bytes:
    e = c.lookup(parent, name)
    fh = c.open(e.nodeid).fh
    data = c.read(e.nodeid, fh, 0, 4096)
    c.release(e.nodeid, fh)
    return no_secret(data)


# -- hard links ----------------------------------------------------------------------------------
def test_hard_links_stay_inside(share: Path, tmp_path: Path, outside: Outside) -> None:
    with daemon_session(share, tmp_path / "run") as (_d, _fe, c):
        f = c.lookup(ROOT, "file")
        dirnode = c.lookup(ROOT, "dir")
        e = link(c, f.nodeid, dirnode.nodeid, b"file_again")
        assert e.ino == (share / "file").stat().st_ino
        assert (share / "dir" / "file_again").stat().st_nlink == 2
        # Directories cannot be hard-linked, unknown node ids name nothing.
        for nodeid in (dirnode.nodeid, 1, 987654321):
            with pytest.raises(FuseError):
                link(c, nodeid, ROOT, b"bad_link")
        assert not (share / "bad_link").exists()
        outside.check()


# -- set-id bits for unprivileged guest users -------------------------------------------------
# In a real guest, chmod/chown/setxattr permission checks are the guest
# kernel's (virtiofs mounts with default_permissions): tests/guest/test_escape.py.
# What the daemon itself enforces is that creation runs with the guest
# user's ids, so the host's checks and set-id rules apply to that user.
@needs_root
def test_creation_runs_as_the_unprivileged_guest_user(share: Path, tmp_path: Path) -> None:
    pub = share / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    with daemon_session(share, tmp_path / "run") as (_d, fe, _c):
        user = FuseClient(fe, uid=1000, gid=1000)
        user._unique = 1 << 20
        pubnode = user.lookup(ROOT, "pub")
        create(user, pubnode.nodeid, b"mine", 0o6755)
        st = (pub / "mine").stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        m = mkdir(user, pubnode.nodeid, b"mydir", 0o2755)
        st = (pub / "mydir").stat()
        assert (st.st_uid, st.st_gid, m.uid) == (1000, 1000, 1000)
        # A set-id file of root's stays root's: the user cannot get one made for root.
        assert not [p for p in pub.iterdir() if p.stat().st_uid == 0]


# -- xattr namespaces ---------------------------------------------------------------------------
def test_xattrmap_hides_host_names(share: Path, tmp_path: Path) -> None:
    try:
        os.setxattr(share / "file", "user.hostonly", b"host")
    except OSError:
        pytest.skip("no user xattrs here")
    with daemon_session(
        share, tmp_path / "run", "--xattr", "--xattrmap", ":map::user.virtiofs.:"
    ) as (_d, _fe, c):
        f = c.lookup(ROOT, "file")
        setxattr(c, f.nodeid, b"trusted.guest", b"g")
        setxattr(c, f.nodeid, b"security.guest", b"g")
        names = c.listxattr(f.nodeid, 4096)
        assert isinstance(names, bytes)
        assert set(names.split(b"\0")) - {b""} == {b"trusted.guest", b"security.guest"}
        # The guest cannot reach the host's own names, even by spelling the prefix.
        for name in ("user.hostonly", "user.virtiofs.user.hostonly"):
            with pytest.raises(FuseError) as ei:
                c.getxattr(f.nodeid, name, 64)
            assert ei.value.errno == errno.ENODATA
    host = set(os.listxattr(share / "file"))
    assert {"user.virtiofs.trusted.guest", "user.virtiofs.security.guest"} <= host
    assert not [n for n in host if n.startswith(("trusted.", "security."))]


# -- a directory moved out by the host ----------------------------------------------------------
def _sandbox_works(share: Path, tmp_path: Path, mode: str) -> bool:
    from virtiofsd_py.testing.daemon_proc import DaemonError, DaemonProcess

    d = DaemonProcess(share, tmp_path / f"probe-{mode}", extra_args=["--sandbox", mode])
    try:
        d.start()
    except DaemonError:
        return False
    if d.terminate() is None:  # never leave a probe behind, even on a slow host
        d.kill()
    return True


SANDBOXES = ["none", "namespace", "chroot"]


def _move_out(share: Path, tmp_path: Path, sandbox: str) -> Iterator[tuple[FuseClient, int]]:
    if sandbox != "none" and not _sandbox_works(share, tmp_path, sandbox):
        pytest.skip(f"--sandbox {sandbox} does not start here (not built or no privileges)")
    with daemon_session(share, tmp_path / "run", "--sandbox", sandbox) as (_d, _fe, c):
        dirnode = c.lookup(ROOT, "dir")
        os.rename(share / "dir", tmp_path / "moved")
        yield c, dirnode.nodeid


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_directory_moved_out_by_the_host_stays_reachable(
    share: Path, tmp_path: Path, sandbox: str
) -> None:
    """Documents the limit: a held directory moved out of the share stays usable.

    The daemon's O_PATH fd follows the directory wherever the host moves it
    on the same file system, so the guest keeps reading and creating in it
    (docs/security.md, "Known limits").  No sandbox mode changes that.
    """
    moved = tmp_path / "moved"
    for c, nodeid in _move_out(share, tmp_path, sandbox):
        assert _read_through(c, nodeid, "inner") == b"inner\n"
        create(c, nodeid, b"created_after_move")
    assert (moved / "created_after_move").exists()


@pytest.mark.parametrize(
    "sandbox",
    ["none", "namespace", "chroot"],
)
def test_dotdot_from_a_directory_moved_out(share: Path, tmp_path: Path, sandbox: str) -> None:
    """'..' never leads above the share: the passthrough checks where it lands,
    and with pivot_root nothing above the share exists for the daemon anyway."""
    for c, nodeid in _move_out(share, tmp_path, sandbox):
        try:
            up = c.lookup(nodeid, "..")
        except FuseError:
            continue
        assert up.ino != tmp_path.stat().st_ino, "'..' climbed above the share"
