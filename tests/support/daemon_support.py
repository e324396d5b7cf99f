"""The host tree the daemon tests share, and the check that a daemon ended cleanly.

Kept out of conftest.py so that test modules can import these names (two
conftest modules exist: tests/ and tests/guest/).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

TRACEBACK = "Traceback (most recent call last)"


# -- the host tree -------------------------------------------------------------
SMALL = b"hello, virtio-fs\n"
BIG_SIZE = (1 << 20) + 12345
SPARSE_SIZE = 8 << 20
SPARSE_DATA_AT = 4 << 20
SPARSE_DATA = b"data in the middle of a hole" * 100
MANY = 300
OUTSIDE_SECRET = b"outside the share: must never be read\n"
XATTR_NAME = b"user.virtiofs-test"
XATTR_VALUE = b"an extended attribute value"


@dataclass(frozen=True)
class HostTree:
    """The shared directory, what its files hold, and checks against it.

    Tests get everything through this object (the ``host_tree`` fixture)
    instead of importing from conftest.
    """

    root: Path
    outside: Path
    big: bytes
    xattrs: bool
    small: bytes = SMALL
    sparse_size: int = SPARSE_SIZE
    sparse_data_at: int = SPARSE_DATA_AT
    sparse_data: bytes = SPARSE_DATA
    many: int = MANY
    outside_secret: bytes = OUTSIDE_SECRET
    xattr_name: bytes = XATTR_NAME
    xattr_value: bytes = XATTR_VALUE
    #: Requests made by :meth:`check_serving`: LOOKUP, GETATTR, OPEN, READ, RELEASE.
    check_requests: int = 5

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check_serving(self, fe: VhostUserFrontend, queue: int = 1) -> None:
        """A LOOKUP, GETATTR, OPEN, READ, RELEASE round trip that must succeed."""
        client = FuseClient(fe, queue=queue)
        entry = client.lookup(abi.FUSE_ROOT_ID, "small.txt")
        assert entry.size == len(self.small)
        assert client.getattr(entry.nodeid).ino == self.path("small.txt").stat().st_ino
        fh = client.open(entry.nodeid).fh
        assert client.read(entry.nodeid, fh, 0, 4096) == self.small
        client.release(entry.nodeid, fh)


def make_host_tree(base: Path) -> HostTree:
    """A shared directory with one of each kind of thing the tests look at."""
    root = base / "share"
    root.mkdir()
    outside = base / "outside"
    outside.write_bytes(OUTSIDE_SECRET)
    (root / "small.txt").write_bytes(SMALL)
    big = random.Random(1234).randbytes(BIG_SIZE)
    (root / "big.bin").write_bytes(big)
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_DATA_AT)
        f.write(SPARSE_DATA)
    (root / "empty").write_bytes(b"")
    (root / "dir").mkdir()
    (root / "dir" / "a").write_bytes(b"a")
    (root / "dir" / "sub").mkdir()
    (root / "many").mkdir()
    for i in range(MANY):
        (root / "many" / f"entry-{i:04d}-{'x' * (i % 40)}").write_bytes(b"")
    os.symlink("small.txt", root / "link")
    os.symlink(str(outside), root / "escape_abs")
    os.symlink("../outside", root / "escape_rel")
    try:
        os.setxattr(root / "small.txt", XATTR_NAME, XATTR_VALUE)
        xattrs = True
    except OSError:
        xattrs = False
    return HostTree(root, outside, big, xattrs)


# -- daemon, front-end, FUSE session ---------------------------------------------
def finish_daemon(daemon: DaemonProcess, *, expect_clean: bool = True) -> None:
    """Stop a daemon after its test and check it neither crashed nor hung."""
    status = daemon.stop(timeout=5.0)
    log = daemon.log()
    print(f"--- daemon log (exit status {status}) ---\n{log}")
    if expect_clean:
        assert status == 0, f"daemon exit status {status}"
        assert TRACEBACK not in log, "daemon log has a Python traceback"


def session(
    d: DaemonProcess, *, queues: int = 2, **client: int
) -> tuple[VhostUserFrontend, FuseClient]:
    """A front-end on ``d`` with its queues started and FUSE_INIT done, and a
    client (``client``: its uid/gid/pid); the caller closes the front-end."""
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=queues, queue_size=256)
        c = FuseClient(fe, **client)
        c.init()
    except BaseException:
        fe.close()
        raise
    return fe, c


def require_own_daemon_as_root(why_root: str) -> None:
    """Skip (with the reason) unless the daemon under test is ours and we are root."""
    if not is_own_daemon():
        pytest.skip("our daemon's sandbox only")
    if os.geteuid() != 0:
        pytest.skip(why_root)
