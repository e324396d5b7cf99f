"""Regression tests for the known virtiofsd CVEs, through the real daemon process.

Each test is named after the CVE it guards and drives the daemon the way a
hostile guest would (real vrings, real FUSE requests):

- CVE-2020-10717: a guest opening files without end exhausted the daemon's
  fds and took the whole share down.
- CVE-2020-35517: the daemon opened fifos / device nodes the guest had
  created (host device access, daemon hangs).
- CVE-2021-20263: with --xattrmap, the guest's security.capability lives
  under another host name, which the host kernel does not clear on write.
- CVE-2022-0358: the daemon kept its supplementary groups while acting for
  a guest user, so files created in a setgid directory kept setgid for a
  group the guest user is not in.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest
from daemon_support import session
from escape_ops import ROOT, create, daemon_session, mkdir, mknod, setattr, setxattr

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess, daemon_command_template
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseError

pytestmark = pytest.mark.ours_only
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (guest users, device nodes)")


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "file").write_bytes(b"x" * 100)
    return d


# -- CVE-2020-10717 --------------------------------------------------------------------
def test_cve_2020_10717_fd_exhaustion_fails_requests_not_the_daemon(
    share: Path, tmp_path: Path
) -> None:
    """Open until the daemon's fd limit: requests get EMFILE, the daemon keeps serving."""
    for i in range(300):
        (share / f"f{i}").write_bytes(b"data")
    with daemon_session(share, tmp_path / "run", "--rlimit-nofile", "256") as (d, _fe, c):
        handles = []
        err = None
        for i in range(300):
            try:
                e = c.lookup(ROOT, f"f{i}")
                handles.append((e.nodeid, c.open(e.nodeid).fh))
            except FuseError as ex:
                err = ex.errno
                break
        assert err in (errno.EMFILE, errno.ENFILE), "the fd limit was never reached"
        assert d.fd_count() <= 256
        # Still serving, and the fds come back once the guest lets go.
        assert c.statfs().bsize > 0
        for nodeid, fh in handles:
            c.release(nodeid, fh)
        e = c.lookup(ROOT, "file")
        fh = c.open(e.nodeid).fh
        assert c.read(e.nodeid, fh, 0, 100) == b"x" * 100


