"""What every sandbox mode must serve, run for ``namespace`` and ``chroot`` alike.

The sandbox moves ``/proc`` (namespace: a private one inside a tmpfs root;
chroot: out of the tree, reached as the working directory), so the
operations that use the ``/proc/self/fd`` magic links are the ones to
watch: xattrs (a symlink's own included), hard links, SETATTR without a
handle, lock records in ``fdinfo`` and the migration state.  Also the
credentials switch (files created with the caller's ids), the confinement
of the serving process, and the socket and pid files removed at the end.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from daemon_support import (
    SMALL,
    XATTR_NAME,
    XATTR_VALUE,
    HostTree,
    finish_daemon,
    make_host_tree,
    require_own_daemon_as_root,
    session,
)
from escape_ops import create, link, mknod, rename, setxattr, symlink, unlink

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.frontend.fuse_client import FuseClient, FuseError
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

pytestmark = pytest.mark.ours_only

ROOT = abi.FUSE_ROOT_ID
MODES = ["namespace", "chroot"]
#: Host-set on a symlink: security.* needs no capability to read (trusted.* would).
LINK_XATTR = b"security.virtiofsd-py-test"
GUEST_UID, GUEST_GID = 1234, 2345


@pytest.fixture(autouse=True)
def _root_and_ours() -> None:
    require_own_daemon_as_root(
        "both modes need root here (the unprivileged one: test_sandbox_unprivileged)"
    )


def start(share: Path, run: Path, mode: str, *extra: str) -> DaemonProcess:
    """A daemon in ``mode`` that has entered it (the socket exists before that)."""
    d = DaemonProcess(share, run, extra_args=["--sandbox", mode, *extra]).start()
    deadline = time.monotonic() + 10
    while "waiting for a vhost-user front-end" not in d.log():
        assert d.alive() and time.monotonic() < deadline, d.log()
        time.sleep(0.01)
    return d


def serving_pid(d: DaemonProcess, mode: str) -> int:
    """The process that serves: the sandboxed child, or the daemon itself (chroot)."""
    if mode == "chroot":
        return d.pid
    (child,) = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
    return int(child)


@pytest.fixture
def tree(tmp_path: Path) -> HostTree:
    t = make_host_tree(tmp_path)
    os.setxattr(t.path("link"), LINK_XATTR, b"on the link itself", follow_symlinks=False)
    return t


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(tree: HostTree, tmp_path: Path, mode: str) -> Iterator[DaemonProcess]:
    d = start(tree.root, tmp_path / "run", mode)
    try:
        yield d
    finally:
        if d.alive():
            d.terminate(timeout=10)  # SIGTERM at once: nothing would end the session
        finish_daemon(d)


def test_serving_process_is_confined(daemon: DaemonProcess, mode: str) -> None:
    pid = serving_pid(daemon, mode)
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    sys_admin, sys_chroot = 1 << 21, 1 << 18
    assert int(fields["CapEff"], 16) & (sys_admin | sys_chroot) == 0
    assert int(fields["CapBnd"], 16) & (sys_admin | sys_chroot) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_full_operation_set(daemon: DaemonProcess, tree: HostTree) -> None:
    fe, c = session(daemon)
    try:
        small = c.lookup(ROOT, b"small.txt")
        fh = c.open(small.nodeid).fh
        assert c.read(small.nodeid, fh, 0, 4096) == SMALL
        # xattrs through the magic link: a regular file's, then a symlink's own.
        assert c.getxattr(small.nodeid, XATTR_NAME, 4096) == XATTR_VALUE
        setxattr(c, small.nodeid, b"user.set-by-guest", b"v1")
        assert os.getxattr(tree.path("small.txt"), b"user.set-by-guest") == b"v1"
        c.call(abi.FUSE_REMOVEXATTR, small.nodeid, b"user.set-by-guest\0", 0)
        assert b"user.set-by-guest" not in os.listxattr(tree.path("small.txt"))
        lnk = c.lookup(ROOT, b"link")
        assert c.getxattr(lnk.nodeid, LINK_XATTR, 4096) == b"on the link itself"
        listed = c.listxattr(lnk.nodeid, 4096)
        assert isinstance(listed, bytes) and LINK_XATTR in listed.split(b"\0")
        # A hard link (linkat through the magic link), of a file and of a symlink.
        assert link(c, small.nodeid, ROOT, b"hard").ino == small.ino
        assert os.stat(tree.path("small.txt")).st_nlink == 2
        link(c, lnk.nodeid, ROOT, b"hard-link")
        assert os.readlink(tree.path("hard-link")) == "small.txt"
        # SETATTR without a handle: chmod through the magic link.
        chmod = abi.SETATTR_IN.pack(abi.FATTR_MODE, *[0] * 10, 0o600, *[0] * 4)
        c.call(abi.FUSE_SETATTR, small.nodeid, chmod, abi.ATTR_OUT.size)
        assert stat.S_IMODE(os.stat(tree.path("small.txt")).st_mode) == 0o600
        # Namespace changes and special files.
        dirent = c.lookup(ROOT, b"dir")
        symlink(c, dirent.nodeid, b"sl", b"../small.txt")
        mknod(c, dirent.nodeid, b"fifo", stat.S_IFIFO | 0o644)
        rename(c, dirent.nodeid, b"sl", ROOT, b"sl-moved")
        unlink(c, ROOT, b"hard")
        assert os.readlink(tree.path("sl-moved")) == "../small.txt"
        assert stat.S_ISFIFO(os.lstat(tree.path("dir/fifo")).st_mode)
        assert not tree.path("hard").exists()
        # ".." of the root is the root, and a symlink out is text, never followed.
        assert c.lookup(ROOT, b"..").ino == os.lstat(tree.root).st_ino
        out = c.lookup(ROOT, b"escape_abs")
        assert c.readlink(out.nodeid) == str(tree.outside).encode()
        with pytest.raises(FuseError):
            c.lookup(ROOT, b"../outside")
    finally:
        fe.close()


def test_files_are_created_with_the_callers_ids(daemon: DaemonProcess, tree: HostTree) -> None:
    fe, c = session(daemon, uid=GUEST_UID, gid=GUEST_GID)
    try:
        create(c, ROOT, b"owned", 0o644)
        mknod(c, ROOT, b"owned-fifo", stat.S_IFIFO | 0o600)
    finally:
        fe.close()
    for name in ("owned", "owned-fifo"):
        st = os.lstat(tree.path(name))
        assert (st.st_uid, st.st_gid) == (GUEST_UID, GUEST_GID), name


def lock_in(fh: int, owner: int, kind: int, start: int = 0, end: int = 9) -> bytes:
    return abi.LK_IN.pack(fh, owner, start, end, kind, 1, 0, 0)


@pytest.mark.parametrize("mode", ["namespace", "chroot"], indirect=True)
def test_migration_between_two_sandboxed_daemons(tree: HostTree, tmp_path: Path, mode: str) -> None:
    """Save in one daemon of the mode, load in a second: nodes, handles and a lock."""
    a = start(tree.root, tmp_path / "a", mode)
    b = start(tree.root, tmp_path / "b", mode)
    try:
        a_fe, src = session(a)
        d = src.lookup(ROOT, b"dir")
        f = src.lookup(d.nodeid, b"a")
        lnk = src.lookup(ROOT, b"link")
        fh = src.open(f.nodeid, os.O_RDWR).fh
        src.call(abi.FUSE_SETLK, f.nodeid, lock_in(fh, 0xAB, fcntl.F_WRLCK), 0)
        bases = a_fe.stop()
        state = a_fe.save_state()
        doc = msgpack.unpackb(state)
        assert {i["id"] for i in doc["fs"]["inodes"]} >= {d.nodeid, f.nodeid, lnk.nodeid}
        assert [(k["inode"], k["type"]) for k in doc["fs"]["locks"]] == [(f.nodeid, fcntl.F_WRLCK)]
        a_fe.close()
        assert a.wait(10) == 0, a.log()

        b_fe = VhostUserFrontend.connect(b.socket_path)
        b_fe.connect_and_start(queues=2, queue_size=256, start_rings=False)
        assert b_fe.load_state(state) == 0, b.log()
        for q, base in zip(b_fe.queues, bases, strict=True):
            q.avail_idx = q.kicked_idx = q.last_used = base
            q._set_u16(q.avail_gpa + 2, base)
            q._set_u16(q.used_gpa + 2, base)
            b_fe.start_queue(q, base=base)
            b_fe.set_vring_enable(q.index, True)
        dst = FuseClient(b_fe)
        dst._unique = src._unique
        assert dst.read(f.nodeid, fh, 0, 16) == b"a"
        assert dst.getattr(lnk.nodeid).ino == os.lstat(tree.path("link")).st_ino
        # The lock moved with the handle: the host cannot take it now.
        wait_for_lock_held(tree.path("dir/a"))
        assert dst.write(f.nodeid, fh, 1, b"bc") == 2
        assert tree.path("dir/a").read_bytes() == b"abc"
        b_fe.close()
        assert b.wait(10) == 0, b.log()
    finally:
        for x in (a, b):
            if x.alive():
                x.kill()


def wait_for_lock_held(path: Path, timeout: float = 10.0) -> None:
    """The destination re-takes locks in the background; wait until it holds this one."""
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
            got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
            if struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK:
                return
            assert time.monotonic() < deadline, "the destination never took the lock"
            time.sleep(0.02)
    finally:
        os.close(fd)


def test_socket_and_pid_files_are_removed(daemon: DaemonProcess, mode: str) -> None:
    pidfile = Path(f"{daemon.socket_path}.pid")
    assert pidfile.exists()
    assert daemon.terminate(timeout=10) == 0, daemon.log()
    assert not daemon.socket_path.exists()
    assert not pidfile.exists()