# -- CVE-2020-35517 --------------------------------------------------------------------
def _opened_for_io(pid: int, target: Path) -> list[str]:
    """The daemon's fds on ``target`` that are real opens (not O_PATH)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != str(target):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if not flags & os.O_PATH:
            out.append(name)
    return out


@needs_root
def test_cve_2020_35517_special_files_are_never_opened(share: Path, tmp_path: Path) -> None:
    """A guest-made fifo and device node: OPEN/CREATE/SETATTR never open them."""
    with daemon_session(share, tmp_path / "run") as (d, _fe, c):
        fifo = mknod(c, ROOT, b"fifo", stat.S_IFIFO | 0o666)
        # /dev/null's numbers: harmless if the guard ever failed.
        dev = mknod(c, ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert stat.S_ISCHR((share / "null").lstat().st_mode)
        for node, name in ((fifo, "fifo"), (dev, "null")):
            for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_NONBLOCK):
                with pytest.raises(FuseError):
                    c.open(node.nodeid, flags)
            # CREATE without O_EXCL over the existing name must not open it either.
            with pytest.raises(FuseError) as ei:
                create(c, ROOT, name.encode())
            assert ei.value.errno == errno.EEXIST
            with pytest.raises(FuseError):
                setattr(c, node.nodeid, size=0)
            assert _opened_for_io(d.pid, share / name) == []
        assert c.statfs().bsize > 0


# -- CVE-2021-20263 --------------------------------------------------------------------
CAP = b"security.capability"
HOST_CAP = b"user.virtiofs.security.capability"
CAP_VALUE = b"\x01\x00\x00\x02" + b"\x00" * 16  # any bytes: the host stores a user xattr


def _has_xattrs(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.probe")
    return True


def _host_xattrs(path: Path) -> set[str]:
    return set(os.listxattr(path))


@pytest.mark.parametrize("change", ["write", "truncate", "chown", "open_trunc", "create_trunc"])
def test_cve_2021_20263_remapped_capability_dropped_on_change(
    share: Path, tmp_path: Path, change: str
) -> None:
    if not _has_xattrs(share / "file"):
        pytest.skip("no user xattrs on this file system")
    with daemon_session(
        share, tmp_path / "run", "--xattr", "--xattrmap", ":map::user.virtiofs.:"
    ) as (_d, _fe, c):
        e, opened = create(c, ROOT, b"prog", 0o755)
        setxattr(c, e.nodeid, CAP, CAP_VALUE)
        setxattr(c, e.nodeid, b"user.other", b"kept")
        host = share / "prog"
        assert HOST_CAP.decode() in _host_xattrs(host)
        if change == "write":
            c.write(e.nodeid, opened.fh, 0, b"\x7fELF patched")
        elif change == "truncate":
            setattr(c, e.nodeid, size=0)
        elif change == "chown":
            setattr(c, e.nodeid, uid=os.getuid(), gid=os.getgid())
        elif change == "open_trunc":
            c.open(e.nodeid, os.O_WRONLY | os.O_TRUNC)
        else:
            create(c, ROOT, b"prog", 0o755, flags=os.O_RDWR | os.O_TRUNC)
        names = _host_xattrs(host)
        assert HOST_CAP.decode() not in names, f"remapped capability survived a {change}"
        assert "user.virtiofs.user.other" in names, "other xattrs must stay"
        with pytest.raises(FuseError) as ei:
            c.getxattr(e.nodeid, CAP, 64)
        assert ei.value.errno == errno.ENODATA


def test_cve_2021_20263_reads_keep_the_capability(share: Path, tmp_path: Path) -> None:
    """Only changes drop it: open, read, getattr and chmod leave it alone."""
    if not _has_xattrs(share / "file"):
        pytest.skip("no user xattrs on this file system")
    with daemon_session(
        share, tmp_path / "run", "--xattr", "--xattrmap", ":map::user.virtiofs.:"
    ) as (_d, _fe, c):
        e, opened = create(c, ROOT, b"prog", 0o755)
        setxattr(c, e.nodeid, CAP, CAP_VALUE)
        c.read(e.nodeid, opened.fh, 0, 10)
        c.getattr(e.nodeid)
        c.release(e.nodeid, opened.fh)
        c.open(e.nodeid, os.O_RDONLY)
        assert c.getxattr(e.nodeid, CAP, 64) == CAP_VALUE


def test_cve_2021_20263_xattrmap_rule() -> None:
    from virtiofsd_py.fs.passthrough.xattrmap import XattrMap

    assert XattrMap(":map::user.virtiofs.:").remapped_capability() == HOST_CAP
    assert XattrMap(":prefix:all:security.:user.g.:").remapped_capability() == (
        b"user.g.security.capability"
    )
    assert XattrMap(":ok:all:::").remapped_capability() is None
    assert XattrMap(":bad:all:security.::").remapped_capability() is None
    assert XattrMap(":map:trusted.:user.t.:").remapped_capability() is None


# -- CVE-2022-0358 ---------------------------------------------------------------------
OUTSIDER_GROUP = 4242


@needs_root
def test_cve_2022_0358_no_setgid_for_a_group_the_guest_user_is_not_in(
    share: Path, tmp_path: Path
) -> None:
    """The daemon starts with a supplementary group; a guest user must not borrow it."""
    sgid = share / "sgid"
    sgid.mkdir()
    os.chown(sgid, 0, OUTSIDER_GROUP)
    os.chmod(sgid, 0o2777)
    # Start the daemon holding OUTSIDER_GROUP, as an operator's root shell might.
    wrapper = (
        f"{sys.executable} -c 'import os,sys; os.setgroups([{OUTSIDER_GROUP}]);"
        " os.execvp(sys.argv[1], sys.argv[1:])' "
    )
    d = DaemonProcess(share, tmp_path / "run", template=wrapper + daemon_command_template())
    d.start()
    fe, root = session(d)
    try:
        with open(f"/proc/{d.pid}/status") as f:
            groups = next(x for x in f if x.startswith("Groups:")).split()[1:]
        assert str(OUTSIDER_GROUP) not in groups, "the daemon kept its supplementary group"
        user = FuseClient(fe, uid=1000, gid=1000)
        user._unique = 1 << 20
        dirnode = user.lookup(ROOT, "sgid")
        create(user, dirnode.nodeid, b"exe", 0o2755)
        mknod(user, dirnode.nodeid, b"node", stat.S_IFREG | 0o2755)
        sub = mkdir(user, dirnode.nodeid, b"sub", 0o2755)
        del sub
        for name in ("exe", "node"):
            st = (sgid / name).stat()
            assert (st.st_uid, st.st_gid) == (1000, OUTSIDER_GROUP)
            assert not st.st_mode & stat.S_ISGID, f"{name} kept setgid of a foreign group"
        # Directories inherit setgid by design (they carry the group, not privilege).
        assert (sgid / "sub").stat().st_mode & stat.S_ISGID
        assert root.statfs().bsize > 0
    finally:
        fe.close()
        status = d.stop()
        assert status == 0, d.log()
        assert "Traceback" not in d.log()


_ = abi
